"""PlanReplay run by ``promptcache operator`` as a process against the real API server and controller manager, over
request logs a real proxy wrote (docs/design.md#replay, #reconciliation, #testing).

Three principals each hold the three-turn conversation of test_proxy_billing through the official OpenAI SDK,
and one more request fails upstream; the proxy logs all ten into the session's Postgres. Replaying them under the
policy they were served with must give savings of exactly 0, whether the run happens in the operator or in a Job.

The phases are watched from the outside (a WATCH on the PlanReplay). A large replay becomes a real Job, whose pod
the real job controller creates; there is no kubelet, so the test plays it: it runs the pod's container args as
``promptcache <args>`` with the pod's environment and a token of the chart's replay ServiceAccount (bound to the
chart's replay ClusterRole: a verb missing there fails the test), then reports the pod's end through its status, and
the job controller completes or fails the Job.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from promptcache.operator import cli
from promptcache.operator.constants import (
    API_VERSION,
    GENERATION_ANNOTATION,
    PLAN_ENV,
    REPLAYS,
    SHARDS_ANNOTATION,
    WINDOW_ANNOTATION,
)
from promptcache.operator.handlers import planreplay
from promptcache.proxy.storage.requestlog import format_timestamp
from promptcache.proxy.testing.simulator import Simulator

from support.cluster import Cluster, KubeError, Obj, Recording, eventually
from support.controlplane import free_port, kubeconfig
from support.conversation import openai_turns
from support.operator_process import TEST_IMAGE, OperatorEnvironment, StartOperator, render_chart
from support.pods import new_pod, pod_finished, run_pod
from support.proxy import model_config, new_key, running_proxy, settle, unique
from support.resources import condition, model

SERVED_WITH = {"minPrefixTokens": 10}
"""The cache keys of harness.model_config: the policy the proxy billed the traffic under."""
BOOTSTRAP = {"iterations": 200, "seed": 7}
REPLAY_ACCOUNT = "promptcache-replay"
"""The chart's ``replay.serviceAccount``, which the chart's Deployment gives the operator as
``PROMPTCACHE_REPLAY_SERVICE_ACCOUNT``."""


SHARDS = 3
"""The sharded run's parallelism: the traffic has one principal in each shard."""


def shard_of(principal: str, shards: int) -> int:
    """The test's own reckoning of requestlog.SHARD_OF: the first 32 bits of the principal's MD5, modulo shards."""
    return int(hashlib.md5(principal.encode()).hexdigest()[:8], 16) % shards


@dataclass(frozen=True)
class Traffic:
    alias: str
    window: dict[str, str]
    billed: Decimal
    """What the ledger says the requests cost."""


@pytest.fixture(scope="module")
async def traffic(tmp_path_factory: pytest.TempPathFactory, pg_dsn: str, simulator: tuple[str, Simulator],
                  word_tokenizer: Path) -> Traffic:
    alias = unique("replayed")
    start = datetime.now(UTC) - timedelta(seconds=1)
    config = {"models": [model_config(alias, simulator[0] + "/v1", "openai", word_tokenizer)]}
    principals: list[str] = []
    while len({shard_of(p, SHARDS) for p in principals}) < SHARDS:  # one principal in each shard
        principals = [unique(name) for name in ("acme", "globex", "initech")]
    async with running_proxy(config, tmp_path_factory.mktemp("replay-proxy"), pg_dsn) as proxy:
        for principal in principals:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                        max_retries=0)
            for messages in openai_turns():
                await client.chat.completions.create(model=alias, messages=messages)  # type: ignore[arg-type]
                await settle(proxy)  # each turn's writes are committed before the next one looks them up
    config = {"models": [model_config(alias, simulator[0] + "/error/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path_factory.mktemp("failing-proxy"), pg_dsn) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique("acme")),
                                    max_retries=0)
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model=alias, messages=openai_turns()[0])  # type: ignore[arg-type]
        await settle(proxy)
    end = datetime.now(UTC) + timedelta(seconds=1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        logged = await conn.fetch("SELECT status, billed_cost FROM request_log WHERE virtual_model = $1", alias)
    finally:
        await conn.close()
    assert sorted(r["status"] for r in logged) == [200] * 9 + [502]
    billed = sum(r["billed_cost"] for r in logged if r["status"] == 200)
    assert billed > 0
    return Traffic(alias, {"start": format_timestamp(start), "end": format_timestamp(end)}, billed)


def replay_environment(operator_env: OperatorEnvironment, **extra: str) -> OperatorEnvironment:
    """The session's database, no Redis (a policy's ``redis`` keys must not reconfigure the shared server), and
    the replay ServiceAccount the chart names."""
    return dataclasses.replace(operator_env, redis_url=None,
                               extra={"PROMPTCACHE_REPLAY_SERVICE_ACCOUNT": REPLAY_ACCOUNT, **extra})


def replay(name: str, models: list[str], *, ns: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("bootstrap", BOOTSTRAP)
    return {"apiVersion": API_VERSION, "kind": "PlanReplay", "metadata": {"name": name, "namespace": ns},
            "spec": {"models": models, **spec}}


def deployed(alias: str, ns: str) -> dict[str, Any]:
    """The DeployedModel that makes ``alias`` the namespace's (its policy is absent: it stays Stalled, harmlessly)."""
    return model(f"m-{alias}", alias, "serving", ns=ns)


async def get(kube: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    return await kube.get_or_none(API_VERSION, REPLAYS, ns, name)


async def finished(kube: Cluster, ns: str, name: str, generation: int = 1) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await get(kube, ns, name)
        status = (obj or {}).get("status") or {}
        done = status.get("observedGeneration") == generation and status.get("phase") in planreplay.TERMINAL
        return obj if done else None

    obj: dict[str, Any] = await eventually(check, within=30, what=f"{name} generation {generation} to finish")
    return obj


async def running_in_job(kube: Cluster, ns: str, name: str, generation: int = 1) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await get(kube, ns, name)
        status = (obj or {}).get("status") or {}
        running = status.get("observedGeneration") == generation and status.get("phase") == "Running"
        return obj if running and (condition(obj, "Reconciling") or {}).get("reason") == "JobRunning" else None

    obj: dict[str, Any] = await eventually(check, within=30, what=f"{name} generation {generation} to run in a Job")
    return obj


async def replay_job(kube: Cluster, ns: str, name: str, generation: int = 1) -> Obj:
    """The Job of that generation, which the operator creates right after saying Running."""
    async def created() -> Obj | None:
        job = await kube.get_or_none("batch/v1", "jobs", ns, name)
        ours = job is not None and job["metadata"]["annotations"][GENERATION_ANNOTATION] == str(generation)
        return job if ours else None

    job: Obj = await eventually(created, what=f"the Job {name} of generation {generation}")
    return job


def phase_of(obj: Obj) -> tuple[int | None, str | None]:
    status = obj.get("status") or {}
    return status.get("observedGeneration"), status.get("phase")


async def phases(recording: Recording) -> list[tuple[int | None, str]]:
    """The (generation, phase) sequence the watch saw, up to the object's current state."""
    await recording.caught_up()
    return [(generation, phase) for generation, phase in recording.changes(phase_of) if phase is not None]


# --- playing a Job's pod ---------------------------------------------------------------------------------------


async def replay_identity(kube: Cluster, ns: str, directory: Path) -> Path:
    """The chart's replay ServiceAccount and RoleBinding in ``ns`` (the replay ClusterRole came with the operator's
    identity); a kubeconfig with a token of that account, as the Job's pod would mount."""
    rendered = render_chart({"image": TEST_IMAGE, "replay": {"namespaces": [ns]}})
    objects = [o for o in rendered if o["metadata"].get("namespace") == ns]
    assert sorted(o["kind"] for o in objects) == ["RoleBinding", "ServiceAccount"]
    [binding] = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": REPLAY_ACCOUNT, "namespace": ns}]
    role = binding["roleRef"]["name"]
    live = await kube.get("rbac.authorization.k8s.io/v1", "clusterroles", None, role)
    assert [live["rules"]] == [o["rules"] for o in rendered if o["kind"] == "ClusterRole"
                               and o["metadata"]["name"] == role], "the replay ClusterRole is the chart's"
    for obj in objects:
        await kube.create(obj)
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    response = await kube.call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts/{REPLAY_ACCOUNT}/token",
                               json=request)
    return kubeconfig(directory / f"replay-{ns}.kubeconfig", kube.url, kube.plane.ca, user=REPLAY_ACCOUNT,
                      token=response["status"]["token"], namespace=ns)


async def dsn_secret(kube: Cluster, ns: str, dsn: str) -> None:
    """The Secret ``pg/dsn`` that PROMPTCACHE_DATABASE_SECRET names, for the Job's pod."""
    await kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg", "namespace": ns},
                       "data": {"dsn": base64.b64encode(dsn.encode()).decode()}})


def job_condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    return next((dict(c) for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == kind), None)


# --- the tests -------------------------------------------------------------------------------------------------


async def test_in_process_replay_runs_once_per_generation(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, traffic: Traffic) -> None:
    ns = await kube.namespace("replays")
    policy = {"apiVersion": API_VERSION, "kind": "CachePolicy", "metadata": {"name": "same", "namespace": ns},
              "spec": {**SERVED_WITH, "redis": {"maxMemory": "64mb"}}}
    async with start_operator(namespaces=[ns], environment=replay_environment(operator_env)), \
            kube.watching(API_VERSION, REPLAYS, ns, "inline") as watch:
        await kube.create(deployed(traffic.alias, ns))
        await kube.create(policy)
        await kube.create(replay("inline", [traffic.alias], ns=ns, window=traffic.window, policy=SERVED_WITH))
        await kube.create(replay("by-ref", [traffic.alias], ns=ns, window=traffic.window,
                                 cachePolicyRef={"name": "same"}))
        obj = await finished(kube, ns, "inline")
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        assert await phases(watch) == [(1, "Pending"), (1, "Running"), (1, "Succeeded")]

        # Replayed under the policy it was billed under, the traffic costs exactly what it was billed.
        summary = status["summary"]  # camelCase in status, as in any Kubernetes API
        assert summary["requests"] == 9
        assert Decimal(summary["baselineCost"]) == traffic.billed
        assert (summary["projectedCost"], summary["savings"]) == (summary["baselineCost"], "0")
        assert Decimal(summary["savingsPct"]) == 0 and summary["hitRate"] == "0.666667"  # turns 2 and 3 read
        assert set(summary) == {"requests", "baselineCost", "projectedCost", "listCost", "savings", "savingsPct",
                                "readTokenRatio", "hitRate", "creationCost", "misses"}
        # Each principal's first turn found nothing cached, as recorded (its split wrote) and as projected.
        first_turns = {"rejected": 0, "unmarked": 0, "belowMinimum": 0, "expired": 0, "beyondLookback": 0,
                       "prefixChanged": 0, "neverWritten": 3}
        assert summary["misses"] == {"recorded": first_turns, "projected": first_turns}
        assert set(status["intervals"]) == {"projectedCost", "savings", "savingsPct", "hitRate", "readTokenRatio"}
        assert all(isinstance(b, str) for bounds in status["intervals"].values() for b in bounds)
        assert status["intervals"]["savings"] == ["0", "0"]
        assert status["caveats"] == ["only 3 principal clusters: the intervals are rough",
                                     "1 non-2xx requests were skipped"]
        assert len(status["digest"]) == 64 and status["startedAt"] <= status["finishedAt"]
        assert [(condition(obj, k) or {}).get("status") for k in ("Ready", "Reconciling", "Stalled")] == [
            "True", "False", "False"]
        assert "projected savings 0 USD" in (condition(obj, "Ready") or {})["message"]

        # The full result goes into an owned ConfigMap, the digest covering everything else in it; it is the JSON
        # `promptcache replay` prints (snake_case), of which the status holds the summary, intervals and caveats.
        assert status["reportConfigMap"] == "inline-report"
        cm = await kube.get("v1", "configmaps", ns, "inline-report")
        result = json.loads(cm["data"]["result.json"])
        assert (result["digest"], result["caveats"]) == (status["digest"], status["caveats"])
        assert planreplay.result_status(result) == {k: status[k] for k in ("summary", "intervals", "digest",
                                                                           "caveats")}
        assert result["summary"]["savings_pct"] == summary["savingsPct"]
        assert result["per_model"] == [{"model": traffic.alias, **result["summary"]}]
        assert result["params"] == {"policy": SERVED_WITH, "tier_override": {}, "pricing_overrides": {}, "seed": 7,
                                    "iterations": 200, "unit": "principal", "confidence": 0.95}
        assert [(r["kind"], r["uid"]) for r in cm["metadata"]["ownerReferences"]] == [
            ("PlanReplay", obj["metadata"]["uid"])]
        assert cm["metadata"]["annotations"][GENERATION_ANNOTATION] == "1"
        assert cm["metadata"]["annotations"][WINDOW_ANNOTATION].startswith(traffic.window["start"][:19])
        assert await kube.get_or_none("batch/v1", "jobs", ns, "inline-replay") is None

        # The same policy by reference (its redis keys are not part of a projection): the same result.
        by_ref = await finished(kube, ns, "by-ref")
        assert by_ref["status"]["digest"] == status["digest"]

        # A new generation runs again: 5m markers projected as 1h cost more to write.
        await kube.patch(API_VERSION, REPLAYS, ns, "inline", {"spec": {"tierOverride": {"5m": "1h"}}})
        second = (await finished(kube, ns, "inline", generation=2))["status"]
        assert second["phase"] == "Succeeded" and second["digest"] != status["digest"]
        assert Decimal(second["summary"]["savings"]) < 0 and Decimal(second["summary"]["savingsPct"]) < 0
        cm = await kube.get("v1", "configmaps", ns, "inline-report")
        assert json.loads(cm["data"]["result.json"])["params"]["tier_override"] == {"5m": "1h"}
        assert cm["metadata"]["annotations"][GENERATION_ANNOTATION] == "2"
        ran_twice = [(g, p) for g in (1, 2) for p in ("Pending", "Running", "Succeeded")]
        assert await phases(watch) == ran_twice

        # Status-only and metadata-only changes run nothing.
        await kube.patch_status(API_VERSION, REPLAYS, ns, "inline", {"caveats": ["checked by a human"]})
        await kube.patch(API_VERSION, REPLAYS, ns, "inline", {"metadata": {"labels": {"team": "billing"}}})
        await kube.create(replay("later", [traffic.alias], ns=ns, window=traffic.window, policy=SERVED_WITH))
        await finished(kube, ns, "later")  # a later event, handled after the ones above
        after = (await get(kube, ns, "inline") or {})["status"]
        assert (after["caveats"], after["finishedAt"], after["digest"]) == (
            ["checked by a human"], second["finishedAt"], second["digest"])
        assert await phases(watch) == ran_twice

        async def two_succeeded() -> bool:  # kopf posts events asynchronously
            events = await kube.events(ns, involving="inline")
            return [e["reason"] for e in events if e["reason"] == "Succeeded"] == ["Succeeded", "Succeeded"]

        await eventually(two_succeeded, what="one Succeeded event per generation")
        await kube.release(ns)  # nothing for a later test's operator to find


async def test_bad_specs_fail_with_a_reason(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment) -> None:
    """What the CRD's schema and CEL rules refuse, the API server refuses (the operator's own check of the same
    rule is for a server that skips them); what only the operator can know fails the PlanReplay with a reason."""
    ns = await kube.namespace("replays")
    alias = unique("idle")  # deployed, but never requested
    window = {"start": "2001-01-01T00:00:00Z", "end": "2001-01-02T00:00:00Z"}
    refused = {
        "backwards": (replay("backwards", [alias], ns=ns, window={"start": window["end"], "end": window["start"]},
                             policy={}), "window.start must be before window.end"),
        "bad-policy": (replay("bad-policy", [alias], ns=ns, lastHours=1,
                              policy={"enabledTtls": ["1h"], "defaultTtl": "5m"}),
                       "defaultTtl must be one of enabledTtls"),
        "two-windows": (replay("two-windows", [alias], ns=ns, window=window, lastHours=1, policy={}),
                        "set exactly one of window and lastHours"),
        "too-parallel": (replay("too-parallel", [alias], ns=ns, window=window, policy={}, parallelism=65),
                         "spec.parallelism: Invalid value: 65"),
    }
    for name, (obj, words) in refused.items():
        with pytest.raises(KubeError) as refusal:
            await kube.create(obj)
        assert refusal.value.status == 422 and words in refusal.value.message, (name, refusal.value.message)
    cases = {
        "unknown-model": (replay("unknown-model", ["no-such-model"], ns=ns, window=window, policy={}),
                          "UnknownModel", "no-such-model"),
        "empty-window": (replay("empty-window", [alias], ns=ns, window=window, policy={}), "EmptyWindow",
                         "no 2xx requests"),
        "missing-ref": (replay("missing-ref", [alias], ns=ns, lastHours=1, cachePolicyRef={"name": "nowhere"}),
                        "CachePolicyNotFound", f"CachePolicy {ns}/nowhere"),
    }
    async with start_operator(namespaces=[ns], environment=replay_environment(operator_env)):
        await kube.create(deployed(alias, ns))
        for obj, _, _ in cases.values():
            await kube.create(obj)
        for name, (_, reason, words) in cases.items():
            obj = await finished(kube, ns, name)
            assert obj["status"]["phase"] == "Failed", (name, obj["status"])
            stalled = condition(obj, "Stalled") or {}
            assert (stalled.get("status"), stalled.get("reason")) == ("True", reason), name
            assert words in stalled["message"], (name, stalled["message"])
            assert (condition(obj, "Ready") or {}).get("status") == "False"
            assert "summary" not in obj["status"] and "digest" not in obj["status"]

            async def warned(name: str = name, reason: str = reason) -> bool:  # kopf posts events asynchronously
                events = await kube.events(ns, involving=name)
                return [e["type"] for e in events if e["reason"] == reason] == ["Warning"]

            await eventually(warned, what=f"the {reason} warning event for {name}")
        assert await kube.list("v1", "configmaps", ns) == []
        assert await kube.list("batch/v1", "jobs", ns) == []
        await kube.release(ns)  # nothing for a later test's operator to find


async def test_large_replays_run_as_a_job_with_the_same_result(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, traffic: Traffic,
        pg_dsn: str, tmp_path: Path) -> None:
    ns = await kube.namespace("replays")
    identity = await replay_identity(kube, ns, tmp_path)
    await dsn_secret(kube, ns, pg_dsn)
    spec = {"window": traffic.window, "policy": SERVED_WITH, "tierOverride": {"5m": "1h"}}
    # Ten requests are logged, but only the nine that succeeded count towards the threshold.
    inline = replay_environment(operator_env, PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS="9")
    async with start_operator(namespaces=[ns], environment=inline):
        await kube.create(deployed(traffic.alias, ns))
        await kube.create(replay("here", [traffic.alias], ns=ns, **spec))
        here = await finished(kube, ns, "here")
    assert here["status"]["phase"] == "Succeeded"
    assert (condition(here, "Ready") or {})["reason"] == "Succeeded"
    assert await kube.get_or_none("batch/v1", "jobs", ns, "here-replay") is None

    in_jobs = replay_environment(operator_env, PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS="0")
    async with start_operator(namespaces=[ns], environment=in_jobs), \
            kube.watching(API_VERSION, REPLAYS, ns, "there") as watch:
        await kube.create(replay("there", [traffic.alias], ns=ns, **spec))
        there = await running_in_job(kube, ns, "there")
        job = await replay_job(kube, ns, "there-replay")
        assert [(r["kind"], r["uid"]) for r in job["metadata"]["ownerReferences"]] == [
            ("PlanReplay", there["metadata"]["uid"])]
        assert job["metadata"]["annotations"][GENERATION_ANNOTATION] == "1"
        assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] > 0
        template = job["spec"]["template"]["spec"]
        assert template["restartPolicy"] == "Never" and template["serviceAccountName"] == REPLAY_ACCOUNT
        [container] = template["containers"]
        assert container["image"] == "promptcache:test"
        assert container["args"] == ["replay-job", f"{ns}/there"]
        assert container["env"] == [{"name": "PROMPTCACHE_DATABASE_URL",
                                     "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}}]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert not security["allowPrivilegeEscalation"] and security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["limits"]["memory"]
        assert "startedAt" in there["status"] and "summary" not in there["status"]
        assert (await get(kube, ns, "here") or {})["status"]["finishedAt"] == here["status"]["finishedAt"], \
            "the restarted operator does not re-run a finished generation"

        # The Job's pod, as the job controller created it: the same code, patching the status itself.
        pod = await new_pod(kube, ns, job)
        assert pod["spec"]["serviceAccountName"] == REPLAY_ACCOUNT
        code, output = await run_pod(kube, ns, pod, identity)
        assert code == 0, output
        done = await finished(kube, ns, "there")
        assert done["status"]["phase"] == "Succeeded"
        assert done["status"]["digest"] == here["status"]["digest"]
        assert done["status"]["summary"] == here["status"]["summary"]
        report = await kube.get("v1", "configmaps", ns, "there-report")
        assert json.loads(report["data"]["result.json"])["digest"] == here["status"]["digest"]
        assert [(r["kind"], r["uid"]) for r in report["metadata"]["ownerReferences"]] == [
            ("PlanReplay", there["metadata"]["uid"])]
        assert await phases(watch) == [(1, "Pending"), (1, "Running"), (1, "Succeeded")]
        assert [e["type"] for e in await kube.events(ns, involving="there") if e["reason"] == "Succeeded"] == [
            "Normal"]

        # The pod exited 0: the job controller completes the Job.
        assert await kube.play_kubelet(ns, "job-name=there-replay", phase="Succeeded") == 1

        async def complete() -> Obj | None:
            live = await kube.get("batch/v1", "jobs", ns, "there-replay")
            return live if (job_condition(live, "Complete") or {}).get("status") == "True" else None

        completed = await eventually(complete, what="the job controller to complete the Job")
        assert completed["status"]["succeeded"] == 1 and not completed["status"].get("failed")
        assert (await get(kube, ns, "there") or {})["status"]["phase"] == "Succeeded"

        code, output = await run_pod(kube, ns, pod, identity)
        assert code == 0 and "already ran" in output, "a retried pod changes nothing"
        assert await phases(watch) == [(1, "Pending"), (1, "Running"), (1, "Succeeded")]
        with pytest.raises(SystemExit) as usage:
            cli.main(["replay-job", "no-slash"])
        assert usage.value.code == 2
        await kube.release(ns)  # nothing for a later test's operator to find


async def test_a_sharded_replay_runs_as_an_indexed_job_whose_sums_add_up_to_the_single_run(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, traffic: Traffic,
        pg_dsn: str, tmp_path: Path) -> None:
    """``parallelism: 3`` is an Indexed Job of three pods, each given the resolved plan and its index; each sums its
    principals' requests into Postgres, and when the job controller completes the Job the operator adds them up:
    the digest of the run in the operator, byte for byte."""
    ns = await kube.namespace("replays")
    identity = await replay_identity(kube, ns, tmp_path)
    await dsn_secret(kube, ns, pg_dsn)
    spec = {"window": traffic.window, "policy": SERVED_WITH, "tierOverride": {"5m": "1h"}}
    async with start_operator(namespaces=[ns], environment=replay_environment(operator_env)), \
            kube.watching(API_VERSION, REPLAYS, ns, "split") as watch:
        await kube.create(deployed(traffic.alias, ns))
        await kube.create(replay("whole", [traffic.alias], ns=ns, **spec))
        whole = await finished(kube, ns, "whole")
        assert whole["status"]["phase"] == "Succeeded"
        assert await kube.get_or_none("batch/v1", "jobs", ns, "whole-replay") is None, "small: run in the operator"

        await kube.create(replay("split", [traffic.alias], ns=ns, parallelism=SHARDS, **spec))
        split = await running_in_job(kube, ns, "split")
        assert (condition(split, "Reconciling") or {})["message"].endswith("in Job split-replay, 3 shards")
        job = await replay_job(kube, ns, "split-replay")
        assert {k: job["spec"][k] for k in ("completionMode", "completions", "parallelism", "backoffLimitPerIndex",
                                            "maxFailedIndexes")} == {
            "completionMode": "Indexed", "completions": 3, "parallelism": 3, "backoffLimitPerIndex": 2,
            "maxFailedIndexes": 0}
        assert job["metadata"]["annotations"][SHARDS_ANNOTATION] == "3"
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["replay-job", f"{ns}/split", "--shard", "$(JOB_COMPLETION_INDEX)"]
        [plan] = [e["value"] for e in container["env"] if e["name"] == PLAN_ENV]
        resolved = json.loads(plan)
        assert resolved["generation"] == 1 and resolved["requests"] == 9
        assert resolved["spec"]["window"] == traffic.window and resolved["spec"]["policy"] == SERVED_WITH

        # The job controller's three pods, each with its index; run here as processes, one after another.
        pods: dict[str, Obj] = {}
        for _ in range(3):
            pod = await new_pod(kube, ns, job, set(pods))
            pods[pod["metadata"]["name"]] = pod
        indexes = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
                         for p in pods.values())
        assert indexes == [0, 1, 2]
        summed = []
        for pod in pods.values():
            code, output = await run_pod(kube, ns, pod, identity)
            assert code == 0, output
            index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
            words = re.search(rf"shard {index} of 3: summed (\d+) requests", output)
            assert words is not None, output
            summed.append(int(words[1]))
        assert summed == [3, 3, 3], "each shard holds its principal's three requests"
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT shard, shards, requests FROM replay_shards WHERE replay_uid = $1",
                                    split["metadata"]["uid"])
            assert sorted((r["shard"], r["shards"]) for r in rows) == [(0, 3), (1, 3), (2, 3)]
            assert sum(r["requests"] for r in rows) == 9
            # A retried pod adds nothing: its shard's sums are already there.
            code, output = await run_pod(kube, ns, next(iter(pods.values())), identity)
            assert code == 0, output
            assert await conn.fetchval("SELECT count(*) FROM replay_shards WHERE replay_uid = $1",
                                       split["metadata"]["uid"]) == 3
            assert (await get(kube, ns, "split") or {})["status"]["phase"] == "Running", "the operator adds up"

            # Every index succeeded: the job controller completes the Job, and the operator adds up its shards.
            for pod in pods.values():
                await pod_finished(kube, ns, pod, 0)
            done = await finished(kube, ns, "split")
            assert done["status"]["phase"] == "Succeeded", done["status"]
            assert done["status"]["digest"] == whole["status"]["digest"]
            assert done["status"]["summary"] == whole["status"]["summary"]
            report = await kube.get("v1", "configmaps", ns, "split-report")
            assert json.loads(report["data"]["result.json"])["digest"] == whole["status"]["digest"]

            async def deleted() -> bool:  # after the status: sums are never deleted before the result is written
                left: int = await conn.fetchval("SELECT count(*) FROM replay_shards WHERE replay_uid = $1",
                                                split["metadata"]["uid"])
                return left == 0

            await eventually(deleted, within=10, what="the added-up sums to be deleted")
        finally:
            await conn.close()
        assert await phases(watch) == [(1, "Pending"), (1, "Running"), (1, "Succeeded")]

        async def succeeded() -> bool:  # kopf posts events asynchronously
            events = await kube.events(ns, involving="split")
            return [e["type"] for e in events if e["reason"] == "Succeeded"] == ["Normal"]

        await eventually(succeeded, what="the Succeeded event of the sharded run")
        for bad in ("-1", "x", "99999"):
            with pytest.raises(SystemExit) as usage:
                cli.main(["replay-job", f"{ns}/split", "--shard", bad])
            assert usage.value.code == 2
        [pod] = list(pods.values())[:1]  # a pod without its plan (the index the job controller gave it kept)
        pod["spec"]["containers"][0]["env"] = [e for e in pod["spec"]["containers"][0]["env"]
                                               if e["name"] != PLAN_ENV]
        code, output = await run_pod(kube, ns, pod, identity)
        assert (code, output.strip()) == (1, f"{PLAN_ENV} is not a resolved replay plan: "
                                             "JSONDecodeError('Expecting value: line 1 column 1 (char 0)')")

        # A pod reported Succeeded without having written its sums (it never ran): the Job completes, and the
        # operator fails the PlanReplay rather than add up two shards of three.
        await kube.create(replay("gap", [traffic.alias], ns=ns, parallelism=SHARDS, **spec))
        await running_in_job(kube, ns, "gap")
        gap_job = await replay_job(kube, ns, "gap-replay")
        seen: set[str] = set()
        for n in range(SHARDS):
            pod = await new_pod(kube, ns, gap_job, seen)
            seen.add(pod["metadata"]["name"])
            if n:
                code, output = await run_pod(kube, ns, pod, identity)
                assert code == 0, output
            await pod_finished(kube, ns, pod, 0)
        failed = await finished(kube, ns, "gap")
        stalled = condition(failed, "Stalled") or {}
        assert (failed["status"]["phase"], stalled.get("reason")) == ("Failed", "ShardMissing")
        assert re.fullmatch(r"Job gap-replay completed, but shard\(s\) [0-2] of 3 wrote no sums", stalled["message"])
        await kube.release(ns)  # nothing for a later test's operator to find


async def test_a_new_generation_replaces_the_job_and_a_failed_job_fails_the_replay(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, traffic: Traffic,
        tmp_path: Path) -> None:
    ns = await kube.namespace("replays")
    identity = await replay_identity(kube, ns, tmp_path)
    await dsn_secret(kube, ns, f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")  # nothing listens there
    environment = replay_environment(operator_env, PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS="0")
    async with start_operator(namespaces=[ns], environment=environment), \
            kube.watching(API_VERSION, REPLAYS, ns, "doomed") as watch:
        await kube.create(deployed(traffic.alias, ns))
        await kube.create(replay("doomed", [traffic.alias], ns=ns, window=traffic.window, policy=SERVED_WITH))
        await running_in_job(kube, ns, "doomed")
        first = await replay_job(kube, ns, "doomed-replay")
        await new_pod(kube, ns, first)

        await kube.patch(API_VERSION, REPLAYS, ns, "doomed", {"spec": {"tierOverride": {"5m": "24h"}}})
        await running_in_job(kube, ns, "doomed", generation=2)
        second = await replay_job(kube, ns, "doomed-replay", 2)
        assert second["metadata"]["uid"] != first["metadata"]["uid"]
        assert second["metadata"]["annotations"][GENERATION_ANNOTATION] == "2"

        # Play the pods the job controller creates: the first runs and cannot reach Postgres (the Secret's DSN),
        # exits 1 and fails; its retries (the same container, the same Secret) are reported failing the same way,
        # without spending seconds each on running it again. After backoffLimit (2) retries the job controller
        # fails the Job, and the operator fails the PlanReplay, which no pod wrote anything to.
        pod = await new_pod(kube, ns, second)
        code, output = await run_pod(kube, ns, pod, identity)
        assert code == 1 and "the request log is unavailable" in output, output
        seen = {pod["metadata"]["name"]}
        await pod_finished(kube, ns, pod, code, ago=timedelta(minutes=1))
        for _ in range(second["spec"]["backoffLimit"]):
            retry = await new_pod(kube, ns, second, seen)
            assert [{k: c.get(k) for k in ("image", "args", "env")} for c in retry["spec"]["containers"]] == [
                {k: c.get(k) for k in ("image", "args", "env")} for c in pod["spec"]["containers"]]
            assert (await get(kube, ns, "doomed") or {})["status"]["phase"] == "Running", "retries left"
            seen.add(retry["metadata"]["name"])
            await pod_finished(kube, ns, retry, code, ago=timedelta(minutes=1))

        async def job_failed() -> Obj | None:
            live = await kube.get("batch/v1", "jobs", ns, "doomed-replay")
            return live if (job_condition(live, "Failed") or {}).get("status") == "True" else None

        failed_job = await eventually(job_failed, what="the job controller to fail the Job")
        assert failed_job["status"]["failed"] == 3
        assert (job_condition(failed_job, "Failed") or {})["reason"] == "BackoffLimitExceeded"

        obj = await finished(kube, ns, "doomed", generation=2)
        assert obj["status"]["phase"] == "Failed"
        stalled = condition(obj, "Stalled") or {}
        assert stalled["reason"] == "JobFailed" and "BackoffLimitExceeded" in stalled["message"]
        assert await phases(watch) == [(1, "Pending"), (1, "Running"), (2, "Pending"), (2, "Running"), (2, "Failed")]

        async def warned() -> bool:  # kopf posts events asynchronously
            events = await kube.events(ns, involving="doomed")
            return [e["type"] for e in events if e["reason"] == "JobFailed"] == ["Warning"]

        await eventually(warned, what="the JobFailed warning event")
        await kube.release(ns)  # nothing for a later test's operator to find

"""PlanReplay with the real kopf loop against the emulator, over request logs a real proxy wrote
(docs/design.md#replay, #reconciliation).

Three principals each hold the three-turn conversation of test_proxy_billing through the official OpenAI SDK,
and one more request fails upstream; the proxy logs all ten into the session's Postgres. Replaying them under the
policy they were served with must give savings of exactly 0, whether the run happens in the operator or in a Job
(here the test plays the Job's pod by calling ``run_job``, with ``KUBECONFIG`` on the emulator).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

import promptcache.operator.main  # noqa: F401  (registers the handlers with kopf's default registry)
from promptcache.operator import cli
from promptcache.operator.constants import GENERATION_ANNOTATION, WINDOW_ANNOTATION
from promptcache.operator.handlers import planreplay
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.state import OperatorMemo
from promptcache.proxy.storage.requestlog import format_timestamp
from promptcache.proxy.testing.simulator import Simulator

from support.apiserver import (
    DEPLOYED_MODELS,
    GROUP_VERSION,
    JOBS,
    PLAN_REPLAYS,
    EmulatedCluster,
    emulated_cluster,
    eventually,
    running_operator,
)
from support.conversation import openai_turns
from support.proxy import model_config, new_key, running_proxy, settle, unique
from support.resources import condition, model

NS = "replays"
WATCHING = (PLAN_REPLAYS, DEPLOYED_MODELS, JOBS)
SERVED_WITH = {"minPrefixTokens": 10}
"""The cache keys of harness.model_config: the policy the proxy billed the traffic under."""
BOOTSTRAP = {"iterations": 200, "seed": 7}


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
    async with running_proxy(config, tmp_path_factory.mktemp("replay-proxy"), pg_dsn) as proxy:
        for principal in ("acme", "globex", "initech"):
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique(principal)),
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


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with emulated_cluster(namespaces=("default", NS)) as c:
        yield c


def operator_config(pg_dsn: str, **overrides: Any) -> OperatorConfig:
    settings = OperatorSettings(proxy_image="promptcache:test", database_secret="pg/dsn",
                                replay_service_account="promptcache-replay")
    return OperatorConfig(database_url=pg_dsn, manifests=settings, **overrides)


def replay(name: str, models: list[str], **spec: Any) -> dict[str, Any]:
    spec.setdefault("bootstrap", BOOTSTRAP)
    return {"apiVersion": GROUP_VERSION, "kind": "PlanReplay", "metadata": {"name": name, "namespace": NS},
            "spec": {"models": models, **spec}}


def deployed(alias: str) -> dict[str, Any]:
    """The DeployedModel that makes ``alias`` the namespace's (its policy is absent: it stays Stalled, harmlessly)."""
    return model(f"m-{alias}", alias, "serving", ns=NS)


async def get(cluster: EmulatedCluster, name: str) -> dict[str, Any] | None:
    return await cluster.get_or_none(GROUP_VERSION, "planreplays", NS, name)


async def finished(cluster: EmulatedCluster, name: str, generation: int = 1) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await get(cluster, name)
        status = (obj or {}).get("status") or {}
        done = status.get("observedGeneration") == generation and status.get("phase") in planreplay.TERMINAL
        return obj if done else None

    obj: dict[str, Any] = await eventually(check, within=30, what=f"{name} generation {generation} to finish")
    return obj


async def running_in_job(cluster: EmulatedCluster, name: str, generation: int = 1) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        obj = await get(cluster, name)
        status = (obj or {}).get("status") or {}
        running = status.get("observedGeneration") == generation and status.get("phase") == "Running"
        return obj if running and (condition(obj, "Reconciling") or {}).get("reason") == "JobRunning" else None

    obj: dict[str, Any] = await eventually(check, within=30, what=f"{name} generation {generation} to run in a Job")
    return obj


def phases(cluster: EmulatedCluster, name: str) -> list[str]:
    """The phases the operator wrote for ``name``, in order (from the emulator's request log)."""
    return [r.data["status"]["phase"] for r in list(cluster.emulator)
            if r.resource is not None and r.resource.plural == "planreplays" and r.subresource == "status"
            and r.name == name and r.method.value.upper() == "PATCH" and "phase" in r.data["status"]]


async def test_in_process_replay_runs_once_per_generation(
        cluster: EmulatedCluster, traffic: Traffic, pg_dsn: str) -> None:
    policy = {"apiVersion": GROUP_VERSION, "kind": "CachePolicy", "metadata": {"name": "same", "namespace": NS},
              "spec": {**SERVED_WITH, "redis": {"maxMemory": "64mb"}}}
    async with running_operator(cluster, memo=OperatorMemo(config=operator_config(pg_dsn)), namespaces=[NS],
                                watching=WATCHING):
        await cluster.create(deployed(traffic.alias))
        await cluster.create(policy)
        await cluster.create(replay("inline", [traffic.alias], window=traffic.window, policy=SERVED_WITH))
        await cluster.create(replay("by-ref", [traffic.alias], window=traffic.window, cachePolicyRef={"name": "same"}))
        obj = await finished(cluster, "inline")
        status = obj["status"]
        assert status["phase"] == "Succeeded", status
        assert phases(cluster, "inline") == ["Pending", "Running", "Succeeded"]

        # Replayed under the policy it was billed under, the traffic costs exactly what it was billed.
        summary = status["summary"]  # camelCase in status, as in any Kubernetes API
        assert summary["requests"] == 9
        assert Decimal(summary["baselineCost"]) == traffic.billed
        assert (summary["projectedCost"], summary["savings"]) == (summary["baselineCost"], "0")
        assert Decimal(summary["savingsPct"]) == 0 and summary["hitRate"] == "0.666667"  # turns 2 and 3 read
        assert set(summary) == {"requests", "baselineCost", "projectedCost", "listCost", "savings", "savingsPct",
                                "readTokenRatio", "hitRate", "creationCost"}
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
        cm = await cluster.get("v1", "configmaps", NS, "inline-report")
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
        assert await cluster.get_or_none("batch/v1", "jobs", NS, "inline-replay") is None

        # The same policy by reference (its redis keys are not part of a projection): the same result.
        by_ref = await finished(cluster, "by-ref")
        assert by_ref["status"]["digest"] == status["digest"]

        # A new generation runs again: 5m markers projected as 1h cost more to write.
        await cluster.patch(GROUP_VERSION, "planreplays", NS, "inline", {"spec": {"tierOverride": {"5m": "1h"}}})
        second = (await finished(cluster, "inline", generation=2))["status"]
        assert second["phase"] == "Succeeded" and second["digest"] != status["digest"]
        assert Decimal(second["summary"]["savings"]) < 0 and Decimal(second["summary"]["savingsPct"]) < 0
        cm = await cluster.get("v1", "configmaps", NS, "inline-report")
        assert json.loads(cm["data"]["result.json"])["params"]["tier_override"] == {"5m": "1h"}
        assert cm["metadata"]["annotations"][GENERATION_ANNOTATION] == "2"
        assert phases(cluster, "inline") == ["Pending", "Running", "Succeeded"] * 2

        # Status-only and metadata-only changes run nothing.
        await cluster.patch_status(GROUP_VERSION, "planreplays", NS, "inline", {"caveats": ["checked by a human"]})
        await cluster.patch(GROUP_VERSION, "planreplays", NS, "inline", {"metadata": {"labels": {"team": "billing"}}})
        await cluster.create(replay("later", [traffic.alias], window=traffic.window, policy=SERVED_WITH))
        await finished(cluster, "later")  # a later event, handled after the ones above
        after = (await get(cluster, "inline") or {})["status"]
        assert (after["caveats"], after["finishedAt"], after["digest"]) == (
            ["checked by a human"], second["finishedAt"], second["digest"])
        assert phases(cluster, "inline") == ["Pending", "Running", "Succeeded"] * 2

        events = await cluster.events(NS, involving="inline")
        assert [e["reason"] for e in events if e["reason"] == "Succeeded"] == ["Succeeded", "Succeeded"]


async def test_bad_specs_fail_with_a_reason(cluster: EmulatedCluster, pg_dsn: str) -> None:
    alias = unique("idle")  # deployed, but never requested
    window = {"start": "2001-01-01T00:00:00Z", "end": "2001-01-02T00:00:00Z"}
    cases = {
        "unknown-model": (replay("unknown-model", ["no-such-model"], window=window, policy={}),
                          "UnknownModel", "no-such-model"),
        "empty-window": (replay("empty-window", [alias], window=window, policy={}), "EmptyWindow",
                         "no 2xx requests"),
        "backwards": (replay("backwards", [alias], window={"start": window["end"], "end": window["start"]},
                             policy={}), "EmptyWindow", "is not before"),
        "bad-policy": (replay("bad-policy", [alias], lastHours=1, policy={"enabledTtls": ["1h"], "defaultTtl": "5m"}),
                       "InvalidPolicy", "defaultTtl"),
        "missing-ref": (replay("missing-ref", [alias], lastHours=1, cachePolicyRef={"name": "nowhere"}),
                        "CachePolicyNotFound", f"CachePolicy {NS}/nowhere"),
        "two-windows": (replay("two-windows", [alias], window=window, lastHours=1, policy={}), "InvalidSpec",
                        "exactly one of window and lastHours"),
    }
    async with running_operator(cluster, memo=OperatorMemo(config=operator_config(pg_dsn)), namespaces=[NS],
                                watching=WATCHING):
        await cluster.create(deployed(alias))
        for obj, _, _ in cases.values():
            await cluster.create(obj)
        for name, (_, reason, words) in cases.items():
            obj = await finished(cluster, name)
            assert obj["status"]["phase"] == "Failed", (name, obj["status"])
            stalled = condition(obj, "Stalled") or {}
            assert (stalled.get("status"), stalled.get("reason")) == ("True", reason), name
            assert words in stalled["message"], (name, stalled["message"])
            assert (condition(obj, "Ready") or {}).get("status") == "False"
            assert "summary" not in obj["status"] and "digest" not in obj["status"]
            async def warned(name: str = name, reason: str = reason) -> bool:  # kopf posts events asynchronously
                events = await cluster.events(NS, involving=name)
                return [e["type"] for e in events if e["reason"] == reason] == ["Warning"]

            await eventually(warned, what=f"the {reason} warning event for {name}")
        assert await cluster.list("v1", "configmaps", NS) == []
        assert await cluster.list("batch/v1", "jobs", NS) == []


async def test_large_replays_run_as_a_job_with_the_same_result(
        cluster: EmulatedCluster, traffic: Traffic, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"window": traffic.window, "policy": SERVED_WITH, "tierOverride": {"5m": "1h"}}
    # Ten requests are logged, but only the nine that succeeded count towards the threshold.
    async with running_operator(cluster, memo=OperatorMemo(
            config=operator_config(pg_dsn, inline_replay_max_requests=9)),
                                namespaces=[NS], watching=WATCHING):
        await cluster.create(deployed(traffic.alias))
        await cluster.create(replay("here", [traffic.alias], **spec))
        here = await finished(cluster, "here")
    assert here["status"]["phase"] == "Succeeded"
    assert (condition(here, "Ready") or {})["reason"] == "Succeeded"
    assert await cluster.get_or_none("batch/v1", "jobs", NS, "here-replay") is None

    config = operator_config(pg_dsn, inline_replay_max_requests=0)
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(replay("there", [traffic.alias], **spec))
        there = await running_in_job(cluster, "there")
        job = await cluster.get("batch/v1", "jobs", NS, "there-replay")
        assert [(r["kind"], r["uid"]) for r in job["metadata"]["ownerReferences"]] == [
            ("PlanReplay", there["metadata"]["uid"])]
        assert job["metadata"]["annotations"][GENERATION_ANNOTATION] == "1"
        assert job["spec"]["backoffLimit"] == 2 and job["spec"]["ttlSecondsAfterFinished"] > 0
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "promptcache-replay"
        [container] = pod["containers"]
        assert container["image"] == "promptcache:test"
        assert container["args"] == ["replay-job", f"{NS}/there"]
        assert container["env"] == [{"name": "PROMPTCACHE_DATABASE_URL",
                                     "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}}]
        security = container["securityContext"]
        assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
        assert not security["allowPrivilegeEscalation"] and security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["limits"]["memory"]
        assert "startedAt" in there["status"] and "summary" not in there["status"]
        assert (await get(cluster, "here") or {})["status"]["finishedAt"] == here["status"]["finishedAt"], \
            "the restarted operator does not re-run a finished generation"

        # The Job's pod (its command line): the same code, patching the status itself.
        monkeypatch.setenv("PROMPTCACHE_DATABASE_URL", pg_dsn)
        assert await asyncio.to_thread(cli.main, container["args"]) == 0
        done = await finished(cluster, "there")
        assert done["status"]["phase"] == "Succeeded"
        assert done["status"]["digest"] == here["status"]["digest"]
        assert done["status"]["summary"] == here["status"]["summary"]
        report = await cluster.get("v1", "configmaps", NS, "there-report")
        assert json.loads(report["data"]["result.json"])["digest"] == here["status"]["digest"]
        assert phases(cluster, "there") == ["Pending", "Running", "Succeeded"]
        assert [e["type"] for e in await cluster.events(NS, involving="there") if e["reason"] == "Succeeded"] == [
            "Normal"]
        assert await asyncio.to_thread(planreplay.run_job, NS, "there") == 0, "a retried pod changes nothing"
        assert phases(cluster, "there") == ["Pending", "Running", "Succeeded"]
        with pytest.raises(SystemExit) as usage:
            cli.main(["replay-job", "no-slash"])
        assert usage.value.code == 2


async def test_a_new_generation_replaces_the_job_and_a_failed_job_fails_the_replay(
        cluster: EmulatedCluster, traffic: Traffic, pg_dsn: str) -> None:
    config = operator_config(pg_dsn, inline_replay_max_requests=0)
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(deployed(traffic.alias))
        await cluster.create(replay("doomed", [traffic.alias], window=traffic.window, policy=SERVED_WITH))
        await running_in_job(cluster, "doomed")
        first = await cluster.get("batch/v1", "jobs", NS, "doomed-replay")

        await cluster.patch(GROUP_VERSION, "planreplays", NS, "doomed", {"spec": {"tierOverride": {"5m": "24h"}}})
        await running_in_job(cluster, "doomed", generation=2)
        second = await cluster.get("batch/v1", "jobs", NS, "doomed-replay")
        assert second["metadata"]["uid"] != first["metadata"]["uid"]
        assert second["metadata"]["annotations"][GENERATION_ANNOTATION] == "2"

        # Play the Job controller: the pod failed past its backoff limit, without writing a result.
        await cluster.patch_status("batch/v1", "jobs", NS, "doomed-replay", {"failed": 3, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]})
        obj = await finished(cluster, "doomed", generation=2)
        assert obj["status"]["phase"] == "Failed"
        stalled = condition(obj, "Stalled") or {}
        assert stalled["reason"] == "JobFailed" and "BackoffLimitExceeded" in stalled["message"]
        async def warned() -> bool:  # kopf posts events asynchronously
            events = await cluster.events(NS, involving="doomed")
            return [e["type"] for e in events if e["reason"] == "JobFailed"] == ["Warning"]

        await eventually(warned, what="the JobFailed warning event")

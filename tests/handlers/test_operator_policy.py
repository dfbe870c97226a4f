"""CachePolicy reconciliation by ``promptcache operator`` as a process against the real API server, with Postgres and
Redis (docs/design.md#reconciliation, #testing).

Tariffs are append-only per bound model; Redis settings land on a real server (a private one, so
the shared Redis is never reconfigured) or become a condition when the server refuses CONFIG;
and a change reaches a running proxy over Redis within two seconds, without a restart.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import yaml

from promptcache.operator.constants import API_VERSION
from promptcache.proxy.domain.tokens import TiktokenTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

from support.cluster import Cluster, eventually
from support.faults import PrivateRedis, ledger_rows, wait_until
from support.operator_process import OperatorEnvironment, StartOperator
from support.proxy import new_key, running_proxy, settle, unique
from support.resources import condition, model, policy, tariffs


async def observed(kube: Cluster, ns: str, plural: str, name: str) -> dict[str, Any] | None:
    """The object once its status describes its current generation."""
    obj = await kube.get_or_none(API_VERSION, plural, ns, name)
    if obj and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


async def test_policy_edits_append_tariffs_rerender_models_and_configure_redis(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, pg_dsn: str) -> None:
    redis = PrivateRedis()
    await redis.start()
    alias = unique("llama")
    ns = await kube.namespace("llm")
    try:
        environment = dataclasses.replace(operator_env, redis_url=redis.url)
        async with start_operator(namespaces=[ns], environment=environment):
            await kube.create(policy("standard", ns=ns, redis={"maxMemory": "64mb", "evictionPolicy": "volatile-ttl"}))
            await kube.create(model("llama", alias, "standard", ns=ns))
            await eventually(lambda: observed(kube, ns, "deployedmodels", "llama"), what="the model's reconcile")
            for multiplier in ("1.5", "2.0"):
                await kube.patch(API_VERSION, "cachepolicies", ns, "standard",
                                 {"spec": {"writeMultipliers": {"5m": multiplier}}})

                async def rerendered(expected: str = multiplier) -> bool:
                    cm = await kube.get("v1", "configmaps", ns, "llama-proxy-config")
                    cache = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]["cache"]
                    active = [t for t in await tariffs(pg_dsn, alias) if t["valid_until"] is None]
                    return bool(cache.get("writeMultipliers", {}).get("5m") == expected
                                and active and active[0]["write_multiplier_5m"] == Decimal(expected)
                                and await observed(kube, ns, "cachepolicies", "standard"))

                await eventually(rerendered, what=f"the model re-rendered with 5m x{multiplier}")
            history = await tariffs(pg_dsn, alias)
            assert [(t["write_multiplier_5m"], t["valid_until"] is None) for t in history] == [
                (Decimal("1.25"), False), (Decimal("1.5"), False), (Decimal("2.0"), True)]
            assert all(a["valid_until"] == b["valid_from"] for a, b in itertools.pairwise(history))

            async def versions_reported() -> dict[str, Any] | None:
                obj = await kube.get_or_none(API_VERSION, "cachepolicies", ns, "standard")
                status = (obj or {}).get("status") or {}
                return obj if status.get("tariffVersions") == {alias: history[-1]["version"]} else None

            obj = await eventually(versions_reported, what="the policy's status to name the model's tariff version")
            status = obj["status"]
            assert status["boundModels"] == ["llama"]
            assert status["redisApplied"] is True
            assert (condition(obj, "RedisConfigured") or {})["status"] == "True"

            async def model_reports() -> bool:  # the model's own status patch follows its reconcile
                llama = await kube.get(API_VERSION, "deployedmodels", ns, "llama")
                return bool((llama.get("status") or {}).get("tariffVersion") == history[-1]["version"])

            await eventually(model_reports, what="the model's status to name its tariff version")
            client = redis.client()
            try:
                found: Any = {**await client.config_get("maxmemory"), **await client.config_get("maxmemory-policy")}
                assert found == {"maxmemory": "67108864", "maxmemory-policy": "volatile-ttl"}
            finally:
                await client.aclose()
            await kube.release(ns)  # nothing for a later test's operator to find
    finally:
        await redis.stop()


async def test_redis_refusing_config_is_a_condition_not_a_crash(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment) -> None:
    redis = PrivateRedis("--rename-command", "CONFIG", "")
    await redis.start()
    ns = await kube.namespace("llm")
    try:
        environment = dataclasses.replace(operator_env, redis_url=redis.url)
        async with start_operator(namespaces=[ns], environment=environment):
            await kube.create(policy("locked", ns=ns, redis={"maxMemory": "64mb"}))
            obj = await eventually(lambda: observed(kube, ns, "cachepolicies", "locked"),
                                   what="the policy's reconcile")
            assert obj["status"]["redisApplied"] is False
            assert "refused CONFIG SET" in obj["status"]["redisMessage"]
            redis_condition = condition(obj, "RedisConfigured") or {}
            assert (redis_condition["status"], redis_condition["reason"]) == ("False", "ConfigRefused")
            assert (condition(obj, "Ready") or {})["status"] == "True"  # the policy itself still applies

            async def warned() -> bool:  # kopf posts events asynchronously
                events = await kube.events(ns, involving="locked")
                return any(e["reason"] == "RedisConfigRefused" and e["type"] == "Warning" for e in events)

            await eventually(warned, what="the RedisConfigRefused warning event")
            await kube.create(policy("after", ns=ns))  # the operator is still running
            assert await eventually(lambda: observed(kube, ns, "cachepolicies", "after"), what="a later policy")
            await kube.release(ns)  # nothing for a later test's operator to find
    finally:
        await redis.stop()


async def test_running_proxy_bills_a_multiplier_change_within_two_seconds(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, pg_dsn: str,
        tmp_path: Path) -> None:
    """The proxy runs here (no kubelet), from the config the operator rendered into the ConfigMap, on the same
    Redis and key prefix the operator announces on; the ConfigMap it was started from never changes."""
    alias, principal = unique("live"), unique("tenant")
    ns = await kube.namespace("llm")
    assert operator_env.redis_url is not None
    simulator = Simulator(SimulatorSettings(TiktokenTokenizer("cl100k_base")))
    async with serving(simulator.app()) as upstream, start_operator(namespaces=[ns]):
        await kube.create(policy("live", ns=ns, minPrefixTokens=16))
        spec = model("live", alias, "live", ns=ns)
        spec["spec"]["upstream"]["url"] = upstream + "/v1"
        await kube.create(spec)
        await eventually(lambda: observed(kube, ns, "deployedmodels", "live"), what="the model's reconcile")
        cm = await kube.get("v1", "configmaps", ns, "live-proxy-config")
        rendered = yaml.safe_load(cm["data"]["proxy.yaml"])
        async with running_proxy(rendered, tmp_path, pg_dsn, operator_env.redis_url, manage_tariffs=False,
                                 redis_prefix=operator_env.redis_prefix) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                        max_retries=0)

            async def ask(topic: str) -> None:
                text = f"Write a long answer about {topic}. " * 20
                messages: Any = [{"role": "user", "content": [
                    {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}]
                await client.chat.completions.create(model=alias, messages=messages)
                await settle(proxy)

            await ask("tides")
            await kube.patch(API_VERSION, "cachepolicies", ns, "live", {"spec": {"writeMultipliers": {"5m": "2.0"}}})
            changed_at = time.monotonic()

            async def picked_up() -> bool:
                runtime = proxy.server.proxy.runtimes.models[alias]
                return runtime.config.policy.write_multipliers["5m"] == Decimal("2.0") and \
                    runtime.tariff.write_multipliers["5m"] == Decimal("2.0")

            await wait_until(picked_up, "the running proxy to apply the new multiplier", within=5)
            assert time.monotonic() - changed_at < 2.0
            cm_after = await kube.get("v1", "configmaps", ns, "live-proxy-config")
            assert yaml.safe_load(proxy.config_path.read_text()) == rendered != yaml.safe_load(
                cm_after["data"]["proxy.yaml"]), "the change came over Redis, not through the config file"
            await ask("glaciers")
            first, second = await ledger_rows(pg_dsn, principal)
            versions = {t["version"]: t["write_multiplier_5m"] for t in await tariffs(pg_dsn, alias)}
            assert versions[first["tariff_version"]] == Decimal("1.25")
            assert versions[second["tariff_version"]] == Decimal("2.0")
            for row, multiplier in ((first, Decimal("1.25")), (second, Decimal("2.0"))):
                # Nothing read; the prompt is written at 5m except the template tokens; $3 in, $15 out.
                assert row["read_tokens"] == 0 and row["creation_5m"] > 0
                expected = (Decimal(row["uncached_tokens"]) * 3 + Decimal(row["creation_5m"]) * 3 * multiplier
                            + Decimal(row["completion_tokens"]) * 15) / 1_000_000
                assert row["cost"] == expected
        await kube.release(ns)  # nothing for a later test's operator to find

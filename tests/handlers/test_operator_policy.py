"""CachePolicy reconciliation with the real kopf loop, Postgres and Redis (docs/design.md#reconciliation).

Tariffs are append-only per bound model; Redis settings land on a real server (a private one, so
the shared Redis is never reconfigured) or become a condition when the server refuses CONFIG;
and a change reaches a running proxy over Redis within two seconds, without a restart.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.state import OperatorMemo
from promptcache.proxy.domain.tokens import TiktokenTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

from support.apiserver import (
    CACHE_POLICIES,
    DEPLOYED_MODELS,
    DEPLOYMENTS,
    GROUP_VERSION,
    EmulatedCluster,
    emulated_cluster,
    eventually,
    running_operator,
)
from support.faults import PrivateRedis, ledger_rows, wait_until
from support.proxy import new_key, running_proxy, settle, unique
from support.resources import NS, condition, model, policy, tariffs

WATCHING = (DEPLOYED_MODELS, CACHE_POLICIES, DEPLOYMENTS)


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with emulated_cluster(namespaces=("default", NS)) as c:
        yield c


def operator_config(pg_dsn: str, redis_url: str) -> OperatorConfig:
    prefix = f"{unique('optest')}:"
    return OperatorConfig(database_url=pg_dsn, redis_url=redis_url,
                          manifests=OperatorSettings(redis_url=redis_url, redis_prefix=prefix))


async def get_policy(cluster: EmulatedCluster, name: str) -> dict[str, Any] | None:
    return await cluster.get_or_none(GROUP_VERSION, "cachepolicies", NS, name)


async def observed(cluster: EmulatedCluster, plural: str, name: str) -> dict[str, Any] | None:
    obj = await cluster.get_or_none(GROUP_VERSION, plural, NS, name)
    if obj and obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]:
        return obj
    return None


async def test_policy_edits_append_tariffs_rerender_models_and_configure_redis(
        cluster: EmulatedCluster, pg_dsn: str) -> None:
    redis = PrivateRedis()
    await redis.start()
    alias = unique("llama")
    try:
        config = operator_config(pg_dsn, redis.url)
        async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
            await cluster.create(policy("standard", redis={"maxMemory": "64mb", "evictionPolicy": "volatile-ttl"}))
            await cluster.create(model("llama", alias, "standard"))
            await eventually(lambda: observed(cluster, "deployedmodels", "llama"), what="the model's reconcile")
            for multiplier in ("1.5", "2.0"):
                await cluster.patch(GROUP_VERSION, "cachepolicies", NS, "standard",
                                    {"spec": {"writeMultipliers": {"5m": multiplier}}})

                async def rerendered(expected: str = multiplier) -> bool:
                    cm = await cluster.get("v1", "configmaps", NS, "llama-proxy-config")
                    cache = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]["cache"]
                    active = [t for t in await tariffs(pg_dsn, alias) if t["valid_until"] is None]
                    return bool(cache.get("writeMultipliers", {}).get("5m") == expected
                                and active and active[0]["write_multiplier_5m"] == Decimal(expected)
                                and await observed(cluster, "cachepolicies", "standard"))

                await eventually(rerendered, what=f"the model re-rendered with 5m x{multiplier}")
            history = await tariffs(pg_dsn, alias)
            assert [(t["write_multiplier_5m"], t["valid_until"] is None) for t in history] == [
                (Decimal("1.25"), False), (Decimal("1.5"), False), (Decimal("2.0"), True)]
            assert all(a["valid_until"] == b["valid_from"] for a, b in itertools.pairwise(history))

            async def versions_reported() -> bool:
                status = (await get_policy(cluster, "standard") or {}).get("status", {})
                return bool(status.get("tariffVersions") == {alias: history[-1]["version"]})

            await eventually(versions_reported, what="the policy's status to name the model's tariff version")
            status = (await get_policy(cluster, "standard") or {})["status"]
            assert status["boundModels"] == ["llama"]
            assert status["redisApplied"] is True
            assert (condition(await get_policy(cluster, "standard"), "RedisConfigured") or {})["status"] == "True"
            client = redis.client()
            try:
                found: Any = {**await client.config_get("maxmemory"), **await client.config_get("maxmemory-policy")}
                assert found == {"maxmemory": "67108864", "maxmemory-policy": "volatile-ttl"}
            finally:
                await client.aclose()
    finally:
        await redis.stop()


async def test_redis_refusing_config_is_a_condition_not_a_crash(cluster: EmulatedCluster, pg_dsn: str) -> None:
    redis = PrivateRedis("--rename-command", "CONFIG", "")
    await redis.start()
    try:
        config = operator_config(pg_dsn, redis.url)
        async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
            await cluster.create(policy("locked", redis={"maxMemory": "64mb"}))
            obj = await eventually(lambda: observed(cluster, "cachepolicies", "locked"), what="the policy's reconcile")
            assert obj is not None
            assert obj["status"]["redisApplied"] is False
            assert "refused CONFIG SET" in obj["status"]["redisMessage"]
            redis_condition = condition(obj, "RedisConfigured") or {}
            assert (redis_condition["status"], redis_condition["reason"]) == ("False", "ConfigRefused")
            assert (condition(obj, "Ready") or {})["status"] == "True"  # the policy itself still applies
            async def warned() -> bool:  # kopf posts events asynchronously
                events = await cluster.events(NS, involving="locked")
                return any(e["reason"] == "RedisConfigRefused" and e["type"] == "Warning" for e in events)

            await eventually(warned, what="the RedisConfigRefused warning event")
            await cluster.create(policy("after"))  # the operator is still running
            assert await eventually(lambda: observed(cluster, "cachepolicies", "after"), what="a later policy")
    finally:
        await redis.stop()


async def test_running_proxy_bills_a_multiplier_change_within_two_seconds(
        cluster: EmulatedCluster, pg_dsn: str, redis_url: str, tmp_path: Path) -> None:
    alias, principal = unique("live"), unique("tenant")
    config = operator_config(pg_dsn, redis_url)
    simulator = Simulator(SimulatorSettings(TiktokenTokenizer("cl100k_base")))
    async with serving(simulator.app()) as upstream, \
            running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(policy("live", minPrefixTokens=16))
        spec = model("live", alias, "live")
        spec["spec"]["upstream"]["url"] = upstream + "/v1"
        await cluster.create(spec)
        await eventually(lambda: observed(cluster, "deployedmodels", "live"), what="the model's reconcile")
        cm = await cluster.get("v1", "configmaps", NS, "live-proxy-config")
        rendered = yaml.safe_load(cm["data"]["proxy.yaml"])
        async with running_proxy(rendered, tmp_path, pg_dsn, redis_url, manage_tariffs=False,
                                 redis_prefix=config.manifests.redis_prefix) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                        max_retries=0)

            async def ask(topic: str) -> None:
                text = f"Write a long answer about {topic}. " * 20
                messages: Any = [{"role": "user", "content": [
                    {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}]
                await client.chat.completions.create(model=alias, messages=messages)
                await settle(proxy)

            await ask("tides")
            await cluster.patch(GROUP_VERSION, "cachepolicies", NS, "live",
                                {"spec": {"writeMultipliers": {"5m": "2.0"}}})
            changed_at = time.monotonic()

            async def picked_up() -> bool:
                runtime = proxy.server.proxy.runtimes.models[alias]
                return runtime.config.policy.write_multipliers["5m"] == Decimal("2.0") and \
                    runtime.tariff.write_multipliers["5m"] == Decimal("2.0")

            await wait_until(picked_up, "the running proxy to apply the new multiplier", within=5)
            assert time.monotonic() - changed_at < 2.0
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


"""An operator killed (SIGKILL) at any point converges on restart (docs/design.md#reconciliation): after a restart
there is exactly one ConfigMap, Deployment and Service per model, exactly one active tariff per model (and no
version more than the policy's changes asked for), and the statuses name that tariff.

The operator runs as a process against the real API server; each case kills it right after a point the test can
observe from outside. Two points lie between steps of one reconcile, where nothing outside changes: there the
operator's Redis goes through a relay that holds Redis's replies, so the reconcile stops, deterministically, at
its next Redis call (after the tariff is written, before the model's status is; or in a policy's reconcile,
before it touches its models) until it is killed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml

from promptcache.operator.constants import API_VERSION, MODELS, POLICIES, REVISION_ANNOTATION

from support.cluster import Cluster, eventually
from support.faults import Relay
from support.operator_process import OperatorEnvironment, OperatorProcess, StartOperator
from support.proxy import unique
from support.resources import model, policy, tariffs

MODEL_NAMES = ("alpha", "beta")
HOLD = 3600.0
"""Seconds the relay holds each Redis reply once told to: for ever, as far as a test is concerned."""
OWNED = (("v1", "configmaps", "{}-proxy-config"), ("apps/v1", "deployments", "{}-proxy"),
         ("v1", "services", "{}-proxy"))


@pytest.fixture
async def redis_relay(redis_url: str) -> AsyncIterator[Relay]:
    parts = urlsplit(redis_url)
    relay = await Relay(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    try:
        yield relay
    finally:
        await relay.close()


async def get_model(kube: Cluster, ns: str, name: str) -> dict[str, Any]:
    return await kube.get(API_VERSION, MODELS, ns, name)


async def active_tariffs(pg_dsn: str, alias: str) -> list[asyncpg.Record]:
    return [t for t in await tariffs(pg_dsn, alias) if t["valid_until"] is None]


async def reconciled(kube: Cluster, ns: str, pg_dsn: str, aliases: dict[str, str]) -> bool:
    """Every model's status describes its generation and names its one active tariff."""
    for name, alias in aliases.items():
        status = (await get_model(kube, ns, name)).get("status") or {}
        active = await active_tariffs(pg_dsn, alias)
        if not active or status.get("tariffVersion") != active[-1]["version"]:
            return False
    return True


async def start_models(kube: Cluster, ns: str, aliases: dict[str, str]) -> None:
    """The policy first, reconciled, then the models: a model's first reconcile is then its only one."""

    async def policy_observed() -> bool:
        obj = await kube.get(API_VERSION, POLICIES, ns, "standard")
        return bool((obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"])

    await kube.create(policy("standard", ns=ns))
    await eventually(policy_observed, what="the policy's reconcile")
    for name, alias in aliases.items():
        await kube.create(model(name, alias, "standard", ns=ns))


async def kill_after(point: str, kube: Cluster, ns: str, pg_dsn: str, aliases: dict[str, str],
                     op: OperatorProcess, relay: Relay) -> str:
    """Drive the operator to ``point`` and kill it there; returns the 5m write multiplier the models must end at."""
    await start_models(kube, ns, aliases)
    if point in ("configmap", "deployment"):
        group_version, plural, pattern = OWNED[0] if point == "configmap" else OWNED[1]

        async def created() -> bool:
            names = {o["metadata"]["name"] for o in await kube.list(group_version, plural, ns)}
            return {pattern.format(m) for m in aliases} <= names

        await eventually(created, what=f"every model's {point}")
        await op.kill()
        return "1.25"
    if point == "tariff-before-status":
        relay.delay = HOLD  # before any model's reconcile reaches Redis: each stops there

        async def tariffs_written() -> bool:
            return relay.held > 0 and all([await active_tariffs(pg_dsn, a) for a in aliases.values()])

        await eventually(tariffs_written, what="every model's tariff, and a reconcile held on Redis")
        await op.kill()
        for name in aliases:
            assert "tariffVersion" not in ((await get_model(kube, ns, name)).get("status") or {}), \
                f"{name}'s reconcile got past Redis: this case did not kill where it means to"
        return "1.25"
    # A policy change, on converged models.
    await eventually(lambda: reconciled(kube, ns, pg_dsn, aliases), what="the models' first reconcile")
    if point == "policy-change-before-touch":
        relay.delay = HOLD
        await kube.patch(API_VERSION, POLICIES, ns, "standard", {"spec": {"writeMultipliers": {"5m": "2.0"}}})
        await eventually(lambda: relay.held > 0, what="the policy's reconcile held on Redis")
        await op.kill()
        for name in aliases:
            annotations = (await get_model(kube, ns, name))["metadata"].get("annotations") or {}
            assert REVISION_ANNOTATION not in annotations, f"{name} was touched: this case killed too late"
        return "2.0"
    assert point == "policy-change-after-touch", point
    await kube.patch(API_VERSION, POLICIES, ns, "standard", {"spec": {"writeMultipliers": {"5m": "2.0"}}})

    async def touched() -> bool:
        for name in aliases:
            annotations = (await get_model(kube, ns, name))["metadata"].get("annotations") or {}
            if annotations.get(REVISION_ANNOTATION) != "2":
                return False
        return True

    await eventually(touched, what="the policy's reconcile to touch its models")
    await op.kill()
    return "2.0"


@pytest.mark.parametrize("point", ["configmap", "deployment", "tariff-before-status", "policy-change-before-touch",
                                   "policy-change-after-touch"])
async def test_killed_operator_converges_on_restart_with_one_of_each(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, redis_relay: Relay,
        pg_dsn: str, point: str) -> None:
    ns = await kube.namespace("crash")
    aliases = {name: unique(f"crash-{name}") for name in MODEL_NAMES}
    through_relay = dataclasses.replace(operator_env, redis_url=f"redis://127.0.0.1:{redis_relay.port}/0")
    async with start_operator(namespaces=[ns], environment=through_relay) as op:
        multiplier = await kill_after(point, kube, ns, pg_dsn, aliases, op, redis_relay)

    async with start_operator(namespaces=[ns]):  # straight to Redis

        async def converged() -> bool:
            if not await reconciled(kube, ns, pg_dsn, aliases):
                return False
            for name, alias in aliases.items():
                [active] = await active_tariffs(pg_dsn, alias)
                cm = await kube.get("v1", "configmaps", ns, f"{name}-proxy-config")
                cache = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]["cache"]
                if active["write_multiplier_5m"] != Decimal(multiplier) or \
                        cache.get("writeMultipliers", {}).get("5m", "1.25") != multiplier:
                    return False
            return True

        await eventually(converged, within=30, what="the restarted operator to converge")

        for group_version, plural, pattern in OWNED:
            items = await kube.list(group_version, plural, ns)
            assert sorted(i["metadata"]["name"] for i in items) == sorted(pattern.format(m) for m in aliases), plural
            for item in items:
                owner = (await get_model(kube, ns, item["metadata"]["labels"]["promptcache.io/deployedmodel"]))
                assert [(r["kind"], r["uid"]) for r in item["metadata"]["ownerReferences"]] == [
                    ("DeployedModel", owner["metadata"]["uid"])]
        expected = [(Decimal("1.25"), True)] if multiplier == "1.25" else [(Decimal("1.25"), False),
                                                                           (Decimal("2.0"), True)]
        versions = {}
        for alias in aliases.values():
            history = await tariffs(pg_dsn, alias)
            assert [(t["write_multiplier_5m"], t["valid_until"] is None) for t in history] == expected, alias
            versions[alias] = history[-1]["version"]

        async def policy_reports() -> bool:
            obj = await kube.get(API_VERSION, POLICIES, ns, "standard")
            return bool((obj.get("status") or {}).get("tariffVersions") == versions)

        await eventually(policy_reports, what="the policy's status to name each model's active tariff")
        await kube.release(ns)  # nothing for a later test's operator to find

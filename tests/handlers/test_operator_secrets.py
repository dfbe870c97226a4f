"""The proxies' Secrets copied into model namespaces (docs/design.md#secrets-in-model-namespaces), by the real
operator with the chart's RBAC for ``database.proxySecret.copy`` and ``redis.existingSecret``, against the real API
server: copies made and kept equal to their source, a person's own Secret left alone, a missing source stalls the
model until it appears, the Redis password never in a pod spec, and no request of the operator's refused."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from promptcache.operator.constants import API_VERSION, COPIED_FROM_ANNOTATION

from support.cluster import Cluster, eventually
from support.controlplane import OPERATOR_NAMESPACE
from support.operator_process import (
    TEST_IMAGE,
    OperatorEnvironment,
    audited,
    operator_identity,
    render_chart,
    running_operator,
)
from support.proxy import unique
from support.resources import condition, model, policy

REDIS_URL = "redis://:s3cret-password@redis.example:6379/0"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {key: b64(value) for key, value in data.items()}}


async def test_the_proxies_secrets_are_copied_into_model_namespaces_and_kept_equal(
        kube: Cluster, operator_env: OperatorEnvironment, tmp_path: Path) -> None:
    dsn, redis = unique("pcdsn"), unique("pcredis")
    values = {"database": {"proxySecret": {"name": dsn, "key": "dsn", "copy": True}},
              "redis": {"existingSecret": redis, "secretKey": "url"}}
    identity = await operator_identity(kube, tmp_path, release=unique("pcsec"), values=values)
    await kube.create(secret(dsn, OPERATOR_NAMESPACE, dsn="postgresql://proxy:pw@db:5432/promptcache"))
    await kube.create(secret(redis, OPERATOR_NAMESPACE, url=REDIS_URL))
    copied, by_hand, late = await kube.namespace("copied"), await kube.namespace("hand"), await kube.namespace("late")
    await kube.create(secret(dsn, by_hand, dsn="postgresql://theirs@elsewhere/db"))
    env = dataclasses.replace(operator_env, database_secret=f"{dsn}/dsn", extra={
        "PROMPTCACHE_SECRET_SOURCE_NAMESPACE": OPERATOR_NAMESPACE, "PROMPTCACHE_REDIS_SECRET": f"{redis}/url"})

    async def data(namespace: str, name: str) -> dict[str, str] | None:
        live = await kube.get_or_none("v1", "secrets", namespace, name)
        return None if live is None else {k: base64.b64decode(v).decode() for k, v in (live.get("data") or {}).items()}

    since = kube.plane.audit_log.stat().st_size
    async with running_operator(identity, env, tmp_path / "operator.log", namespaces=[copied, by_hand, late]):
        for ns in (copied, by_hand):
            await kube.create(policy("p", ns=ns))
            await kube.create(model("m", "chat", "p", ns=ns))
        deployment = await eventually(lambda: kube.get_or_none("apps/v1", "deployments", copied, "m-proxy"),
                                      what="the proxy Deployment")
        [proxy] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "proxy"]
        assert {"name": "PROMPTCACHE_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": redis, "key": "url"}}} in proxy[
            "env"]
        assert "s3cret" not in str(deployment)  # the password is in the Secret, never in the pod spec
        assert await data(copied, dsn) == {"dsn": "postgresql://proxy:pw@db:5432/promptcache"}
        assert await data(copied, redis) == {"url": REDIS_URL}
        live = await kube.get("v1", "secrets", copied, redis)
        assert live["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "promptcache-operator"
        assert live["metadata"]["annotations"][COPIED_FROM_ANNOTATION] == f"{OPERATOR_NAMESPACE}/{redis}"
        assert not live["metadata"].get("ownerReferences")  # shared by the namespace's models: no one model owns it

        await eventually(lambda: kube.get_or_none("apps/v1", "deployments", by_hand, "m-proxy"), what="by hand")
        assert await data(by_hand, dsn) == {"dsn": "postgresql://theirs@elsewhere/db"}  # a person's own: left alone
        assert await data(by_hand, redis) == {"url": REDIS_URL}

        # A rotated password reaches the copy at the model's next reconcile.
        await kube.patch("v1", "secrets", OPERATOR_NAMESPACE, redis, {"data": {"url": b64(REDIS_URL + "1")}})
        await kube.patch(API_VERSION, "deployedmodels", copied, "m", {"metadata": {"labels": {"touched": "yes"}}})
        await eventually(lambda: _equal(data(copied, redis), {"url": REDIS_URL + "1"}), what="the rotated copy")

        # No source and no Secret of its name: the model stalls, and recovers once the source appears.
        await kube.delete("v1", "secrets", OPERATOR_NAMESPACE, dsn)
        await kube.create(policy("p", ns=late))
        await kube.create(model("m", "chat", "p", ns=late))

        async def stalled() -> dict[str, Any] | None:
            found = condition(await kube.get(API_VERSION, "deployedmodels", late, "m"), "Stalled")
            return found if found and found["status"] == "True" else None

        found = await eventually(stalled, what="Stalled")
        assert found["reason"] == "SecretNotFound"
        assert found["message"] == (f"Secret {dsn} is neither in {late} nor in {OPERATOR_NAMESPACE}, where the "
                                    "operator copies it from")
        assert await kube.get_or_none("apps/v1", "deployments", late, "m-proxy") is None  # no pods that cannot start
        await kube.create(secret(dsn, OPERATOR_NAMESPACE, dsn="postgresql://proxy:pw2@db:5432/promptcache"))
        await eventually(lambda: kube.get_or_none("apps/v1", "deployments", late, "m-proxy"), within=40,
                         what="the retry after the source appeared")
        assert await data(late, dsn) == {"dsn": "postgresql://proxy:pw2@db:5432/promptcache"}

        async def recovered() -> bool:
            found = condition(await kube.get(API_VERSION, "deployedmodels", late, "m"), "Stalled")
            return found is not None and found["status"] == "False"

        await eventually(recovered, what="Stalled cleared")
    refused = [(e["verb"], e["requestURI"]) for e in audited(kube.plane.audit_log, identity.user, since=since)
               if e.get("responseStatus", {}).get("code") == 403]
    assert refused == []


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


@pytest.mark.parametrize("values, error", [
    ({"database": {"proxySecret": {"copy": True}}}, "database.proxySecret.copy needs database.proxySecret.name: the "
                                                    "operator never copies the owner's DSN"),
    ({"database": {"proxySecret": {"name": "pc-proxy", "copy": "yes"}}}, "copy"),
    ({"redis": {"existingSecret": "Not A Name"}}, "existingSecret"),
    ({"redis": {"existingSecret": "pc-redis", "secretKey": ""}}, "secretKey"),
])
def test_bad_secret_values_are_refused(values: dict[str, Any], error: str) -> None:
    with pytest.raises(Exception, match=error):
        render_chart({"image": TEST_IMAGE, **values})


def test_without_copies_the_chart_grants_nothing_on_secrets() -> None:
    rules = [rule for o in render_chart({"image": TEST_IMAGE}) if o["kind"] in ("ClusterRole", "Role")
             for rule in o.get("rules") or []]
    assert [rule for rule in rules if "secrets" in rule["resources"]] == []

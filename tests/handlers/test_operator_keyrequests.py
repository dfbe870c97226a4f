"""API keys from Secrets (docs/design.md#api-keys-from-secrets): the real operator with the chart's RBAC for
``operator.keyRequests`` against the real API server issues a key into a Secret that asks for one, a proxy accepts
it for the namespaced principal, an interrupted issue is completed, a bad or borrowed request is refused with a
Warning, and deleting the Secret revokes its key."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from promptcache.operator.constants import (
    ISSUED_TO_ANNOTATION,
    KEY_FINALIZER,
    KEY_ID_ANNOTATION,
    KEY_REQUEST_LABEL,
    PRINCIPAL_ANNOTATION,
)
from promptcache.operator.handlers.config import EnvironmentError_, OperatorConfig
from promptcache.proxy.storage.keys import key_id_of
from promptcache.proxy.testing.simulator import Simulator

from support.cluster import Cluster, eventually
from support.operator_process import (
    TEST_IMAGE,
    OperatorEnvironment,
    audited,
    operator_identity,
    render_chart,
    running_operator,
)
from support.proxy import model_config, running_proxy, settle, unique


def request(name: str, namespace: str, principal: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {KEY_REQUEST_LABEL: "true"}}
    if principal is not None:
        meta["annotations"] = {PRINCIPAL_ANNOTATION: principal}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta,
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


async def keys_of(dsn: str, principal: str) -> list[tuple[str, bool]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT key_id, revoked_at IS NOT NULL AS revoked FROM api_keys "
                                "WHERE principal_id = $1 ORDER BY created_at", principal)
    finally:
        await conn.close()
    return [(r["key_id"], r["revoked"]) for r in rows]


async def test_a_secret_that_asks_for_a_key_gets_one_and_deleting_it_revokes_it(
        kube: Cluster, operator_env: OperatorEnvironment, pg_dsn: str, tmp_path: Path,
        simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    identity = await operator_identity(kube, tmp_path, release=unique("pckeys"),
                                       values={"operator": {"keyRequests": True}})
    ns = await kube.namespace("keys")
    env = dataclasses.replace(operator_env, extra={"PROMPTCACHE_KEY_REQUESTS": "true"})

    async def secret(name: str) -> dict[str, Any] | None:
        return await kube.get_or_none("v1", "secrets", ns, name)

    async def warning(name: str) -> str | None:
        found = [e["message"] for e in await kube.events(ns, involving=name) if e["type"] == "Warning"]
        return found[-1] if found else None

    since = kube.plane.audit_log.stat().st_size
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_operator(identity, env, tmp_path / "operator.log", namespaces=[ns]):
        await kube.create(request("acme-key", ns, "acme"))
        await kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "plain", "namespace": ns},
                           "data": {"x": "eA=="}})
        issued = await eventually(lambda: _with_key(secret("acme-key")), what="the issued key")
        key = base64.b64decode(issued["data"]["api-key"]).decode()
        meta = issued["metadata"]
        assert meta["annotations"][KEY_ID_ANNOTATION] == key_id_of(key)
        assert meta["annotations"][ISSUED_TO_ANNOTATION] == f"{ns}/acme"  # the namespace is the tenant boundary
        assert KEY_FINALIZER in meta["finalizers"]
        assert await keys_of(pg_dsn, f"{ns}/acme") == [(key_id_of(key), False)]
        assert "last-handled-configuration" not in str(meta.get("annotations"))  # kopf kept no copy of the key
        events = [e for e in await kube.events(ns, involving="acme-key") if e["reason"] == "KeyIssued"]
        assert [e["message"] for e in events] == [
            f"API key {key_id_of(key)} issued for principal {ns}/acme, in data.api-key"]

        async with running_proxy(config, tmp_path, pg_dsn) as proxy:
            client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(
                model="chat", messages=[{"role": "user", "content": "hello"}])
            await settle(proxy)
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await conn.fetchval("SELECT principal_id FROM ledger WHERE request_id = $1",
                                       raw.headers["x-request-id"]) == f"{ns}/acme"
        finally:
            await conn.close()

        # An issue interrupted after the key was written (the operator died before storing it) is completed.
        written = "pc-" + "w" * 43
        await kube.create(request("written", ns, "globex", **{"api-key": written}))
        await eventually(lambda: _registered(keys_of(pg_dsn, f"{ns}/globex")), what="the written key registered")
        assert await keys_of(pg_dsn, f"{ns}/globex") == [(key_id_of(written), False)]

        # A borrowed key (another principal's) and a bad principal name are refused, with the reason.
        await kube.create(request("borrowed", ns, "initech", **{"api-key": key}))
        assert await eventually(lambda: warning("borrowed"), what="a warning") == (
            "the key in data.api-key belongs to another principal: remove it to be issued a new one")
        await kube.create(request("bad", ns, " spaced"))
        assert (await eventually(lambda: warning("bad"), what="a warning")).startswith(
            f"annotation {PRINCIPAL_ANNOTATION} must name a principal")
        assert "data" not in (await secret("bad") or {}) or not (await secret("bad") or {}).get("data")
        assert await keys_of(pg_dsn, f"{ns}/initech") == [] and await keys_of(pg_dsn, f"{ns}/ spaced") == []

        await kube.delete("v1", "secrets", ns, "acme-key")
        await eventually(lambda: _gone(secret("acme-key")), what="the Secret deleted once its key is revoked")
        assert await keys_of(pg_dsn, f"{ns}/acme") == [(key_id_of(key), True)]
        plain = await secret("plain")
        assert plain is not None and not plain["metadata"].get("finalizers")  # a Secret that asks nothing: untouched
    async with running_proxy(config, tmp_path, pg_dsn) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}])
    refused = [(e["verb"], e["requestURI"]) for e in audited(kube.plane.audit_log, identity.user, since=since)
               if e.get("responseStatus", {}).get("code") == 403]
    assert refused == []


async def _with_key(found: Any) -> dict[str, Any] | None:
    secret = await found
    return secret if secret is not None and "api-key" in (secret.get("data") or {}) else None


async def _registered(found: Any) -> bool:
    return bool(await found)


async def _gone(found: Any) -> bool:
    return await found is None


def test_key_requests_are_off_unless_asked_and_the_switch_is_strict() -> None:
    assert not OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1"}).key_requests
    with pytest.raises(EnvironmentError_, match="PROMPTCACHE_KEY_REQUESTS must be one of false, true, got 'yes'"):
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", "PROMPTCACHE_KEY_REQUESTS": "yes"})
    with pytest.raises(Exception, match="keyRequests"):
        render_chart({"image": TEST_IMAGE, "operator": {"keyRequests": "yes"}})
    rules = [rule for o in render_chart({"image": TEST_IMAGE, "operator": {"keyRequests": True}})
             if o["kind"] == "ClusterRole" for rule in o.get("rules") or [] if "secrets" in rule["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch", "patch"]}]

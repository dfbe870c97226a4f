"""Builders of the custom resources the operator tests apply, and reads of what the operator wrote."""

from __future__ import annotations

from typing import Any

import asyncpg

from promptcache.operator.constants import API_VERSION


def policy(name: str, *, ns: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "CachePolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"enabledTtls": ["5m", "1h"], "defaultTtl": "5m", "minPrefixTokens": 1024, **spec}}


def model(name: str, alias: str, policy_name: str, *, ns: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "alias": alias,
        "upstream": {"url": "http://vllm.llm.svc:8000/v1", "model": "llama", "api": "openai"},
        "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
        "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
        "cachePolicyRef": {"name": policy_name},
        "proxy": {"replicas": 2},
    }
    spec.update(extra)
    return {"apiVersion": API_VERSION, "kind": "DeployedModel", "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


async def tariffs(pg_dsn: str, alias: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return list(await conn.fetch("SELECT * FROM tariffs WHERE model = $1 ORDER BY version", alias))
    finally:
        await conn.close()

"""Run the real proxy and the simulated upstream on loopback ports for end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from promptcache.proxy.http.server import ProxyOptions, ProxyServer, serving
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database


def write_word_tokenizer(path: Path) -> Path:
    """A tokenizer.json where every word and every punctuation mark is one token, so counts are by hand."""
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(path))
    return path


@asynccontextmanager
async def redis_prefix(redis_url: str, name: str) -> AsyncIterator[str]:
    """A Redis key prefix of the caller's own on a shared server; every key under it is deleted at the end."""
    prefix = f"{unique(name)}:"
    try:
        yield prefix
    finally:
        client = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


def unique(name: str) -> str:
    """A principal of the test's own: the session's database is shared by every test."""
    return f"{name}-{secrets.token_hex(4)}"


async def new_key(pg_dsn: str, principal: str) -> str:
    pg = await Database.connect(pg_dsn)
    try:
        return (await ApiKeys(pg).create(principal))[1]
    finally:
        await pg.close()


async def ledger(pg_dsn: str, request_id: str) -> asyncpg.Record:
    """The ledger row the proxy committed for a request, read straight from Postgres."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM ledger WHERE request_id = $1", request_id)
    finally:
        await conn.close()
    assert row is not None, f"no ledger row for {request_id}"
    return row


def text(t: str, ttl: str | None = None) -> Any:
    """A text part, marked with ``ttl`` when given; ``Any``, as the SDKs' part types (which vary by version) take
    no ``cache_control`` with a ``ttl`` everywhere we put one."""
    part: dict[str, Any] = {"type": "text", "text": t}
    if ttl:
        part["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return part


def words(prefix: str, n: int) -> str:
    """``n`` distinct one-token words."""
    return " ".join(f"{prefix}{i}" for i in range(n))


def model_config(alias: str, upstream_url: str, api: str | list[str], tokenizer_path: Path, **cache: Any
                 ) -> dict[str, Any]:
    return {
        "alias": alias,
        "upstream": {"url": upstream_url, "model": f"sim-{alias}", "api": api},
        "tokenizer": {"type": "huggingface", "path": str(tokenizer_path)},
        "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
        "cache": {"minPrefixTokens": 10, **cache},
    }


@dataclass
class RunningProxy:
    url: str
    server: ProxyServer
    config_path: Path

    def write_config(self, config: Mapping[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(dict(config)))


@asynccontextmanager
async def running_proxy(
    config: Mapping[str, Any], tmp: Path, database_url: str | None, redis_url: str | None = None,
    **options: Any,
) -> AsyncIterator[RunningProxy]:
    """A proxy in this process on ``config``; with Redis and no ``redis_prefix`` given, under a prefix of its own
    that is deleted afterwards (a caller's prefix is the caller's to clean up)."""
    path = tmp / f"proxy-{secrets.token_hex(4)}.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    async with contextlib.AsyncExitStack() as stack:
        if "redis_prefix" not in options:
            options["redis_prefix"] = (await stack.enter_async_context(redis_prefix(redis_url, "pctest"))
                                       if redis_url else f"pctest:{secrets.token_hex(4)}:")
        opts = ProxyOptions(config_path=path, database_url=database_url, redis_url=redis_url, reload_interval=0.1,
                            **options)
        server = await ProxyServer.create(opts)
        async with serving(server.app()) as url:
            yield RunningProxy(url, server, path)


async def settle(proxy: RunningProxy) -> None:
    """Wait for the background commits of every answered request."""
    while proxy.server.proxy.commits:
        await asyncio.gather(*list(proxy.server.proxy.commits))

"""Failures end to end (docs/design.md#billing to §8): only a complete 2xx is billed or written; Redis and Postgres
outages.

Counts are worked by hand in ``e2e``: turn 0 writes 1h 20 and 5m 10 of a 36-token prompt, turn 1
reads 30 (turn 0's user message) and writes 5m 18 of 60. The shared Postgres and Redis are never
touched: Postgres goes slow or away behind a relay, and the Redis that dies is a private one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.storage.redis import _scope_id
from promptcache.proxy.storage.store import Store
from promptcache.proxy.testing.simulator import Simulator

from support.faults import (
    SDK,
    TURN0,
    TURN0_AGAIN,
    TURN0_AGAIN_COST,
    TURN0_COST,
    TURN0_LIST,
    TURN0_LIST_COST,
    TURN1,
    TURN1_AGAIN,
    TURN1_AGAIN_COST,
    TURN1_COST,
    PrivateRedis,
    Relay,
    anthropic_turn,
    complete,
    entries,
    fetch,
    ledger_rows,
    log_rows,
    openai_turn,
    splits,
    wait_until,
)
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

UPSTREAM_TIMEOUT = 0.5
STREAM_ERROR = "the upstream stream ended before it completed"
APIS = ["openai", "anthropic"]


@pytest.fixture
async def trickle(simulator: tuple[str, Simulator]) -> AsyncIterator[Relay]:
    """The simulated upstream, but its answers trickle in 512-byte pieces every 0.1 s."""
    parts = urlsplit(simulator[0])
    relay = await Relay(parts.hostname or "127.0.0.1", parts.port or 80, delay=0.1, chunk=512).start()
    try:
        yield relay
    finally:
        await relay.close()


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], trickle: Relay,
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url, _ = simulator
    models = []
    for suffix, base in (("", url), ("-error", url + "/error"), ("-hang", url + "/hang"),
                         ("-disconnect", url + "/disconnect"), ("-trickle", trickle.url)):
        models.append(model_config("chat" + suffix, base + "/v1", "openai", word_tokenizer))
        models.append(model_config("claude" + suffix, base, "anthropic", word_tokenizer))
    config = {"models": models, "limits": {"upstreamTimeoutSeconds": UPSTREAM_TIMEOUT}}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running


def model_for(api: str, suffix: str = "") -> str:
    return ("chat" if api == "openai" else "claude") + suffix


def snapshot(rows: Sequence[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return [(r["virtual_model"], r["prefix_hash"], r["cum_tokens"], r["tier"], r["created_at"], r["expires_at"])
            for r in rows]


async def assert_not_billed(pg_dsn: str, principal: str, request_id: str, status: int) -> None:
    """Logged with its status, and neither billed nor written."""
    logged = await fetch(pg_dsn, "SELECT * FROM request_log WHERE request_id = $1", request_id)
    assert [(r["status"], r["billed_cost"], r["read_tokens"]) for r in logged] == [(status, 0, 0)]
    assert await fetch(pg_dsn, "SELECT 1 FROM ledger WHERE request_id = $1", request_id) == []
    assert logged[0]["principal_id"] == principal


# -- success-gated commit: upstream failures --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("behaviour", "status", "message"), [
    ("error", 502, "the upstream model failed with HTTP 500"),
    ("hang", 504, "the upstream model timed out"),
])
@pytest.mark.parametrize("api", APIS)
async def test_upstream_failure_bills_and_writes_nothing(proxy: RunningProxy, pg_dsn: str, api: str,
                                                         behaviour: str, status: int, message: str,
                                                         stream: bool, sdk: SDK) -> None:
    principal = unique(f"{api}-{behaviour}")
    c = sdk(proxy, await new_key(pg_dsn, principal))
    oa, an = c.oa, c.an
    model = model_for(api, "-" + behaviour)
    exc: openai.APIStatusError | anthropic.APIStatusError
    if api == "openai":
        with pytest.raises(openai.InternalServerError) as oa_caught:
            await oa.chat.completions.create(model=model, messages=openai_turn(0), stream=stream)
        exc = oa_caught.value
        body = exc.response.json()
        assert body == {"error": {"message": body["error"]["message"], "type": "server_error", "param": None,
                                  "code": None}}
        text = body["error"]["message"]
    else:
        system, messages = anthropic_turn(0)
        with pytest.raises(anthropic.InternalServerError) as an_caught:
            if stream:
                async with an.messages.stream(model=model, system=system, messages=messages,
                                              max_tokens=64):
                    pass
            else:
                await an.messages.create(model=model, system=system, messages=messages,
                                         max_tokens=64)
        exc = an_caught.value
        body = exc.response.json()
        assert body == {"type": "error", "error": {"type": "api_error", "message": body["error"]["message"]}}
        text = body["error"]["message"]
    assert exc.status_code == status
    assert text.startswith(message)
    assert "Traceback" not in exc.response.text
    await settle(proxy)
    await assert_not_billed(pg_dsn, principal, exc.response.headers["x-request-id"], status)
    assert await ledger_rows(pg_dsn, principal) == []
    assert await entries(pg_dsn, principal) == []


@pytest.mark.parametrize("api", APIS)
async def test_upstream_disconnect_mid_stream_bills_and_writes_nothing(proxy: RunningProxy, pg_dsn: str,
                                                                      api: str, sdk: SDK) -> None:
    """The /disconnect upstream answers a non-streaming request in full (billed, turn 0 written) and
    drops a stream after two words: turn 1, which would read turn 0 and write 18, touches nothing."""
    principal = unique(f"{api}-disconnect")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    model = model_for(api, "-disconnect")
    assert (await complete(c, api, model, 0))[0] == TURN0
    await settle(proxy)
    written = snapshot(await entries(pg_dsn, principal))
    assert len(written) == 2

    oa, an = c.oa, c.an
    if api == "openai":
        stream = await oa.chat.completions.create(model=model, messages=openai_turn(1),
                                                  stream=True, stream_options={"include_usage": True})
        received = []
        with pytest.raises(openai.APIError) as oa_caught:
            async for chunk in stream:
                received.append(chunk)
        assert "".join(c.choices[0].delta.content or "" for c in received) == "Simulated reply"
        assert oa_caught.value.body == {"message": STREAM_ERROR, "type": "server_error", "param": None, "code": None}
        request_id = stream.response.headers["x-request-id"]
    else:
        system, messages = anthropic_turn(1)
        events = []
        async with an.messages.stream(model=model, system=system, messages=messages,
                                      max_tokens=64) as astream:
            with pytest.raises(anthropic.APIStatusError) as an_caught:
                async for event in astream:
                    events.append(event)
            request_id = astream.response.headers["x-request-id"]
        assert "".join(e.delta.text for e in events
                       if e.type == "content_block_delta" and e.delta.type == "text_delta") == "Simulated reply"
        assert an_caught.value.body == {"type": "error", "error": {"type": "api_error", "message": STREAM_ERROR}}
    await settle(proxy)
    await assert_not_billed(pg_dsn, principal, request_id, 502)
    assert splits(await ledger_rows(pg_dsn, principal)) == [TURN0]
    assert snapshot(await entries(pg_dsn, principal)) == written  # no write, and the read was not slid


# -- success-gated commit: the client goes away -----------------------------------------------------


def raw_request(proxy: RunningProxy, api: str, key: str, model: str, turn: int,
                stream: bool) -> tuple[str, dict[str, str], dict[str, Any]]:
    if api == "openai":
        return (proxy.url + "/v1/chat/completions", {"authorization": f"Bearer {key}"},
                {"model": model, "messages": openai_turn(turn), "stream": stream})
    system, messages = anthropic_turn(turn)
    return (proxy.url + "/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"},
            {"model": model, "system": system, "messages": messages, "max_tokens": 64, "stream": stream})


@pytest.mark.parametrize("api", APIS)
async def test_client_disconnect_mid_stream_bills_and_writes_nothing(proxy: RunningProxy, pg_dsn: str,
                                                                     api: str, sdk: SDK) -> None:
    """The upstream trickles; the client hangs up after the first event (raw aiohttp: an SDK cannot)."""
    principal = unique(f"{api}-hangup")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    model = model_for(api, "-trickle")
    assert (await complete(c, api, model, 0))[0] == TURN0
    await settle(proxy)
    written = snapshot(await entries(pg_dsn, principal))

    url, headers, body = raw_request(proxy, api, key, model, 1, stream=True)
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
        first = await resp.content.readline()
        assert first.startswith(b"data: " if api == "openai" else b"event: message_start")
        resp.close()  # hang up mid-stream

    async def logged() -> bool:
        return bool(await fetch(pg_dsn, "SELECT 1 FROM request_log WHERE request_id = $1", request_id))

    await wait_until(logged, "the request to be logged")
    await settle(proxy)
    await assert_not_billed(pg_dsn, principal, request_id, 499)
    assert splits(await ledger_rows(pg_dsn, principal)) == [TURN0]
    assert snapshot(await entries(pg_dsn, principal)) == written


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_client_gone_before_the_answer_bills_and_writes_nothing(
    proxy: RunningProxy, pg_dsn: str, simulator: tuple[str, Simulator], trickle: Relay, api: str, stream: bool,
    sdk: SDK,
) -> None:
    """The client hangs up after the request went upstream and before any answer came back."""
    principal = unique(f"{api}-gone")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    model = model_for(api, "-trickle")
    assert (await complete(c, api, model, 0))[0] == TURN0
    await settle(proxy)
    written = snapshot(await entries(pg_dsn, principal))

    _, sim = simulator
    seen = len(sim.requests)
    trickle.delay = 0.3  # the answer takes at least this long to come back
    url, headers, body = raw_request(proxy, api, key, model, 1, stream=stream)
    async with aiohttp.ClientSession() as session:
        post = asyncio.create_task(session.post(url, json=body, headers=headers))

        async def forwarded() -> bool:
            return len(sim.requests) > seen

        await wait_until(forwarded, "the proxy to forward the request")
        post.cancel()  # the client goes away while the upstream is still answering
        with contextlib.suppress(asyncio.CancelledError):
            await post

    async def logged() -> bool:
        return len(await log_rows(pg_dsn, principal)) == 2

    await wait_until(logged, "the request to be logged")
    await settle(proxy)
    gone = (await log_rows(pg_dsn, principal))[1]
    await assert_not_billed(pg_dsn, principal, gone["request_id"], 499)
    assert splits(await ledger_rows(pg_dsn, principal)) == [TURN0]
    assert snapshot(await entries(pg_dsn, principal)) == written


# -- the Redis accelerator (§7) ---------------------------------------------------------------------


async def hold_background(store: Store) -> None:
    """Stop the store's flush and retry loops, so the test decides when refreshes and retries run."""
    await store.stop()
    store.flush_interval = store.retry_interval = 3600.0
    store.start()


def count_pg_lookups(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Postgres lookups from now on, as the number of hashes each asked for."""
    assert store.index is not None
    calls: list[int] = []
    original = store.index.lookup

    async def lookup(scope: Scope, hashes: Sequence[bytes]) -> Any:
        calls.append(len(hashes))
        return await original(scope, hashes)

    monkeypatch.setattr(store.index, "lookup", lookup)
    return calls


def redis_key(proxy: RunningProxy, row: asyncpg.Record) -> str:
    scope = Scope(row["principal_id"], row["virtual_model"], row["tokenizer_version"])
    return f"{proxy.server.options.redis_prefix}entry:{_scope_id(scope)}:{row['prefix_hash'].hex()}"


def micros(row: asyncpg.Record, column: str) -> int:
    return int(row[column].timestamp() * 1_000_000)


def ms(at: datetime) -> int:
    """A timestamp as Redis's PEXPIRETIME reports the accelerator's PXAT."""
    return int(at.timestamp() * 1_000_000) // 1000


async def expiries(pg_dsn: str, principal: str) -> dict[int, Any]:
    return {r["cum_tokens"]: r["expires_at"] for r in await entries(pg_dsn, principal)}


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis_proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
                      private_redis: PrivateRedis) -> AsyncIterator[RunningProxy]:
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn, private_redis.url) as running:
        await hold_background(running.server.proxy.store)
        yield running


async def test_redis_write_through_read_through_and_write_behind(
    redis_proxy: RunningProxy, pg_dsn: str, private_redis: PrivateRedis, monkeypatch: pytest.MonkeyPatch, sdk: SDK,
) -> None:
    proxy, store = redis_proxy, redis_proxy.server.proxy.store
    pg_lookups = count_pg_lookups(store, monkeypatch)
    principal = unique("redis")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    r = private_redis.client()
    try:
        # Turn 0: Redis misses, Postgres misses; the commit lands in Postgres, then goes through to Redis.
        assert (await complete(c, "openai", "chat", 0))[0] == TURN0
        await settle(proxy)
        assert pg_lookups == [2]
        rows = await entries(pg_dsn, principal)
        assert [(e["cum_tokens"], e["tier"]) for e in rows] == [(20, "1h"), (30, "5m")]
        for e in rows:
            assert e["replica"] == proxy.server.proxy.runtimes.models["chat"].config.upstream.url
            value = f"{e['cum_tokens']}|{e['tier']}|{micros(e, 'created_at')}|{micros(e, 'expires_at')}|{e['replica']}"
            assert await r.get(redis_key(proxy, e)) == value.encode()
            assert await r.pexpiretime(redis_key(proxy, e)) == micros(e, "expires_at") // 1000  # the entry's TTL
        turn0 = await expiries(pg_dsn, principal)

        # Turn 0 again: served from Redis alone (Postgres is not asked), and Postgres keeps its entries.
        usage, request_id = await complete(c, "openai", "chat", 0)
        await settle(proxy)
        assert usage == TURN0_AGAIN
        assert pg_lookups == [2]
        (again,) = await fetch(pg_dsn, "SELECT * FROM ledger WHERE request_id = $1", request_id)
        assert again["cost"] == TURN0_AGAIN_COST
        again_slid = again["started_at"] + timedelta(minutes=5)
        # The read's new expiry is written behind: Postgres gets it when the refreshes are flushed.
        assert await expiries(pg_dsn, principal) == turn0
        await store.flush_refreshes()
        assert await expiries(pg_dsn, principal) == {20: turn0[20], 30: again_slid}
        u0 = next(e for e in rows if e["cum_tokens"] == 30)
        assert await r.pexpiretime(redis_key(proxy, u0)) == ms(again_slid)

        # Redis loses everything (eviction): turn 1 reads through Postgres and refills Redis.
        assert await r.delete(*[redis_key(proxy, e) for e in rows]) == 2
        usage, request_id = await complete(c, "openai", "chat", 1)
        await settle(proxy)
        assert usage == TURN1
        assert pg_lookups == [2, 4]
        (turn1,) = await fetch(pg_dsn, "SELECT * FROM ledger WHERE request_id = $1", request_id)
        slid = turn1["started_at"] + timedelta(minutes=5)
        rows = await entries(pg_dsn, principal)
        assert [(e["cum_tokens"], e["expires_at"]) for e in rows] == [(20, turn0[20]), (30, again_slid), (48, slid)]
        await store.flush_refreshes()
        assert await expiries(pg_dsn, principal) == {20: turn0[20], 30: slid, 48: slid}
        keys = [redis_key(proxy, e) for e in rows]
        assert await r.pexpiretime(keys[0]) == ms(turn0[20])  # sys: back in Redis only by read-through
        assert await r.pexpiretime(keys[1]) == ms(slid)  # u0: the read, slid
        assert await r.pexpiretime(keys[2]) == ms(slid)  # u1: the write, through

        # Turn 1 again: a Redis hit on the deepest breakpoint.
        usage, _ = await complete(c, "openai", "chat", 1)
        await settle(proxy)
        assert usage == TURN1_AGAIN
        assert pg_lookups == [2, 4]
        await store.flush_refreshes()
        assert splits(await ledger_rows(pg_dsn, principal)) == [TURN0, TURN0_AGAIN, TURN1, TURN1_AGAIN]
        assert [r["cost"] for r in await ledger_rows(pg_dsn, principal)] == [
            TURN0_COST, TURN0_AGAIN_COST, TURN1_COST, TURN1_AGAIN_COST]
    finally:
        await r.aclose()


async def test_redis_down_mid_run_then_back(redis_proxy: RunningProxy, pg_dsn: str, private_redis: PrivateRedis,
                                           monkeypatch: pytest.MonkeyPatch, sdk: SDK) -> None:
    proxy, store = redis_proxy, redis_proxy.server.proxy.store
    accelerator = store.redis
    assert accelerator is not None
    registry = proxy.server.proxy.metrics.registry
    principal = unique("redis-down")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0
    await settle(proxy)

    await private_redis.stop()
    # Postgres alone, exact splits; the read's refresh rides in the commit (no write-behind without Redis).
    usage, request_id = await complete(c, "openai", "chat", 0)
    await settle(proxy)
    assert usage == TURN0_AGAIN
    assert not accelerator.available
    assert registry.get_sample_value("promptcache_index_fallbacks_total", {"reason": "redis_unavailable"}) == 1.0
    (row,) = await fetch(pg_dsn, "SELECT * FROM ledger WHERE request_id = $1", request_id)
    assert (await expiries(pg_dsn, principal))[30] == row["started_at"] + timedelta(minutes=5)
    assert (await complete(c, "openai", "chat", 1))[0] == TURN1
    await settle(proxy)

    # Back on the same port (empty): once the back-off has passed, Redis is used again.
    await private_redis.start()

    async def retried() -> bool:
        return accelerator.available

    await wait_until(retried, "the accelerator's back-off to pass")
    pg_lookups = count_pg_lookups(store, monkeypatch)
    assert (await complete(c, "openai", "chat", 1))[0] == TURN1_AGAIN  # Redis misses: read-through
    await settle(proxy)
    assert (await complete(c, "openai", "chat", 1))[0] == TURN1_AGAIN  # a Redis hit
    await settle(proxy)
    assert pg_lookups == [4]
    r = private_redis.client()
    try:
        assert len(await r.keys(proxy.server.options.redis_prefix + "*")) == 3
    finally:
        await r.aclose()
    await store.flush_refreshes()
    assert splits(await ledger_rows(pg_dsn, principal)) == [TURN0, TURN0_AGAIN, TURN1, TURN1_AGAIN, TURN1_AGAIN]


# -- Postgres unreachable ---------------------------------------------------------------------------


@pytest.fixture
async def relayed_proxy(tmp_path: Path, pg_dsn: str, pg_relay: Relay, simulator: tuple[str, Simulator],
                        word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url, _ = simulator
    config = {"models": [model_config("chat", url + "/v1", "openai", word_tokenizer),
                         model_config("claude", url, "anthropic", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_relay.dsn(pg_dsn), tariff_refresh=3600.0) as running:
        await hold_background(running.server.proxy.store)
        yield running


async def test_postgres_unreachable_list_price_and_queued_commits_land_once(
    relayed_proxy: RunningProxy, pg_dsn: str, pg_relay: Relay, sdk: SDK,
) -> None:
    proxy, store = relayed_proxy, relayed_proxy.server.proxy.store
    registry = proxy.server.proxy.metrics.registry
    principal = unique("pg-down")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    for api in APIS:  # turn 0 written for both models (and the API key is known to the proxy)
        assert (await complete(c, api, model_for(api), 0))[0] == TURN0
    await settle(proxy)
    written = snapshot(await entries(pg_dsn, principal))
    assert len(written) == 4

    await pg_relay.cut()
    down = []
    for api in APIS:  # cached prefixes, but no index: list price, no cache fields
        usage, request_id = await complete(c, api, model_for(api), 0)
        assert usage == TURN0_LIST
        down.append(request_id)
    await settle(proxy)
    assert sorted(r.request_id for r in await store.spool.rows()) == sorted(down)  # in the background, in any order
    assert registry.get_sample_value("promptcache_ledger_queue_depth") == 2.0
    assert registry.get_sample_value("promptcache_index_fallbacks_total", {"reason": "commit_connect"}) == 2.0
    assert await fetch(pg_dsn, "SELECT 1 FROM ledger WHERE request_id = ANY($1::text[])", down) == []
    assert await store.drain_spool() == 0  # still down: nothing lands, nothing is lost
    assert store.spool.count == 2

    await pg_relay.restore()
    assert await store.drain_spool() == 2
    assert await store.drain_spool() == 0
    assert store.spool.count == 0 and registry.get_sample_value("promptcache_ledger_queue_depth") == 0.0
    landed = await fetch(pg_dsn, "SELECT * FROM ledger WHERE request_id = ANY($1::text[]) ORDER BY request_id", down)
    assert [r["request_id"] for r in landed] == sorted(down)  # exactly one row each
    assert splits(landed) == [TURN0_LIST, TURN0_LIST]
    assert [(r["cost"], r["list_cost"]) for r in landed] == [(TURN0_LIST_COST, TURN0_LIST_COST)] * 2
    logged = await fetch(pg_dsn, "SELECT status FROM request_log WHERE request_id = ANY($1::text[])", down)
    assert [r["status"] for r in logged] == [200, 200]
    assert snapshot(await entries(pg_dsn, principal)) == written  # no discount, so no read refresh either

    # And with Postgres back, the discount is back.
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0_AGAIN


# Turn 1 with Postgres down and Redis up: read 30 (u0, from Redis); u1 could not be looked up, so it is neither
# written nor discounted: uncached 30. (30·3 + 30·3·0.1 + 120) / 1e6 = (90 + 9 + 120) / 1e6 = 0.000219
TURN1_REDIS_ONLY = (60, 8, 30, 0, 0, 0, 30)
TURN1_REDIS_ONLY_COST = Decimal("0.000219")


@pytest.fixture
async def relayed_redis_proxy(tmp_path: Path, pg_dsn: str, pg_relay: Relay, private_redis: PrivateRedis,
                              simulator: tuple[str, Simulator], word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_relay.dsn(pg_dsn), private_redis.url,
                             tariff_refresh=3600.0) as running:
        await hold_background(running.server.proxy.store)
        yield running


async def test_postgres_down_redis_up_discounts_what_redis_holds_and_writes_nothing(
    relayed_redis_proxy: RunningProxy, pg_dsn: str, pg_relay: Relay, sdk: SDK,
) -> None:
    """docs/design.md, "Postgres down, Redis up": Redis's entries (written through after committed writes) are still
    read at the discount; what lies past them is billed uncached, with no write premium and no write."""
    proxy, store = relayed_redis_proxy, relayed_redis_proxy.server.proxy.store
    registry = proxy.server.proxy.metrics.registry
    principal = unique("pg-down-redis-up")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0
    await settle(proxy)
    written = snapshot(await entries(pg_dsn, principal))

    await pg_relay.cut()
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0_AGAIN  # Redis holds the deepest candidate
    usage, turn1 = await complete(c, "openai", "chat", 1)
    assert usage == TURN1_REDIS_ONLY
    assert registry.get_sample_value("promptcache_index_fallbacks_total", {"reason": "connect"}) == 1.0
    await settle(proxy)
    assert store.spool.count == 2

    await pg_relay.restore()
    assert await store.drain_spool() == 2
    rows = await ledger_rows(pg_dsn, principal)
    assert splits(rows) == [TURN0, TURN0_AGAIN, TURN1_REDIS_ONLY]
    assert [r["cost"] for r in rows] == [TURN0_COST, TURN0_AGAIN_COST, TURN1_REDIS_ONLY_COST]
    assert set(snapshot(await entries(pg_dsn, principal))) == set(written)  # u1 was not written
    assert rows[2]["request_id"] == turn1


async def test_commit_queue_overflow_is_counted_and_logged_in_full(
    relayed_proxy: RunningProxy, pg_dsn: str, pg_relay: Relay, caplog: pytest.LogCaptureFixture, sdk: SDK,
) -> None:
    proxy, store = relayed_proxy, relayed_proxy.server.proxy.store
    registry = proxy.server.proxy.metrics.registry
    principal = unique("pg-overflow")
    key = await new_key(pg_dsn, principal)
    c = sdk(proxy, key)
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0
    await settle(proxy)

    await pg_relay.cut()
    ids = []
    with caplog.at_level(logging.ERROR, logger="promptcache.store"):
        for _ in range(2):
            usage, request_id = await complete(c, "openai", "chat", 0)
            assert usage == TURN0_LIST
            ids.append(request_id)
            await settle(proxy)
            store.spool.max_bytes = store.spool.size  # full after the first
    assert [r.request_id for r in await store.spool.rows()] == ids[:1]
    assert registry.get_sample_value("promptcache_ledger_dropped_total") == 1.0
    (dropped,) = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    message = dropped.getMessage()
    assert ids[1] in message and principal in message
    for field in ('"prompt_tokens":36', '"completion_tokens":8', '"status":200', '"input_per_mtok":"3.00"'):
        assert field in message

    await pg_relay.restore()
    assert await store.drain_spool() == 1
    assert [r["request_id"] for r in await ledger_rows(pg_dsn, principal)][1:] == ids[:1]
    assert sum(r["cost"] for r in await ledger_rows(pg_dsn, principal)) == TURN0_COST + TURN0_LIST_COST

"""Streaming through the official SDKs (docs/design.md#billing, #the-request-path): our split in the stream, and
nothing held back for it.

Counts are worked by hand in ``e2e`` (the worked conversation of test_proxy_billing): turn 0
writes 1h 20 and 5m 10 of a 36-token prompt, turn 1 reads 30 and writes 5m 18 of 60.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import pytest
from anthropic.lib.streaming import ParsedMessageStreamEvent
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam, ChatCompletionStreamOptionsParam

from promptcache.proxy.domain.tokens import HuggingFaceTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.testing.simulator import REPLY, Simulator, SimulatorSettings

from support.faults import (
    TURN0,
    TURN0_COST,
    TURN0_LIST,
    TURN0_LIST_COST,
    TURN1,
    TURN1_COST,
    Relay,
    anthropic_turn,
    entries,
    fetch,
    openai_turn,
    splits,
)
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

UPSTREAM_LATENCY = 0.2
"""The Anthropic stream test's upstream takes this long to its first byte, as a real model does; the
(millisecond) classification is then settled before ``message_start``, which it rewrites exactly."""


@pytest.fixture(scope="module")
async def slow_simulator(word_tokenizer: Path) -> AsyncIterator[str]:
    sim = Simulator(SimulatorSettings(HuggingFaceTokenizer(str(word_tokenizer)), latency=UPSTREAM_LATENCY))
    async with serving(sim.app()) as url:
        yield url


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], slow_simulator: str,
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url, _ = simulator
    config = {"models": [
        model_config("chat", url + "/v1", "openai", word_tokenizer),
        model_config("chat-cached", url + "/cached/v1", "openai", word_tokenizer),
        model_config("claude", slow_simulator, "anthropic", word_tokenizer),
        model_config("claude-cached", slow_simulator + "/cached", "anthropic", word_tokenizer),
    ]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running


async def ledger_row(pg_dsn: str, request_id: str) -> tuple[tuple[int, ...], Any, Any]:
    rows = await fetch(pg_dsn, "SELECT * FROM ledger WHERE request_id = $1", request_id)
    assert len(rows) == 1, f"expected one ledger row for {request_id}, found {len(rows)}"
    return splits(rows)[0], rows[0]["cost"], rows[0]["list_cost"]


async def openai_stream(client: openai.AsyncOpenAI, model: str, messages: list[ChatCompletionMessageParam],
                        stream_options: ChatCompletionStreamOptionsParam | None = None,
                        ) -> tuple[list[ChatCompletionChunk], str]:
    """Stream one request; without ``stream_options`` the key is not sent at all."""
    stream = await client.chat.completions.create(
        model=model, messages=messages, stream=True,
        stream_options=openai.omit if stream_options is None else stream_options)
    chunks = [chunk async for chunk in stream]
    return chunks, stream.response.headers["x-request-id"]


def expiries(rows: list[asyncpg.Record]) -> list[tuple[str, int, datetime]]:
    return [(r["virtual_model"], r["cum_tokens"], r["expires_at"]) for r in rows]


def list_cost(split: tuple[int, ...]) -> Decimal:
    return (Decimal(split[0]) * 3 + Decimal(split[1]) * 15) / 1_000_000


def content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_openai_usage(usage: Any, split: tuple[int, ...]) -> None:
    prompt, out, read, c5m, c1h, c24h, _ = split
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, out, prompt + out)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == read
    extra = usage.model_extra or {}
    assert extra["cache_read_input_tokens"] == read
    assert extra["cache_creation_input_tokens"] == c5m + c1h + c24h
    assert extra["cache_creation"] == {"ephemeral_5m_input_tokens": c5m, "ephemeral_1h_input_tokens": c1h,
                                       "ephemeral_24h_input_tokens": c24h}


def assert_anthropic_usage(usage: Any, split: tuple[int, ...], output_tokens: int | None = None) -> None:
    prompt, out, read, c5m, c1h, c24h, uncached = split
    assert usage.input_tokens == uncached == prompt - read - c5m - c1h - c24h
    assert usage.cache_read_input_tokens == read
    assert usage.cache_creation_input_tokens == c5m + c1h + c24h
    assert usage.output_tokens == (out if output_tokens is None else output_tokens)
    creation = usage.cache_creation  # MessageDeltaUsage declares no cache_creation: there it is an extra dict
    assert (creation if isinstance(creation, dict) else creation.model_dump()) == {
        "ephemeral_5m_input_tokens": c5m, "ephemeral_1h_input_tokens": c1h, "ephemeral_24h_input_tokens": c24h}


# -- OpenAI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["chat", "chat-cached"])
async def test_openai_stream_final_usage_chunk_carries_our_split(proxy: RunningProxy, pg_dsn: str,
                                                                 model: str) -> None:
    """Two turns; the /cached upstream's own cached_tokens (half the prompt) never reach the client."""
    results = []
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique(model)),
                                max_retries=0)
    async with client:
        for turn in (0, 1):
            results.append(await openai_stream(client, model, openai_turn(turn), {"include_usage": True}))
            await settle(proxy)
    for (chunks, request_id), (split, cost) in zip(results, ((TURN0, TURN0_COST), (TURN1, TURN1_COST)), strict=True):
        assert content(chunks) == REPLY
        with_usage = [c for c in chunks if c.usage is not None]
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        assert_openai_usage(chunks[-1].usage, split)
        assert await ledger_row(pg_dsn, request_id) == (split, cost, list_cost(split))


@pytest.mark.parametrize("stream_options", [None, {"include_usage": False}])
async def test_openai_usage_chunk_dropped_when_not_asked_for(
    proxy: RunningProxy, pg_dsn: str, simulator: tuple[str, Simulator],
    stream_options: ChatCompletionStreamOptionsParam | None,
) -> None:
    _, sim = simulator
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique("no-usage")),
                                  max_retries=0) as client:
        chunks, request_id = await openai_stream(client, "chat", openai_turn(0), stream_options)
    await settle(proxy)
    assert sim.requests[-1]["stream_options"] == {"include_usage": True}  # forced upstream, to bill
    assert content(chunks) == REPLY
    assert [c.usage for c in chunks] == [None] * len(chunks)
    assert all(c.choices for c in chunks)  # the usage-only chunk is gone, not emptied
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert await ledger_row(pg_dsn, request_id) == (TURN0, TURN0_COST, TURN0_LIST_COST)


# -- Anthropic --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["claude", "claude-cached"])
async def test_anthropic_stream_rewrites_message_start_and_delta(proxy: RunningProxy, pg_dsn: str,
                                                                 model: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, unique(model)),
                                      max_retries=0)
    results = []
    async with client:
        for turn in (0, 1):
            system, messages = anthropic_turn(turn)
            async with client.messages.stream(model=model, system=system, messages=messages,
                                              max_tokens=64) as stream:
                results.append(([event async for event in stream], await stream.get_final_message(),
                                stream.response.headers["x-request-id"]))
            await settle(proxy)
    for (events, final, request_id), (split, cost) in zip(results, ((TURN0, TURN0_COST), (TURN1, TURN1_COST)),
                                                          strict=True):
        starts = [e for e in events if e.type == "message_start"]
        deltas = [e for e in events if e.type == "message_delta"]
        assert len(starts) == len(deltas) == 1
        assert_anthropic_usage(starts[0].message.usage, split, output_tokens=1)  # the upstream's count so far
        assert_anthropic_usage(deltas[0].usage, split)
        assert_anthropic_usage(final.usage, split)
        assert final.content[0].type == "text" and final.content[0].text == REPLY
        assert await ledger_row(pg_dsn, request_id) == (split, cost, list_cost(split))


# -- the first chunk is never held back for classification ------------------------------------------


async def test_slow_index_never_delays_the_first_chunk(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                                                       word_tokenizer: Path) -> None:
    """The lookup's Postgres answer takes 1.5 s (a relay), the classify deadline is 1.0 s: the stream starts
    at once, the deadline passes, and the request is billed at list price although its prefix is cached."""
    url, _ = simulator
    deadline = 1.0
    config = {"models": [model_config("chat", url + "/v1", "openai", word_tokenizer),
                         model_config("claude", url, "anthropic", word_tokenizer)],
              "limits": {"classifyDeadlineSeconds": deadline}}
    relay = await Relay.to_postgres(pg_dsn)
    principal = unique("slow-index")
    try:
        async with running_proxy(config, tmp_path, relay.dsn(pg_dsn), tariff_refresh=3600.0) as proxy:
            registry = proxy.server.proxy.metrics.registry

            def deadline_fallbacks() -> float:
                return registry.get_sample_value("promptcache_index_fallbacks_total", {"reason": "deadline"}) or 0.0

            def slow_next_read() -> None:
                """Postgres's next answer (the lookup's; auth is cached and nothing else is in flight) is late."""
                relay.delay, relay.delayed_reads = 1.5, 1

            key = await new_key(pg_dsn, principal)
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa, \
                    anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0) as an:
                # Warm up at full speed: turn 0 is written for both models (and the API key is known).
                await oa.chat.completions.create(model="chat", messages=openai_turn(0))
                system, messages = anthropic_turn(0)
                await an.messages.create(model="claude", system=system, messages=messages, max_tokens=64)
                await settle(proxy)
                written = expiries(await entries(pg_dsn, principal))
                assert [(m, t) for m, t, _ in written] == [("chat", 20), ("chat", 30), ("claude", 20), ("claude", 30)]

                # OpenAI: the first chunk arrives while the lookup is still pending.
                slow_next_read()
                t0 = time.perf_counter()
                stream = await oa.chat.completions.create(model="chat", messages=openai_turn(0),
                                                          stream=True, stream_options={"include_usage": True})
                chunks: list[ChatCompletionChunk] = []
                async for chunk in stream:
                    if not chunks:
                        first_after = time.perf_counter() - t0
                        pending_at_first = deadline_fallbacks() == 0.0
                    chunks.append(chunk)
                held_at_end = relay.held
                await settle(proxy)
                assert pending_at_first, "the first chunk waited for classification"
                assert first_after < deadline / 2
                assert held_at_end == 1, "the bill waited for the slow read, past the deadline"
                assert deadline_fallbacks() == 1.0
                assert content(chunks) == REPLY
                assert_openai_usage(chunks[-1].usage, TURN0_LIST)
                openai_id = stream.response.headers["x-request-id"]
                assert await ledger_row(pg_dsn, openai_id) == (TURN0_LIST, TURN0_LIST_COST, TURN0_LIST_COST)

                # Anthropic: message_start goes out before classification, and both usages are list price.
                slow_next_read()
                t0 = time.perf_counter()
                async with an.messages.stream(model="claude", system=system, messages=messages,
                                              max_tokens=64) as astream:
                    events: list[ParsedMessageStreamEvent[None]] = []
                    async for event in astream:
                        if not events:
                            first_after = time.perf_counter() - t0
                            pending_at_first = deadline_fallbacks() == 1.0
                        events.append(event)
                    final = await astream.get_final_message()
                held_at_end = relay.held
                await settle(proxy)
                start = events[0]
                assert start.type == "message_start"
                assert pending_at_first, "message_start waited for classification"
                assert first_after < deadline / 2
                assert held_at_end == 1, "the bill waited for the slow read, past the deadline"
                assert deadline_fallbacks() == 2.0
                # message_start went out before the lookup ended: list-price totals, no per-tier breakdown
                # (the SDK would keep it over message_delta's); message_delta carries the bill.
                for usage in (start.message.usage, final.usage):
                    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (
                        TURN0_LIST[0], 0, 0)
                    assert usage.cache_creation is None
                assert_anthropic_usage(next(e for e in events if e.type == "message_delta").usage, TURN0_LIST)
                anthropic_id = astream.response.headers["x-request-id"]
                assert await ledger_row(pg_dsn, anthropic_id) == (TURN0_LIST, TURN0_LIST_COST, TURN0_LIST_COST)

                # No discount and no index change: the cached entries were neither read (slid) nor rewritten.
                assert expiries(await entries(pg_dsn, principal)) == written
                logged = await fetch(pg_dsn, "SELECT request_id, status, read_tokens FROM request_log "
                                             "WHERE request_id = ANY($1::text[])", [openai_id, anthropic_id])
                assert sorted((r["status"], r["read_tokens"]) for r in logged) == [(200, 0), (200, 0)]
    finally:
        await relay.close()

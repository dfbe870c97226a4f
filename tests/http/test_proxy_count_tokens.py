"""Anthropic's token counting (issue 14, item 4): ``client.messages.count_tokens`` answered from the model's own
tokenizer, with no upstream call and nothing billed; bad input is the Messages API's 400/401/404."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_anthropic_error, post_raw
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique, words

COUNT = "/v1/messages/count_tokens"


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url = simulator[0]
    untokenized = model_config("claude-notok", url, "anthropic", word_tokenizer)
    del untokenized["tokenizer"]
    config = {"models": [model_config("claude", url, "anthropic", word_tokenizer, ignorePrefixes=["[date]"]),
                         model_config("chat", url + "/v1", "openai", word_tokenizer), untokenized]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def key(pg_dsn: str) -> str:
    return await new_key(pg_dsn, unique("count"))


def an(proxy: RunningProxy, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)


SYSTEM: Any = [{"type": "text", "text": "[date] " + words("today", 4)},
               {"type": "text", "text": words("sys", 30), "cache_control": {"type": "ephemeral"}}]
MESSAGES: Any = [{"role": "user", "content": words("first", 20)},
                 {"role": "assistant", "content": [{"type": "text", "text": words("reply", 7)}]},
                 {"role": "user", "content": words("second", 11)}]


async def test_counts_every_block_with_the_models_tokenizer_and_calls_no_upstream(
        proxy: RunningProxy, key: str, simulator: tuple[str, Simulator], pg_dsn: str) -> None:
    sim = simulator[1]
    before = len(sim.requests)
    raw = await an(proxy, key).messages.with_raw_response.count_tokens(model="claude", system=SYSTEM,
                                                                        messages=MESSAGES)
    # Every block, the ignored "[date] ..." part too, since the model reads it: (3 + 4) + 30 + 20 + 7 + 11.
    assert (await raw.parse()).input_tokens == 75
    assert len(sim.requests) == before  # answered here
    message = await an(proxy, key).messages.create(model="claude", max_tokens=8, system=SYSTEM, messages=MESSAGES)
    # The engine adds its template's tokens (the simulator's: 3 per message and for the system field).
    usage = message.usage
    assert usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0) \
        == 75 + 3 * 4
    await settle(proxy)
    conn = await asyncpg.connect(pg_dsn)
    try:
        counted_id = raw.headers["x-request-id"]
        logged = await conn.fetchval("SELECT count(*) FROM request_log WHERE request_id = $1", counted_id)
        billed = await conn.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", counted_id)
    finally:
        await conn.close()
    assert counted_id.startswith("req_") and (logged, billed) == (0, 0)  # counting bills nothing


async def test_tools_count_as_the_upstream_counts_them(proxy: RunningProxy, key: str) -> None:
    tools: Any = [{"name": "lookup", "description": words("tool", 6), "input_schema": {"type": "object"}}]
    with_tools = await an(proxy, key).messages.count_tokens(model="claude", tools=tools, messages=MESSAGES[:1])
    alone = await an(proxy, key).messages.count_tokens(model="claude", messages=MESSAGES[:1])
    assert alone.input_tokens == 20
    message = await an(proxy, key).messages.create(model="claude", max_tokens=8, tools=tools, messages=MESSAGES[:1])
    usage = message.usage
    # The simulator counts the tool's canonical JSON on its own, and adds 3 for the one message.
    assert usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0) \
        == with_tools.input_tokens + 3
    assert with_tools.input_tokens > 20 + 6


@pytest.mark.parametrize(("body", "status", "kind", "fragment"), [
    ({"model": "nope", "messages": MESSAGES}, 404, "not_found_error", "does not exist"),
    ({"model": "chat", "messages": MESSAGES}, 400, "invalid_request_error",
     "is not served on /v1/messages; use /v1/chat/completions"),
    ({"model": "claude-notok", "messages": MESSAGES}, 400, "invalid_request_error", "no tokenizer"),
    ({"messages": MESSAGES}, 400, "invalid_request_error", "model must be"),
    ({"model": "claude", "messages": "hi"}, 400, "invalid_request_error", "messages"),
    ({"model": "claude", "messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                                    "cache_control": {"type": "forever"}}]}]},
     400, "invalid_request_error", "unknown cache_control type"),
    ({"model": "claude", "messages": [{"role": "user", "content": [[[[]]]] * 2}]}, 400, "invalid_request_error",
     "must be an object"),
])
async def test_bad_input_is_the_messages_apis_error(proxy: RunningProxy, key: str, body: Any, status: int,
                                                     kind: str, fragment: str) -> None:
    async with aiohttp.ClientSession() as http:
        got, answer, request_id = await post_raw(http, proxy.url + COUNT, json.dumps(body),
                                                 {"x-api-key": key, "anthropic-version": "2023-06-01"})
    assert got == status and request_id is not None
    code = "invalid_cache_control" if "cache_control" in fragment else None
    assert fragment in assert_anthropic_error(answer, kind, code)


@pytest.mark.parametrize("raw", [b"{", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b'{"model": "claude", "messages": '
                                 + b'[{"role": "user", "content": "' + b"9" * 10 + b'"}], "x": ' + b"[" * 200
                                 + b"]" * 200 + b"}"])
async def test_malformed_bodies_are_400(proxy: RunningProxy, key: str, raw: bytes) -> None:
    async with aiohttp.ClientSession() as http:
        got, answer, _ = await post_raw(http, proxy.url + COUNT, raw, {"x-api-key": key})
    assert got == 400
    assert_anthropic_error(answer, "invalid_request_error")


async def test_needs_a_key(proxy: RunningProxy) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        await an(proxy, "pc_wrong").messages.count_tokens(model="claude", messages=MESSAGES)

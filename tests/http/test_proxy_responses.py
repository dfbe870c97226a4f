"""OpenAI's Responses API and OpenAI's own caching parameters, through the official SDK (issue 14, items 1 and 2).

The word tokenizer makes every count derivable by hand (see test_proxy_billing): the simulated upstream adds 3
template tokens per input item, as per chat message, so the three-turn conversation bills exactly what it bills
through Chat Completions with ``cache_control`` markers, whether its markers are OpenAI's
``prompt_cache_breakpoint`` (ttl 30m: the 1h tier; none: ``prompt_cache_retention="in_memory"``, the policy's
default 5m) on Chat Completions or on the Responses API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from promptcache.proxy.testing.simulator import REPLY, Simulator

from support.apierrors import assert_openai_error
from support.conversation import EXPECTED, as_responses_input, openai_turns, with_openai_breakpoints
from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, unique, words


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url = simulator[0]
    config = {"models": [
        model_config("chat", url + "/v1", ["openai", "openai-responses"], word_tokenizer),
        model_config("chat-only", url + "/v1", "openai", word_tokenizer),
        model_config("no-24h", url + "/v1", ["openai", "openai-responses"], word_tokenizer,
                     enabledTtls=["5m", "1h"]),
    ]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def client(proxy: RunningProxy, pg_dsn: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique("responses")),
                              max_retries=0)


async def request_log(pg_dsn: str, request_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM request_log WHERE request_id = $1", request_id)
    finally:
        await conn.close()
    assert row is not None
    return row


async def assert_billed(pg_dsn: str, request_id: str, api: str, expected: tuple[Any, ...]) -> None:
    prompt, out, read, c5m, c1h, uncached, cost = expected
    assert (await request_log(pg_dsn, request_id))["api"] == api
    row = await ledger(pg_dsn, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["read_tokens"]) == (prompt, out, read)
    assert (row["creation_5m"], row["creation_1h"], row["creation_24h"], row["uncached_tokens"]) == (
        c5m, c1h, 0, uncached)
    assert row["cost"] == cost
    assert row["list_cost"] == (Decimal(prompt) * 3 + Decimal(out) * 15) / 1_000_000


def assert_responses_usage(usage: Any, expected: tuple[Any, ...]) -> None:
    prompt, out, read, c5m, c1h, _, _ = expected
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, out, prompt + out)
    assert usage.input_tokens_details.cached_tokens == read
    assert usage.input_tokens_details.cache_write_tokens == c5m + c1h
    extra = usage.model_extra or {}
    assert extra["cache_read_input_tokens"] == read
    assert extra["cache_creation_input_tokens"] == c5m + c1h
    assert extra["cache_creation"] == {"ephemeral_5m_input_tokens": c5m, "ephemeral_1h_input_tokens": c1h,
                                       "ephemeral_24h_input_tokens": 0}


async def test_responses_three_turns_exact_splits_and_costs(proxy: RunningProxy, client: openai.AsyncOpenAI,
                                                            pg_dsn: str, simulator: tuple[str, Simulator]) -> None:
    for turn, expected in zip(openai_turns(), EXPECTED, strict=True):
        raw = await client.responses.with_raw_response.create(
            model="chat", input=as_responses_input(turn), prompt_cache_retention="in_memory")
        response = raw.parse()
        await settle(proxy)
        assert response.model == "chat" and response.output_text == REPLY
        assert response.usage is not None
        assert_responses_usage(response.usage, expected)
        await assert_billed(pg_dsn, raw.headers["x-request-id"], "openai-responses", expected)
        forwarded = simulator[1].requests[-1]
        assert forwarded["model"] == "sim-chat" and "prompt_cache_retention" not in forwarded
        assert all("prompt_cache_breakpoint" not in part for item in forwarded["input"]
                   if isinstance(item["content"], list) for part in item["content"])


async def test_responses_streamed_three_turns_exact_splits_and_costs(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str) -> None:
    for turn, expected in zip(openai_turns(), EXPECTED, strict=True):
        async with client.responses.stream(model="chat", input=as_responses_input(turn),
                                           prompt_cache_retention="in_memory") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        await settle(proxy)
        carrying = [e.response for e in events if hasattr(e, "response")]
        assert [e.type for e in events if hasattr(e, "response")] == [
            "response.created", "response.in_progress", "response.completed"]
        assert {r.model for r in carrying} == {"chat"}
        assert final.output_text == REPLY and final.usage is not None
        assert_responses_usage(final.usage, expected)
        await assert_billed(pg_dsn, await request_id_of(pg_dsn, "openai-responses"), "openai-responses", expected)


async def request_id_of(pg_dsn: str, api: str) -> str:
    """The latest ledger row's request id for ``api``: a stream's x-request-id is not on its final event."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        found = await conn.fetchval("SELECT request_id FROM request_log WHERE api = $1 ORDER BY ts DESC LIMIT 1", api)
    finally:
        await conn.close()
    assert isinstance(found, str)
    return found


async def test_chat_completions_with_openais_breakpoints_bill_like_cache_control(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str, simulator: tuple[str, Simulator]) -> None:
    for turn, expected in zip(openai_turns(), EXPECTED, strict=True):
        raw = await client.chat.completions.with_raw_response.create(
            model="chat", messages=with_openai_breakpoints(turn),
            prompt_cache_retention="in_memory")
        usage = raw.parse().usage
        await settle(proxy)
        prompt, out, read, c5m, c1h, _, _ = expected
        assert usage is not None and usage.prompt_tokens_details is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, out)
        assert usage.prompt_tokens_details.cached_tokens == read
        assert usage.prompt_tokens_details.cache_write_tokens == c5m + c1h
        await assert_billed(pg_dsn, raw.headers["x-request-id"], "openai", expected)
        forwarded = simulator[1].requests[-1]
        assert "prompt_cache_retention" not in forwarded
        assert all("prompt_cache_breakpoint" not in part for message in forwarded["messages"]
                   if isinstance(message["content"], list) for part in message["content"])


async def test_streamed_chat_completions_with_openais_breakpoints(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str) -> None:
    for turn, expected in zip(openai_turns(), EXPECTED, strict=True):
        async with client.chat.completions.with_streaming_response.create(
                model="chat", messages=with_openai_breakpoints(turn), stream=True,
                stream_options={"include_usage": True}, prompt_cache_retention="in_memory") as raw:
            request_id = raw.headers["x-request-id"]
            chunks = [chunk async for chunk in await raw.parse()]
        await settle(proxy)
        prompt, out, read, c5m, c1h, _, _ = expected
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, out)
        assert (usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens_details.cache_write_tokens) == (
            read, c5m + c1h)
        await assert_billed(pg_dsn, request_id, "openai", expected)


async def test_the_request_ttl_is_the_tier_of_breakpoints_without_one(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str) -> None:
    """``prompt_cache_options.ttl`` 30m: the 1h tier, for a breakpoint that names none; 12h on the part: 24h."""
    part: Any = {"type": "input_text", "text": words("opt", 20), "prompt_cache_breakpoint": {"mode": "explicit"}}
    raw = await client.responses.with_raw_response.create(
        model="chat", input=[{"role": "user", "content": [part]}],
        prompt_cache_options={"mode": "explicit", "ttl": "30m"})
    await settle(proxy)
    row = await ledger(pg_dsn, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["creation_5m"], row["creation_1h"], row["creation_24h"]) == (23, 0, 20, 0)
    part = {**part, "text": words("day", 20), "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"}}
    raw = await client.responses.with_raw_response.create(
        model="chat", input=[{"role": "user", "content": [part]}])
    await settle(proxy)
    row = await ledger(pg_dsn, raw.headers["x-request-id"])
    assert (row["creation_5m"], row["creation_1h"], row["creation_24h"]) == (0, 0, 20)
    # 20 tokens written at 24h, the 3 template tokens uncached, 8 out
    assert row["cost"] == (Decimal(3) * 3 + Decimal(20) * 3 * Decimal("2.5") + 8 * 15) / 1_000_000  # 24h: 2.5


async def test_prompt_cache_key_is_logged_and_forwarded(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str, simulator: tuple[str, Simulator]) -> None:
    raw = await client.responses.with_raw_response.create(model="chat", input=words("k", 12),
                                                          prompt_cache_key="tenant-7/agent")
    await settle(proxy)
    assert simulator[1].requests[-1]["prompt_cache_key"] == "tenant-7/agent"
    assert (await request_log(pg_dsn, raw.headers["x-request-id"]))["prompt_cache_key"] == "tenant-7/agent"
    chat = await client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": words("k", 12)}])
    await settle(proxy)
    assert (await request_log(pg_dsn, chat.headers["x-request-id"]))["prompt_cache_key"] is None


async def test_tools_function_calls_and_their_outputs_are_blocks_in_order(
        proxy: RunningProxy, client: openai.AsyncOpenAI, pg_dsn: str) -> None:
    """Tools, instructions, then the input items in order; a function call and its output are one block each, so
    the next turn reads everything the previous one wrote."""
    tools: Any = [{"type": "function", "name": "lookup", "description": "look a word up",
                   "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}, "strict": True}]
    items: list[Any] = [
        {"role": "user", "content": words("ask", 12)},
        {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"word": "x"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": words("found", 15),
         "prompt_cache_breakpoint": {"mode": "explicit"}},
    ]
    first = await client.responses.with_raw_response.create(model="chat", tools=tools, instructions=words("be", 10),
                                                            input=items)
    usage = first.parse().usage
    await settle(proxy)
    assert usage is not None and usage.input_tokens_details.cached_tokens == 0
    written = usage.input_tokens_details.cache_write_tokens
    log = await request_log(pg_dsn, first.headers["x-request-id"])
    assert log["chain_roles"] == ["tool_definition", "system", "user", "tool_call", "tool"]
    assert log["chain_tiers"] == [None, None, None, None, "5m"]
    assert written == log["chain_tokens"][-1] and written > 10 + 12 + 15
    second = await client.responses.with_raw_response.create(
        model="chat", tools=tools, instructions=words("be", 10),
        input=[*items, {"role": "user", "content": words("next", 12)}])
    usage = second.parse().usage
    await settle(proxy)
    assert usage is not None and usage.input_tokens_details.cached_tokens == written
    assert usage.input_tokens == written + 12 + 3 * 5  # template overhead: four input items and the instructions


async def test_previous_response_id_and_store_are_passed_through(
        proxy: RunningProxy, client: openai.AsyncOpenAI, simulator: tuple[str, Simulator], pg_dsn: str) -> None:
    """We bill what the upstream reports for the prefix it kept; the chain is only what this request sent."""
    raw = await client.responses.with_raw_response.create(model="chat", input=words("then", 12), store=True,
                                                          previous_response_id="resp_earlier")
    response = raw.parse()
    await settle(proxy)
    forwarded = simulator[1].requests[-1]
    assert (forwarded["store"], forwarded["previous_response_id"]) == (True, "resp_earlier")
    assert response.previous_response_id == "resp_earlier"
    log = await request_log(pg_dsn, raw.headers["x-request-id"])
    assert log["chain_roles"] == ["user"] and log["prompt_tokens"] == 15


async def test_models_served_elsewhere_and_unknown_models_are_openai_errors(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="chat-only", input="hello")
    assert "not served on /v1/responses; use /v1/chat/completions" in assert_openai_error(info.value.response.json())
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="nope", input="hello")
    assert "does not exist" in assert_openai_error(missing.value.response.json())


BREAKPOINT = {"mode": "explicit"}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def chat_part(**extra: Any) -> dict[str, Any]:
    return chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", **extra}]}])


def responses_body(**extra: Any) -> dict[str, Any]:
    return {"model": "chat", "input": "hi", **extra}


def responses_part(**extra: Any) -> dict[str, Any]:
    return responses_body(input=[{"role": "user", "content": [{"type": "input_text", "text": "hi", **extra}]}])


BAD = [
    ("chat", chat_body(prompt_cache_retention="forever"), "invalid_cache_control",
     "prompt_cache_retention: tier: unknown value 'forever'"),
    ("chat", {**chat_body(prompt_cache_retention="24h"), "model": "no-24h"}, "invalid_cache_control",
     "prompt_cache_retention: disabled_tier: tier '24h' is not enabled"),
    ("chat", chat_body(prompt_cache_options={"ttl": "7d"}), "invalid_cache_control",
     "prompt_cache_options.ttl: tier: unknown ttl '7d'"),
    ("chat", chat_body(prompt_cache_options=[1]), "invalid_cache_control", "prompt_cache_options: type: must be an "),
    ("chat", chat_body(prompt_cache_options={"mode": "sometimes"}), "invalid_cache_control",
     "prompt_cache_options.mode: type: unknown mode 'sometimes'"),
    ("chat", chat_body(prompt_cache_options={"depth": 1}), "invalid_cache_control",
     "prompt_cache_options: type: unknown keys ['depth']"),
    ("chat", chat_body(prompt_cache_options={"prewarm": True}), "invalid_cache_control",
     "prompt_cache_options.prewarm: type: prewarming is not supported"),
    ("chat", chat_body(prompt_cache_retention="24h", prompt_cache_options={"ttl": "30m"}), "invalid_cache_control",
     "prompt_cache_retention: tier: asks for 24h but prompt_cache_options.ttl asks for 1h"),
    ("chat", chat_part(prompt_cache_breakpoint={"mode": "implicit"}), "invalid_cache_control",
     "(messages[0].content[0].prompt_cache_breakpoint.mode): type: unknown mode 'implicit'"),
    ("chat", chat_part(prompt_cache_breakpoint={**BREAKPOINT, "ttl": "1w"}), "invalid_cache_control",
     "(messages[0].content[0].prompt_cache_breakpoint.ttl): tier: unknown ttl '1w'"),
    ("chat", chat_part(prompt_cache_breakpoint="explicit"), "invalid_cache_control",
     "(messages[0].content[0].prompt_cache_breakpoint): type: must be an object, got 'explicit'"),
    ("chat", chat_part(prompt_cache_breakpoint=BREAKPOINT, cache_control={"type": "ephemeral"}),
     "invalid_cache_control", "a block carries one marker; this one has cache_control and prompt_cache_breakpoint"),
    ("chat", chat_body(prompt_cache_key=7), None, "prompt_cache_key must be a string of at most 1024 characters"),
    ("chat", chat_body(prompt_cache_key="k" * 1025), None, "prompt_cache_key must be a string"),
    ("responses", responses_body(instructions=["be brief"]), None, "instructions must be a string"),
    ("responses", responses_body(input=7), None, "input must be a string or an array of input items"),
    ("responses", responses_body(input=["hi"]), None, "input[0] must be an object"),
    ("responses", responses_body(input=[{"content": "hi"}]), None, "input[0].type must be a non-empty string"),
    ("responses", responses_body(input=[{"type": "a\u0000b"}]), None, "input[0].type must be a non-empty string"),
    ("responses", responses_body(input=[{"role": "", "content": "hi"}]), None, "input[0].role must be a non-empty"),
    ("responses", responses_body(input=[{"role": "user", "content": 5}]), None,
     "input[0].content must be a string or an array of content parts"),
    ("responses", responses_body(input=[{"role": "user", "content": "hi", "prompt_cache_breakpoint": BREAKPOINT}]),
     "invalid_cache_control", "input[0]: placement: prompt_cache_breakpoint on a whole message is not read"),
    ("responses", responses_part(prompt_cache_breakpoint={"mode": "explicit", "ttl": "12h"}) | {"model": "no-24h"},
     "invalid_cache_control",
     "(input[0].content[0].prompt_cache_breakpoint.ttl): disabled_tier: tier '24h' is not enabled"),
    ("responses", responses_body(prompt_cache_options={"ttl": 30}), "invalid_cache_control",
     "prompt_cache_options.ttl: tier: unknown ttl 30"),
    ("responses", responses_body(stream="yes"), None, "stream must be true or false"),
    ("responses", responses_body(stream_options=3), None, "stream_options must be an object"),
]


@pytest.mark.parametrize(("api", "body", "code", "message"), BAD, ids=[f"{b[0]}: {b[3][:50]}" for b in BAD])
async def test_bad_caching_fields_are_400s_naming_the_field(proxy: RunningProxy, client: openai.AsyncOpenAI,
                                                            api: str, body: Any, code: str | None,
                                                            message: str) -> None:
    path = "/v1/chat/completions" if api == "chat" else "/v1/responses"
    async with aiohttp.ClientSession() as http, http.post(
            proxy.url + path, data=json.dumps(body),
            headers={"authorization": f"Bearer {client.api_key}", "content-type": "application/json"}) as answer:
        status, payload = answer.status, await answer.json()
    assert status == 400
    assert message in assert_openai_error(payload, code)


HOSTILE = [
    (b'{"model": "chat", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    (b'{"model": "chat", "input": [{"role": "user", "content": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}]}",
     "nested"),
    (b'{"model": "chat", "input": "caf\xe9"}', "not valid JSON"),
    (b'{"model": "chat", "input": "hi", "prompt_cache_retention": ' + b"9" * 400 + b"}", "prompt_cache_retention"),
    (b'{"model": "chat", "input": "hi", "prompt_cache_options": {"ttl": 1e999}}', "prompt_cache_options.ttl"),
    (b'{"model": "chat", "input": [{"type": "function_call", "arguments": "' + b"x" * 100_000 + b'"}],'
     b' "prompt_cache_options": {"ttl": "5m", "mode": "' + b"m" * 10_000 + b'"}}', "unknown mode 'mmmm"),
]


@pytest.mark.parametrize(("raw", "message"), HOSTILE, ids=["deep input", "deep part", "latin-1", "huge integer",
                                                           "huge float", "huge mode"])
async def test_hostile_responses_bodies_are_400s(proxy: RunningProxy, client: openai.AsyncOpenAI, raw: bytes,
                                                 message: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            proxy.url + "/v1/responses", data=raw,
            headers={"authorization": f"Bearer {client.api_key}", "content-type": "application/json"}) as answer:
        status, payload = answer.status, await answer.json()
    assert status == 400
    text = assert_openai_error(payload, "invalid_cache_control" if "prompt_cache" in message or "mode" in message
                               else None)
    assert message in text and len(text) < 400

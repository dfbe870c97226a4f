"""Cache-miss diagnostics (issue 14, item 5): why the longest prefix the previous request wrote was not read, from the
two requests' logged chains, within the caller's own scope, through each API's own way of asking.

Word tokenizer, minPrefixTokens 10. The conversation: one tool, a 20-word system prompt marked 1h, a 10-word
question marked 5m; its chain is tool · system · question, and the previous request wrote up to the question.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_anthropic_error, assert_openai_error
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, text, unique, words

TOOLS: Any = [{"name": "lookup", "description": "look a word up", "input_schema": {"type": "object"}}]
SYSTEM, QUESTION = words("rules", 20), words("why", 10)


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url = simulator[0]
    config = {"models": [model_config("claude", url, "anthropic", word_tokenizer),
                         model_config("claude-b", url, "anthropic", word_tokenizer),
                         model_config("chat", url + "/v1", ["openai", "openai-responses"], word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def an(proxy: RunningProxy, pg_dsn: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, unique("diag")), max_retries=0)


async def chain_tokens(pg_dsn: str, request_id: str) -> list[int]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        tokens = await conn.fetchval("SELECT chain_tokens FROM request_log WHERE request_id = $1", request_id)
    finally:
        await conn.close()
    assert isinstance(tokens, list)
    return tokens


async def ask(proxy: RunningProxy, an: anthropic.AsyncAnthropic, previous: str | None, *, model: str = "claude",
              system: str = SYSTEM, question: str = QUESTION, tools: Any = TOOLS) -> tuple[Any, str]:
    raw = await an.messages.with_raw_response.create(
        model=model, max_tokens=8, tools=tools, system=[text(system, "1h")],
        messages=[{"role": "user", "content": [text(question, "5m")]}],
        diagnostics={"previous_message_id": previous},
        extra_headers={"anthropic-beta": "cache-diagnosis-2026-04-07"})
    message = await raw.parse()
    await settle(proxy)
    return message, raw.headers["x-request-id"]


def reason(message: Any) -> Any:
    assert message.diagnostics is not None
    found = message.diagnostics.cache_miss_reason
    return None if found is None else found.model_dump(exclude_none=True) | dict(found.model_extra or {})


async def test_anthropic_reasons_from_the_chains(proxy: RunningProxy, an: anthropic.AsyncAnthropic, pg_dsn: str,
                                                 simulator: tuple[str, Simulator]) -> None:
    first, first_id = await ask(proxy, an, None)
    assert reason(first) is None  # asked on a first turn: nothing to compare with
    assert "diagnostics" not in simulator[1].requests[-1]  # ours to answer, never forwarded
    tool, system, question = await chain_tokens(pg_dsn, first_id)
    assert (system - tool, question - system) == (20, 10)

    again, _ = await ask(proxy, an, first.id)  # the upstream's message id names it ...
    assert reason(again) is None
    by_ours, _ = await ask(proxy, an, first_id)  # ... and so does our request id
    assert reason(by_ours) is None

    changed, _ = await ask(proxy, an, first.id, system=words("other", 20))
    assert reason(changed) == {"type": "system_changed", "cache_missed_input_tokens": question}
    tools, _ = await ask(proxy, an, first.id, tools=[{**TOOLS[0], "description": "look it up"}])
    assert reason(tools) == {"type": "tools_changed", "cache_missed_input_tokens": question}
    message, _ = await ask(proxy, an, first.id, question=words("how", 10))  # reads the system prompt, 1h
    assert reason(message) == {"type": "messages_changed", "cache_missed_input_tokens": question - system,
                               "block": 2}
    assert message.usage.cache_read_input_tokens == system

    other_model, _ = await ask(proxy, an, first.id, model="claude-b")
    assert reason(other_model) == {"type": "model_changed", "cache_missed_input_tokens": question}
    missing, _ = await ask(proxy, an, "msg_never_was")
    assert reason(missing) == {"type": "previous_message_not_found"}
    stranger = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, unique("diag-other")),
                                        max_retries=0)
    theirs, _ = await ask(proxy, stranger, first_id)  # another principal's request is not found, never compared
    assert reason(theirs) == {"type": "previous_message_not_found"}


async def test_below_min_prefix_and_expired(proxy: RunningProxy, an: anthropic.AsyncAnthropic, pg_dsn: str) -> None:
    short, _ = await ask(proxy, an, None, tools=None, system=words("s", 3), question=words("q", 2))
    again, _ = await ask(proxy, an, short.id, tools=None, system=words("s", 3), question=words("q", 2))
    assert reason(again) == {"type": "below_min_prefix", "cache_missed_input_tokens": 5}

    first, first_id = await ask(proxy, an, None, system=words("aged", 20))
    written = (await chain_tokens(pg_dsn, first_id))[-1]
    conn = await asyncpg.connect(pg_dsn)  # six minutes pass for the 5m entry (the 1h one stays live)
    try:
        await conn.execute("UPDATE request_log SET ts = ts - interval '6 minutes' WHERE request_id = $1", first_id)
        await conn.execute("UPDATE cache_entries SET expires_at = now() - interval '1 minute' "
                           "WHERE principal_id = (SELECT principal_id FROM request_log WHERE request_id = $1) "
                           "AND tier = '5m'", first_id)
    finally:
        await conn.close()
    later, _ = await ask(proxy, an, first.id, system=words("aged", 20))
    system = (await chain_tokens(pg_dsn, first_id))[1]
    assert later.usage.cache_read_input_tokens == system
    assert reason(later) == {"type": "expired", "cache_missed_input_tokens": written - system}


async def test_anthropic_streams_carry_it_in_message_start(proxy: RunningProxy, an: anthropic.AsyncAnthropic,
                                                           pg_dsn: str) -> None:
    first, _ = await ask(proxy, an, None)
    async with an.messages.stream(
            model="claude", max_tokens=8, tools=TOOLS, system=[text(SYSTEM, "1h")],
            messages=[{"role": "user", "content": [text(words("later", 10), "5m")]}],
            diagnostics={"previous_message_id": first.id}) as stream:
        events = [event async for event in stream]
    (start,) = [e for e in events if e.type == "message_start"]
    assert reason(start.message) == {"type": "messages_changed", "cache_missed_input_tokens": 10, "block": 2}


async def test_openai_asks_by_header_and_responses_by_comparison_id(proxy: RunningProxy, pg_dsn: str) -> None:
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, unique("diag-oa")),
                            max_retries=0)
    messages: Any = [{"role": "system", "content": [text(SYSTEM, "1h")]},
                     {"role": "user", "content": [text(QUESTION, "5m")]}]
    first = await oa.chat.completions.with_raw_response.create(model="chat", messages=messages)
    await settle(proxy)
    first_id = first.headers["x-request-id"]
    diagnose = {"x-promptcache-diagnose": first_id}
    changed: Any = [messages[0], {"role": "user", "content": [text(words("else", 10), "5m")]}]
    answer = await oa.chat.completions.create(model="chat", messages=changed, extra_headers=diagnose)
    assert (answer.model_extra or {})["prompt_cache_diagnostics"] == {
        "type": "cache_miss", "reason": "messages_changed", "cache_missed_tokens": 10,
        "comparison_reusable_tokens": 20, "block": 1}
    chunks = [c async for c in await oa.chat.completions.create(
        model="chat", messages=messages, stream=True, stream_options={"include_usage": True}, extra_headers=diagnose)]
    assert (chunks[-1].model_extra or {})["prompt_cache_diagnostics"] == {
        "type": "cache_hit", "comparison_reusable_tokens": 30}
    await settle(proxy)

    input_items: Any = [{"role": "system", "content": [{"type": "input_text", "text": SYSTEM,
                                                        "prompt_cache_breakpoint": {"mode": "explicit",
                                                                                    "ttl": "30m"}}]},
                        {"role": "user", "content": words("fresh", 10)}]
    response = await oa.responses.create(model="chat", input=input_items)
    await settle(proxy)
    same_text: Any = [input_items[0], {"role": "user", "content": words("other", 10)}]
    compared = await oa.responses.create(model="chat", input=same_text,
                                         prompt_cache_options={"comparison_response_id": response.id})
    assert compared.prompt_cache_diagnostics is not None
    assert compared.prompt_cache_diagnostics.model_dump(exclude_none=True) == {
        "type": "cache_hit", "comparison_reusable_tokens": 20}
    async with oa.responses.stream(model="chat", input=same_text, extra_headers={"x-promptcache-diagnose": "nope"}
                                   ) as stream:
        final = await stream.get_final_response()
    found = final.prompt_cache_diagnostics
    assert found is not None and found.model_dump(exclude_none=True) == {"type": "comparison_response_not_found"}


@pytest.mark.parametrize(("path", "body", "headers", "fragment"), [
    ("/v1/messages", {"diagnostics": "yes"}, {}, "diagnostics must be an object with only previous_message_id"),
    ("/v1/messages", {"diagnostics": {"previous_message_id": 5}}, {}, "diagnostics.previous_message_id must be"),
    ("/v1/messages", {"diagnostics": {"previous_message_id": "m" * 300}}, {}, "1 to 256 printable ASCII"),
    ("/v1/messages", {"diagnostics": {"previous": "x"}}, {}, "diagnostics must be an object"),
    ("/v1/chat/completions", {}, {"x-promptcache-diagnose": "x" * 257}, "x-promptcache-diagnose must be"),
    ("/v1/responses", {"prompt_cache_options": {"comparison_response_id": ""}}, {},
     "prompt_cache_options.comparison_response_id must be"),
])
async def test_malformed_asks_are_400s_naming_the_field(proxy: RunningProxy, pg_dsn: str, path: str,
                                                        body: dict[str, Any], headers: dict[str, str],
                                                        fragment: str) -> None:
    key = await new_key(pg_dsn, unique("diag-bad"))
    bases: dict[str, dict[str, Any]] = {
        "/v1/messages": {"model": "claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/chat/completions": {"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        "/v1/responses": {"model": "chat", "input": "hi"}}
    base = bases[path]
    async with aiohttp.ClientSession() as http, http.post(
            proxy.url + path, json={**base, **body}, headers={"x-api-key": key, **headers}) as answer:
        status, payload = answer.status, await answer.json()
    assert status == 400
    if path == "/v1/messages":
        message = assert_anthropic_error(payload, "invalid_request_error")
    else:
        message = assert_openai_error(payload)
    assert fragment in message

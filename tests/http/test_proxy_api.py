"""The proxy's HTTP surface (docs/design.md#the-request-path): bad input, auth, operations, config reload, no tokenizer.

Counts are by hand as in test_proxy_billing: with the word tokenizer ``words(p, n)`` is n tokens,
the simulated upstream adds 3 template tokens per message (and per Anthropic system field) and
replies with 8 tokens. Prices 3.00 in / 15.00 out per million; multipliers 1h 2.0, 5m 1.25,
read 0.1. Principals carry a random suffix because the session shares one database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from promptcache.proxy.http.server import JsonFormatter
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.testing.simulator import REPLY, Simulator

from support.apierrors import assert_anthropic_error, assert_error, assert_openai_error, post_raw
from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, unique, words

MAX_BODY = 65536
OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
ENDPOINT = {"openai": OPENAI, "anthropic": ANTHROPIC}
SYSTEM = words("sys", 20)
USER = [words("first", 10), words("second", 10)]


def text(t: str, ttl: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "text", "text": t}
    if ttl:
        part["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return part




def api_config(url: str, tokenizer: Path, **top: Any) -> dict[str, Any]:
    """chat / claude with the word tokenizer (5m and 1h enabled); chat-notok / claude-notok configured without one."""
    without = [model_config(alias, base, api, tokenizer)
               for alias, base, api in (("chat-notok", url + "/v1", "openai"), ("claude-notok", url, "anthropic"))]
    for model in without:
        del model["tokenizer"]
    return {
        "models": [
            model_config("chat", url + "/v1", "openai", tokenizer, enabledTtls=["5m", "1h"]),
            model_config("claude", url, "anthropic", tokenizer, enabledTtls=["5m", "1h"]),
            *without,
        ],
        "limits": {"maxBodyBytes": MAX_BODY},
        **top,
    }


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    async with running_proxy(api_config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session




@pytest.fixture
async def key(pg_dsn: str) -> str:
    return await new_key(pg_dsn, unique("api"))


def oa(proxy: RunningProxy, key: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, **kwargs)


def an(proxy: RunningProxy, key: str, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0, **kwargs)


def first_turn_openai() -> list[dict[str, Any]]:
    return [{"role": "system", "content": [text(SYSTEM, "1h")]}, {"role": "user", "content": [text(USER[0], "5m")]}]


def second_turn_openai() -> list[dict[str, Any]]:
    return [{"role": "system", "content": [text(SYSTEM, "1h")]}, {"role": "user", "content": USER[0]},
            {"role": "assistant", "content": REPLY}, {"role": "user", "content": [text(USER[1], "5m")]}]


# -- bad input (docs/design.md#the-request-path): 400 / 404 / 413 in the calling API's shape, never a 5xx
# ---------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize(("raw", "fragment"), [
    (b"{", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"not json", "not valid JSON"),
    (b'{"model": "chat",}', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "tab\tinside"}]}', "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (b"[]", "must be a JSON object"),
    (b'"a string"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800 alone"}]}', "surrogate"),
    (b'{"model": "claude", "max_tokens": 5, "metadata": {"note": "\\udfff"}, "messages": []}', "surrogate"),
])
async def test_unparseable_bodies_are_400(proxy: RunningProxy, http: aiohttp.ClientSession, key: str, api: str,
                                          raw: bytes, fragment: str) -> None:
    status, body, request_id = await post_raw(http, proxy.url + ENDPOINT[api], raw,
                                              {"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert status == 400
    assert fragment in assert_error(api, 400, body)
    assert request_id is not None and request_id.startswith("req_")


async def test_escaped_surrogate_pairs_are_fine(proxy: RunningProxy, http: aiohttp.ClientSession, key: str) -> None:
    """An emoji escaped as a surrogate pair is valid Unicode (json.dumps' default ensure_ascii output)."""
    raw = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "smile \U0001f600"}]}).encode()
    assert b"\\ud83d\\ude00" in raw
    status, body, _ = await post_raw(http, proxy.url + OPENAI, raw, {"authorization": f"Bearer {key}"})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 2 + 3


OPENAI_BAD_FIELDS = [
    ({"messages": "hi"}, "messages must be an array"),
    ({"messages": {"role": "user", "content": "hi"}}, "messages must be an array"),
    ({"messages": [5]}, "messages[0] must be an object"),
    ({"messages": [{"role": 5, "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user\x00x", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string or an array"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0] must be an object"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": {"id": 1}}]}, "tool_calls must be an array"),
    ({"tools": {"type": "function"}}, "tools must be an array"),
    ({"tools": ["f"]}, "tools[0] must be an object"),
    ({"stream": "yes"}, "stream must be true or false"),
    ({"stream": 1}, "stream must be true or false"),
    ({"stream": True, "stream_options": ["include_usage"]}, "stream_options must be an object"),
    ({"model": 5}, "model must be a non-empty string"),
    ({"model": ""}, "model must be a non-empty string"),
    ({"model": None}, "model must be a non-empty string"),
]


@pytest.mark.parametrize(("override", "fragment"), OPENAI_BAD_FIELDS)
async def test_openai_wrong_field_types(proxy: RunningProxy, key: str, simulator: tuple[str, Simulator],
                                        override: dict[str, Any], fragment: str) -> None:
    forwarded = len(simulator[1].requests)
    with pytest.raises(openai.BadRequestError) as info:
        await oa(proxy, key).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], extra_body=override)
    assert info.value.status_code == 400
    assert fragment in assert_openai_error(info.value.response.json())
    assert info.value.response.headers["x-request-id"].startswith("req_")
    assert len(simulator[1].requests) == forwarded, "a bad request was forwarded upstream"


ANTHROPIC_BAD_FIELDS = [
    ({"messages": "hi"}, "messages must be an array"),
    ({"messages": [[]]}, "messages[0] must be an object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string or an array"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string or an array"),
    ({"messages": [{"role": "user", "content": [None]}]}, "messages[0].content[0] must be an object"),
    ({"system": 5}, "system must be a string or an array"),
    ({"system": [["nested"]]}, "system[0] must be an object"),
    ({"tools": "none"}, "tools must be an array"),
    ({"stream": "true"}, "stream must be true or false"),
    ({"stream": None}, "stream must be true or false"),
    ({"model": ["claude"]}, "model must be a non-empty string"),
]


@pytest.mark.parametrize(("override", "fragment"), ANTHROPIC_BAD_FIELDS)
async def test_anthropic_wrong_field_types(proxy: RunningProxy, key: str, simulator: tuple[str, Simulator],
                                           override: dict[str, Any], fragment: str) -> None:
    forwarded = len(simulator[1].requests)
    with pytest.raises(anthropic.BadRequestError) as info:
        await an(proxy, key).messages.create(
            model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}], extra_body=override)
    assert info.value.status_code == 400
    assert fragment in assert_anthropic_error(info.value.response.json(), "invalid_request_error")
    assert len(simulator[1].requests) == forwarded, "a bad request was forwarded upstream"


async def test_oversize_body_is_413(proxy: RunningProxy, http: aiohttp.ClientSession, key: str) -> None:
    big = "x" * MAX_BODY
    # With a Content-Length, through the SDKs.
    with pytest.raises(openai.APIStatusError) as oinfo:
        await oa(proxy, key).chat.completions.create(model="chat", messages=[{"role": "user", "content": big}])
    assert oinfo.value.status_code == 413
    assert "65536-byte limit" in assert_openai_error(oinfo.value.response.json())
    with pytest.raises(anthropic.RequestTooLargeError) as ainfo:
        await an(proxy, key).messages.create(model="claude", max_tokens=8,
                                             messages=[{"role": "user", "content": big}])
    assert ainfo.value.status_code == 413
    assert_anthropic_error(ainfo.value.response.json(), "request_too_large")

    # Chunked, without a Content-Length: the limit is enforced on the bytes that arrive.
    for api in ("openai", "anthropic"):
        body = json.dumps({"model": "chat" if api == "openai" else "claude", "max_tokens": 8,
                           "messages": [{"role": "user", "content": big}]}).encode()
        status, error, _ = await post_raw(http, proxy.url + ENDPOINT[api], chunked(body),
                                          {"authorization": f"Bearer {key}"})
        assert status == 413
        assert_error(api, 413, error)


async def chunked(body: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    """The body in pieces with pauses, so it reaches the proxy over many reads (no Content-Length)."""
    for i in range(0, len(body), size):
        yield body[i:i + size]
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_body_just_under_the_limit_in_many_chunks_is_served(
        proxy: RunningProxy, http: aiohttp.ClientSession, key: str, api: str) -> None:
    """A body that arrives over many TCP reads is read whole, not cut at the first chunk."""
    n = 10500
    body = {"model": "chat" if api == "openai" else "claude", "max_tokens": 8,
            "messages": [{"role": "user", "content": words("w", n)}]}
    raw = json.dumps(body).encode()
    assert MAX_BODY - 8192 < len(raw) <= MAX_BODY
    status, answer, _ = await post_raw(http, proxy.url + ENDPOINT[api], chunked(raw),
                                       {"authorization": f"Bearer {key}"})
    assert status == 200, answer
    usage = answer["usage"]
    assert (usage["prompt_tokens"] if api == "openai" else usage["input_tokens"]) == n + 3


async def test_anthropic_stream_ignores_a_foreign_stream_options_field(
        proxy: RunningProxy, http: aiohttp.ClientSession, key: str) -> None:
    """``stream_options`` is not part of the Anthropic API: whatever its type, it is the upstream's business."""
    body = json.dumps({"model": "claude", "max_tokens": 8, "stream": True, "stream_options": "junk",
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with http.post(proxy.url + ANTHROPIC, data=body, headers={"x-api-key": key}) as response:
        assert response.status == 200
        assert b"event: message_stop" in await response.read()


@pytest.mark.parametrize("odd_type", [[], ["image"], {"kind": "image"}, 3, None])
async def test_a_part_with_a_non_string_type_is_still_classified(
        proxy: RunningProxy, pg_dsn: str, key: str, odd_type: Any) -> None:
    """Such a part is not an image: it is counted by its canonical JSON, and the breakpoint before it is written."""
    messages = [{"role": "user", "content": [text(words("odd", 12), "5m"), {"type": odd_type, "text": "x"}]}]
    raw = await oa(proxy, key).chat.completions.with_raw_response.create(
        model="chat", messages=messages)  # type: ignore[arg-type]
    usage = raw.parse().usage
    await settle(proxy)
    assert usage is not None
    assert (usage.model_extra or {})["cache_creation"]["ephemeral_5m_input_tokens"] == 12
    row = await ledger(pg_dsn, raw.headers["x-request-id"])
    assert row["creation_5m"] == 12 and row["cost"] != row["list_cost"]


async def test_unknown_model_is_404(proxy: RunningProxy, key: str) -> None:
    with pytest.raises(openai.NotFoundError) as oinfo:
        await oa(proxy, key).chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert oinfo.value.status_code == 404
    assert "'gpt-nope' does not exist" in assert_openai_error(oinfo.value.response.json())
    with pytest.raises(anthropic.NotFoundError) as ainfo:
        await an(proxy, key).messages.create(model="claude-nope", max_tokens=8,
                                             messages=[{"role": "user", "content": "hi"}])
    assert ainfo.value.status_code == 404
    assert "'claude-nope' does not exist" in assert_anthropic_error(ainfo.value.response.json(), "not_found_error")


async def test_wrong_endpoint_for_the_models_api_is_400(proxy: RunningProxy, key: str) -> None:
    with pytest.raises(openai.BadRequestError) as oinfo:
        await oa(proxy, key).chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    assert "model 'claude' is not served on /v1/chat/completions; use /v1/messages" in assert_openai_error(
        oinfo.value.response.json())
    with pytest.raises(anthropic.BadRequestError) as ainfo:
        await an(proxy, key).messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    message = assert_anthropic_error(ainfo.value.response.json(), "invalid_request_error")
    assert "model 'chat' is not served on /v1/messages; use /v1/chat/completions" in message


def marked(*ttls: str | None, marker: Any = None) -> list[dict[str, Any]]:
    """One user message with a text part per ttl (None: no marker); ``marker`` overrides the first's."""
    parts = [text(words(f"p{i}x", 12), ttl) for i, ttl in enumerate(ttls)]
    if marker is not None:
        parts[0]["cache_control"] = marker
    return [{"role": "user", "content": parts}]


# (messages, top-level cache_control, block index named, rule)
INVALID_MARKERS: list[tuple[list[dict[str, Any]], Any, str, str]] = [
    (marked("5m", "2h"), None, "block 1 (messages[0].content[1])", "tier"),
    (marked("24h"), None, "block 0 (messages[0].content[0])", "disabled_tier"),
    (marked(None, marker={"type": "persistent"}), None, "block 0 (messages[0].content[0])", "type"),
    (marked(None, marker="ephemeral"), None, "block 0 (messages[0].content[0])", "type"),
    (marked(None, marker={"type": "ephemeral", "ttl": "5m", "scope": "global"}), None, "block 0", "type"),
    (marked("5m", "1h"), None, "block 1 (messages[0].content[1])", "ttl_order"),
    (marked("1h", "1h", "5m", "5m", "5m"), None, "block 4 (messages[0].content[4])", "too_many_breakpoints"),
    (marked("1h", "5m"), {"type": "ephemeral", "ttl": "1h"}, "block 1 (messages[0].content[1])",
     "automatic_conflict"),
    (marked("1h", "1h", "5m", "5m", None), {"type": "ephemeral"}, "block 4 (messages[0].content[4])",
     "automatic_conflict"),
    ([{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}], None, "messages[0]",
     "placement"),
]


@pytest.mark.parametrize(("messages", "top", "where", "rule"), INVALID_MARKERS)
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_invalid_cache_control_is_400_naming_block_and_rule(
        proxy: RunningProxy, key: str, simulator: tuple[str, Simulator], api: str,
        messages: list[dict[str, Any]], top: Any, where: str, rule: str) -> None:
    forwarded = len(simulator[1].requests)
    extra = {} if top is None else {"cache_control": top}
    if api == "openai":
        with pytest.raises(openai.BadRequestError) as oinfo:
            await oa(proxy, key).chat.completions.create(model="chat", messages=messages,  # type: ignore[arg-type]
                                                         extra_body=extra)
        message = assert_openai_error(oinfo.value.response.json(), "invalid_cache_control")
    else:
        with pytest.raises(anthropic.BadRequestError) as ainfo:
            await an(proxy, key).messages.create(model="claude", max_tokens=8, messages=messages,  # type: ignore[arg-type]
                                                 extra_body=extra)
        message = assert_anthropic_error(ainfo.value.response.json(), "invalid_request_error",
                                         "invalid_cache_control")
    assert message.startswith(where), message
    assert f": {rule}: " in message
    assert len(simulator[1].requests) == forwarded, "a request with invalid markers was forwarded upstream"
    assert proxy.server.proxy.metrics.registry.get_sample_value(
        "promptcache_markers_rejected_total", {"rule": rule}) == 1


# -- random bodies: never a 5xx --------------------------------------------------------------------

_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12))
JSON = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)


def mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any] = JSON) -> st.SearchStrategy[Any]:
    """``valid`` about five times in six, else ``junk``: deep enough to reach the index and upstream."""
    return st.sampled_from([True] * 5 + [False]).flatmap(lambda ok: valid if ok else junk)


TEXT = st.text(max_size=30) | st.integers(0, 30).map(lambda n: words("f", n))
MARKER = st.one_of(st.none(), JSON, st.fixed_dictionaries(
    {"type": mostly(st.just("ephemeral"), st.just("other") | JSON)},
    optional={"ttl": mostly(st.sampled_from(["5m", "1h"]), st.sampled_from(["24h", "2h"]) | JSON)}))
PART = mostly(st.fixed_dictionaries(
    {"type": mostly(st.just("text"), st.sampled_from(["image", "tool_use", "tool_result"]) | JSON),
     "text": mostly(TEXT)},
    optional={"cache_control": MARKER, "input": JSON}))
CONTENT = mostly(TEXT | st.lists(PART, min_size=1, max_size=4))
ROLE = mostly(st.sampled_from(["user", "assistant"]), st.sampled_from(["system", "tool", "user\x00"]) | JSON)
MESSAGE = mostly(st.fixed_dictionaries({"role": ROLE, "content": CONTENT},
                                       optional={"tool_calls": mostly(st.lists(PART, max_size=2)), "name": JSON}),
                 JSON | st.fixed_dictionaries({"role": ROLE, "content": CONTENT, "cache_control": MARKER}))
TOOL = mostly(st.fixed_dictionaries({"name": st.text(max_size=8), "input_schema": JSON},
                                    optional={"cache_control": MARKER}))


def request_body(api: str) -> st.SearchStrategy[bytes]:
    models = ["chat", "chat-notok"] if api == "openai" else ["claude", "claude-notok"]
    request = st.fixed_dictionaries(
        {"model": mostly(st.sampled_from(models), st.sampled_from(["chat", "claude", "nope"]) | JSON),
         "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=4))},
        optional={"tools": mostly(st.lists(TOOL, max_size=3)), "system": CONTENT, "cache_control": MARKER,
                  "stream": mostly(st.booleans()), "max_tokens": mostly(st.integers(1, 64)),
                  "stream_options": mostly(st.fixed_dictionaries({"include_usage": mostly(st.booleans())}))})
    return mostly(request.map(lambda v: json.dumps(v).encode()),
                  st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))


API_AND_BODY = st.sampled_from(["openai", "anthropic"]).flatmap(lambda api: st.tuples(st.just(api),
                                                                                     request_body(api)))


async def test_random_bodies_never_5xx(proxy: RunningProxy, http: aiohttp.ClientSession, key: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Hypothesis drives one running proxy from a worker thread; each example hops onto the session loop.

    Beyond the status: no example may make the proxy log an error (a classification that crashed is
    billed at list price, which a status code alone would not show).
    """
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    seen: dict[int, int] = {}

    async def send(path: str, raw: bytes) -> tuple[int, bytes, str]:
        async with http.post(proxy.url + path, data=raw, headers={"authorization": f"Bearer {key}",
                                                                 "content-type": "application/json"}) as response:
            return response.status, await response.read(), response.headers.get("content-type", "")

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=API_AND_BODY)
    def check(case: tuple[str, bytes]) -> None:
        api, raw = case
        status, payload, ctype = asyncio.run_coroutine_threadsafe(send(ENDPOINT[api], raw), loop).result(30)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (status, payload[:500])
        assert status in (200, 400, 404), (status, payload[:500])
        if status >= 400:
            body = json.loads(payload)
            code = "invalid_cache_control" if b"invalid_cache_control" in payload else None
            assert_error(api, status, body, code)
        elif ctype.startswith("application/json"):
            assert "usage" in json.loads(payload)
        else:
            assert ctype.startswith("text/event-stream")
            assert b"error" not in payload, payload[-500:]

    await asyncio.to_thread(check)
    await settle(proxy)
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen
    assert not proxy.server.proxy.store.spool.count, "a commit failed and was spooled: the database refused a row"
    errors = [r for r in caplog.records if r.name.startswith("promptcache") and r.levelno >= logging.ERROR]
    assert not errors, [(r.name, r.getMessage(), r.exc_text) for r in errors[:3]]


# -- auth ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_missing_and_unknown_keys_are_401(proxy: RunningProxy, http: aiohttp.ClientSession, api: str) -> None:
    body = json.dumps({"model": "chat" if api == "openai" else "claude", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer "}, {"x-api-key": " "}):
        status, error, _ = await post_raw(http, proxy.url + ENDPOINT[api], body, headers)
        assert status == 401
        assert "missing API key" in assert_error(api, 401, error)
    if api == "openai":
        with pytest.raises(openai.AuthenticationError) as oinfo:
            await oa(proxy, "pc-unknown").chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}])
        assert "invalid API key" in assert_openai_error(oinfo.value.response.json())
    else:
        with pytest.raises(anthropic.AuthenticationError) as ainfo:
            await an(proxy, "pc-unknown").messages.create(
                model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert "invalid API key" in assert_anthropic_error(ainfo.value.response.json(), "authentication_error")


async def cli(*args: str) -> tuple[int, str, str]:
    exe = Path(sys.executable).with_name("promptcache")
    proc = await asyncio.create_subprocess_exec(str(exe), *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_cli_create_store_only_the_hash_and_revoke(proxy: RunningProxy, pg_dsn: str) -> None:
    principal = unique("cli")
    code, out, err = await cli("keys", "create", "--principal", principal, "--database", pg_dsn)
    assert code == 0, err
    fields = dict(re.findall(r"^([a-z ]+):\s+(\S+)$", out, re.MULTILINE))
    key_id, key = fields["key id"], fields["key"]
    assert fields["principal"] == principal
    assert out.count(key) == 1 and key not in err and "shown once" in err

    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        assert row is not None and row["principal_id"] == principal and row["revoked_at"] is None
        assert row["key_hash"] == hashlib.sha256(key.encode()).digest()
        assert await conn.fetchval("SELECT count(*) FROM api_keys a WHERE strpos(a::text, $1) > 0", key) == 0
    finally:
        await conn.close()

    proxy.server.proxy.store.key_cache_seconds = 0.2
    anth = an(proxy, key)
    message = await anth.messages.create(model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.usage.input_tokens == 1 + 3
    completion = await oa(proxy, key).chat.completions.create(model="chat",
                                                              messages=[{"role": "user", "content": "hi"}])
    assert completion.usage is not None and completion.usage.prompt_tokens == 4
    await settle(proxy)

    code, out, err = await cli("keys", "revoke", key_id, "--database", pg_dsn)
    assert (code, out.strip()) == (0, f"revoked {key_id}"), err
    await asyncio.sleep(0.25)  # the proxy's cache of known keys (0.2 s here) has expired
    with pytest.raises(anthropic.AuthenticationError):
        await anth.messages.create(model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        await oa(proxy, key).chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    code, _, err = await cli("keys", "revoke", key_id, "--database", pg_dsn)
    assert code == 1 and f"no active key with id {key_id}" in err


async def test_revoked_key_is_rejected_by_a_fresh_proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                                                        word_tokenizer: Path) -> None:
    pg = await Database.connect(pg_dsn)
    try:
        keys = ApiKeys(pg)
        key_id, key = await keys.create(unique("revoked"))
        assert await keys.revoke(key_id)
    finally:
        await pg.close()
    async with running_proxy(api_config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as running:
        with pytest.raises(openai.AuthenticationError):
            await oa(running, key).chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])


async def test_trusted_header_mode_scopes_the_cache_by_principal(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        http: aiohttp.ClientSession) -> None:
    config = api_config(simulator[0], word_tokenizer, auth={"mode": "header", "header": "X-Tenant"})
    a, b = unique("tenant-a"), unique("tenant-b")
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        key = await new_key(pg_dsn, unique("ignored"))  # a valid key is no substitute for the header
        body = json.dumps({"model": "chat", "messages": first_turn_openai()}).encode()
        for headers in ({}, {"authorization": f"Bearer {key}"}, {"x-tenant": "  "}):
            status, error, _ = await post_raw(http, running.url + OPENAI, body, headers)
            assert status == 401
            assert "missing trusted principal header x-tenant" in assert_openai_error(error)
        with pytest.raises(anthropic.AuthenticationError) as ainfo:
            await an(running, "unused").messages.create(model="claude", max_tokens=8,
                                                       messages=[{"role": "user", "content": "hi"}])
        assert_anthropic_error(ainfo.value.response.json(), "authentication_error")

        # prompt 36 = 20 + 10 + 3·2; a first turn writes 1h 20 and 5m 10, a repeat reads 30.
        results = []
        for tenant in (a, b, a):
            raw = await oa(running, "unused", default_headers={"x-tenant": tenant}).chat.completions \
                .with_raw_response.create(model="chat", messages=first_turn_openai())  # type: ignore[arg-type]
            usage = raw.parse().usage
            await settle(running)
            assert usage is not None and usage.prompt_tokens_details is not None
            row = await ledger(pg_dsn, raw.headers["x-request-id"])
            assert row["principal_id"] == tenant
            results.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens,
                            (usage.model_extra or {})["cache_creation_input_tokens"], row["read_tokens"],
                            row["creation_1h"], row["creation_5m"]))
        assert results == [(36, 0, 30, 0, 20, 10), (36, 0, 30, 0, 20, 10), (36, 30, 0, 30, 0, 0)]


# -- operations ------------------------------------------------------------------------------------


async def test_healthz_readyz_and_models(proxy: RunningProxy, http: aiohttp.ClientSession, key: str) -> None:
    async with http.get(proxy.url + "/healthz") as response:
        assert response.status == 200 and await response.json() == {"status": "ok"}
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert (body["status"], body["postgres"], body["degraded"], body["spooled"]) == ("ready", "up", False, 0)
    assert body["config"] == proxy.server.proxy.config.digest[:12]
    models = await oa(proxy, key).models.list()
    assert [m.id for m in models.data] == ["chat", "chat-notok"]  # the OpenAI API's (test_proxy_fidelity)


@pytest.mark.parametrize("degraded_ok", [False, True])
async def test_readyz_with_the_database_unreachable(tmp_path: Path, simulator: tuple[str, Simulator],
                                                    word_tokenizer: Path, http: aiohttp.ClientSession,
                                                    degraded_ok: bool) -> None:
    config = api_config(simulator[0], word_tokenizer, auth={"mode": "header", "header": "x-tenant"})
    dead = "postgresql://postgres@127.0.0.1:1/promptcache_unreachable"
    async with running_proxy(config, tmp_path, dead, degraded_ok=degraded_ok) as running:
        async with http.get(running.url + "/readyz") as response:
            body = await response.json()
            assert response.status == (200 if degraded_ok else 503)
        assert body["status"] == ("ready" if degraded_ok else "not ready")
        assert body["degraded"] is True and body["postgres"].startswith("down")
        # Requests still succeed, at list price and without caching (docs/design.md#billing, #storage); the bill is
        # spooled.
        completion = await oa(running, "unused", default_headers={"x-tenant": unique("t")}).chat.completions \
            .create(model="chat", messages=first_turn_openai())  # type: ignore[arg-type]
        usage = completion.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (36, 0)
        assert (usage.model_extra or {})["cache_creation_input_tokens"] == 0
        await settle(running)
        assert running.server.proxy.store.spool.count == 1


def samples(text_format: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text_format):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def by_name(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float],
            name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in metrics.items() if n == name}


def labels(**kv: str) -> frozenset[tuple[str, str]]:
    return frozenset(kv.items())


async def test_metrics_after_a_known_sequence(proxy: RunningProxy, http: aiohttp.ClientSession, key: str) -> None:
    client = oa(proxy, key)
    # chat turn 1: 1h 20, 5m 10, uncached 6, cost 0.0002955; turn 2: read 30, 5m 18, uncached 12, cost 0.0002325.
    for messages in (first_turn_openai(), second_turn_openai()):
        await client.chat.completions.create(model="chat", messages=messages)  # type: ignore[arg-type]
        await settle(proxy)
    # claude turn 1 (its own scope): 1h 20, 5m 10, cost 0.0002955.
    system, user = [text(SYSTEM, "1h")], [{"role": "user", "content": [text(USER[0], "5m")]}]
    await an(proxy, key).messages.create(model="claude", max_tokens=8, system=system,  # type: ignore[arg-type]
                                         messages=user)  # type: ignore[arg-type]
    # no tokenizer: list price, prompt 10 + 3, (13·3 + 8·15) / 1e6 = 0.000159.
    await client.chat.completions.create(model="chat-notok", messages=[{"role": "user", "content": words("n", 10)}])
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError):
        await an(proxy, key).messages.create(model="claude", max_tokens=8, messages=marked("5m", "1h"))  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        await oa(proxy, "pc-nobody").chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    await settle(proxy)

    async with http.get(proxy.url + "/metrics") as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/plain")
        metrics = samples(await response.text())
    assert by_name(metrics, "promptcache_requests_total") == {
        labels(api="openai", model="chat", outcome="ok"): 2,
        labels(api="anthropic", model="claude", outcome="ok"): 1,
        labels(api="openai", model="chat-notok", outcome="ok"): 1,
        labels(api="openai", model="-", outcome="rejected_404"): 1,
        labels(api="anthropic", model="claude", outcome="rejected_400"): 1,  # known: counted under it
        labels(api="openai", model="-", outcome="rejected_401"): 1,
    }
    assert by_name(metrics, "promptcache_read_tokens_total") == {
        labels(model="chat"): 30, labels(model="claude"): 0, labels(model="chat-notok"): 0}
    assert by_name(metrics, "promptcache_creation_tokens_total") == {
        labels(model="chat", tier="5m"): 28, labels(model="chat", tier="1h"): 20,
        labels(model="claude", tier="5m"): 10, labels(model="claude", tier="1h"): 20}
    billed = by_name(metrics, "promptcache_billed_cost_usd_total")
    expected = {"chat": Decimal("0.0002955") + Decimal("0.0002325"), "claude": Decimal("0.0002955"),
                "chat-notok": Decimal("0.000159")}
    assert billed == {labels(model=m): pytest.approx(float(v), rel=1e-9) for m, v in expected.items()}
    assert by_name(metrics, "promptcache_list_cost_usd_total")[labels(model="chat-notok")] == pytest.approx(0.000159)
    assert by_name(metrics, "promptcache_prompt_tokens_total") == {
        labels(model="chat"): 36 + 60, labels(model="claude"): 36, labels(model="chat-notok"): 13}
    assert by_name(metrics, "promptcache_billed_requests_total") == {
        labels(model="chat", cache="miss"): 1, labels(model="chat", cache="hit"): 1,
        labels(model="claude", cache="miss"): 1, labels(model="chat-notok", cache="miss"): 1}
    [(tenant, spent)] = by_name(metrics, "promptcache_principal_billed_cost_usd_total").items()  # one key, one tenant
    assert spent == pytest.approx(float(sum(expected.values())), rel=1e-9)
    # list price: (prompt · 3 + 8 output tokens · 15) / 1e6 per request, prompts 36, 60, 36 and 13
    assert by_name(metrics, "promptcache_principal_list_cost_usd_total") == {
        tenant: pytest.approx(0.000228 + 0.0003 + 0.000228 + 0.000159, rel=1e-9)}
    assert by_name(metrics, "promptcache_ready") == {labels(): 0}  # no readiness probe yet
    async with http.get(proxy.url + "/readyz") as response:
        assert response.status == 200
    async with http.get(proxy.url + "/metrics") as response:
        assert by_name(samples(await response.text()), "promptcache_ready") == {labels(): 1}
    assert by_name(metrics, "promptcache_upstream_seconds_count") == {
        labels(model="chat"): 2, labels(model="claude"): 1, labels(model="chat-notok"): 1}
    assert by_name(metrics, "promptcache_added_latency_seconds_count") == {
        labels(model="chat"): 2, labels(model="claude"): 1, labels(model="chat-notok"): 1}
    added = by_name(metrics, "promptcache_added_latency_seconds_sum")
    assert all(0 < seconds < 5 for seconds in added.values()), added  # the proxy's share, not the upstream's
    buckets = {dict(key)["le"] for key in by_name(metrics, "promptcache_upstream_seconds_bucket")}
    assert {"60.0", "120.0", "300.0", "600.0", "+Inf"} <= buckets  # up to and past the 300 s upstream timeout
    assert not [name for name, _ in metrics if name.endswith("_created")]
    for name, count in (("lookup", 3), ("classify", 3), ("commit", 4)):
        assert by_name(metrics, f"promptcache_{name}_seconds_count") == {labels(): count}, name
        assert by_name(metrics, f"promptcache_{name}_seconds_bucket")[labels(le="+Inf")] == count
    assert by_name(metrics, "promptcache_index_fallbacks_total") == {labels(reason="no_tokenizer"): 1}
    assert by_name(metrics, "promptcache_markers_rejected_total") == {labels(rule="ttl_order"): 1}


async def test_every_response_carries_a_request_id_that_the_log_names(
        proxy: RunningProxy, http: aiohttp.ClientSession, key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptcache.proxy")
    auth = {"authorization": f"Bearer {key}"}
    ok = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    streamed = json.dumps({"model": "claude", "max_tokens": 8, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]})
    calls: list[tuple[str, str, str | None, int]] = [
        ("GET", "/healthz", None, 200), ("GET", "/readyz", None, 200), ("GET", "/metrics", None, 200),
        ("GET", "/v1/models", None, 200), ("GET", "/nowhere", None, 404), ("GET", OPENAI, None, 405),
        ("POST", OPENAI, ok, 200), ("POST", ANTHROPIC, streamed, 200), ("POST", OPENAI, "{", 400),
        ("POST", ANTHROPIC, ok.replace('"chat"', '"nope"'), 404),
    ]
    ids: dict[str, str] = {}
    for method, path, data, status in calls:
        async with http.request(method, proxy.url + path, data=data, headers=auth) as response:
            await response.read()
            assert response.status == status, (method, path)
            request_id = response.headers.get("x-request-id")
            assert request_id is not None and re.fullmatch(r"req_[0-9a-f]{32}", request_id), (method, path)
            ids[f"{method} {path} {status}"] = request_id
    assert len(set(ids.values())) == len(ids)
    await settle(proxy)

    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records if r.name == "promptcache.proxy"]
    logged = {line["request_id"]: line for line in lines if "request_id" in line}
    served = logged[ids[f"POST {OPENAI} 200"]]
    assert (served["msg"], served["model"], served["status"], served["outcome"]) == ("request", "chat", 200, "ok")
    assert (served["prompt_tokens"], served["level"], served["logger"]) == (4, "INFO", "promptcache.proxy")
    assert logged[ids[f"POST {ANTHROPIC} 200"]]["outcome"] == "ok"
    rejected = logged[ids[f"POST {OPENAI} 400"]]
    assert (rejected["msg"], rejected["status"]) == ("rejected", 400)
    assert logged[ids[f"POST {ANTHROPIC} 404"]]["status"] == 404


# -- config reload ---------------------------------------------------------------------------------


def reload_config(url: str, tokenizer: Path, input_price: str, output_price: str) -> dict[str, Any]:
    model = model_config("chat-reload", url + "/v1", "openai", tokenizer)
    model["pricing"] = {"inputPerMTok": input_price, "outputPerMTok": output_price}
    return {"models": [model]}


async def wait_for(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def tariff_rows(pg_dsn: str, model: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return list(await conn.fetch("SELECT * FROM tariffs WHERE model = $1 ORDER BY version", model))
    finally:
        await conn.close()


async def test_price_change_reloads_without_restart_under_a_new_tariff(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url = simulator[0]
    async with running_proxy(reload_config(url, word_tokenizer, "3.00", "15.00"), tmp_path, pg_dsn) as running:
        client = oa(running, await new_key(pg_dsn, unique("reload")))
        messages = [{"role": "system", "content": [text(SYSTEM, "1h")]}, {"role": "user", "content": USER[0]}]

        async def bill() -> asyncpg.Record:
            raw = await client.chat.completions.with_raw_response.create(
                model="chat-reload", messages=messages)  # type: ignore[arg-type]
            raw.parse()
            await settle(running)
            return await ledger(pg_dsn, raw.headers["x-request-id"])

        # prompt 36 (20 + 10 + 6): write 1h 20, uncached 16: (16·3 + 20·3·2.0 + 8·15) / 1e6 = 0.000288
        before = await bill()
        assert (before["creation_1h"], before["cost"]) == (20, Decimal("0.000288"))
        old_version = running.server.tariffs["chat-reload"].version
        assert before["tariff_version"] == old_version

        running.write_config(reload_config(url, word_tokenizer, "6.00", "30.00"))
        await wait_for(lambda: running.server.tariffs["chat-reload"].version != old_version, "the reload")
        # the same prompt reads 20 at the new prices: (16·6 + 20·6·0.1 + 8·30) / 1e6 = 0.000348
        after = await bill()
        assert (after["read_tokens"], after["cost"]) == (20, Decimal("0.000348"))
        assert after["list_cost"] == (Decimal(36) * 6 + Decimal(8) * 30) / 1_000_000
        new_version = running.server.tariffs["chat-reload"].version
        assert after["tariff_version"] == new_version and new_version > old_version
        registry = running.server.proxy.metrics.registry
        assert registry.get_sample_value("promptcache_config_reloads_total", {"result": "ok"}) == 1

    rows = await tariff_rows(pg_dsn, "chat-reload")
    by_version = {row["version"]: row for row in rows}
    old, new = by_version[old_version], by_version[new_version]
    assert old["valid_until"] is not None and old["valid_until"] == new["valid_from"]
    assert new["valid_until"] is None
    assert (old["input_per_mtok"], new["input_per_mtok"]) == (Decimal("3.00"), Decimal("6.00"))
    assert (old["output_per_mtok"], new["output_per_mtok"]) == (Decimal("15.00"), Decimal("30.00"))
    assert sum(row["valid_until"] is None for row in rows) == 1


async def test_broken_config_keeps_the_last_good_one(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url = simulator[0]
    good = reload_config(url, word_tokenizer, "3.00", "15.00")
    good["models"][0]["alias"] = "chat-broken"
    async with running_proxy(good, tmp_path, pg_dsn) as running:
        client = oa(running, await new_key(pg_dsn, unique("broken")))
        registry = running.server.proxy.metrics.registry
        digest = running.server.proxy.config.digest
        version = running.server.tariffs["chat-broken"].version

        def errors() -> float:
            return registry.get_sample_value("promptcache_config_reloads_total", {"result": "error"}) or 0.0

        async def still_serves() -> None:
            completion = await client.chat.completions.create(
                model="chat-broken", messages=[{"role": "user", "content": words("b", 10)}])
            assert completion.usage is not None and completion.usage.prompt_tokens == 13
            assert running.server.proxy.config.digest == digest
            assert running.server.tariffs["chat-broken"].version == version

        broken = [
            "models: [ {alias: chat-broken, upstream: {url: nowhere",  # not YAML
            yaml.safe_dump({"models": [good["models"][0], good["models"][0]]}),  # duplicate alias
            yaml.safe_dump({"models": [{**good["models"][0], "pricing": {"inputPerMTok": "-1",
                                                                         "outputPerMTok": "1"}}]}),
            "[]\n",
        ]
        for count, content in enumerate(broken, start=1):
            running.config_path.write_text(content)
            await wait_for(lambda: errors() == count, f"reload error {count}")  # noqa: B023 (awaited at once)
            await still_serves()
        await settle(running)
        assert registry.get_sample_value("promptcache_config_reloads_total", {"result": "ok"}) is None


# -- a model configured without a tokenizer: list price, zero cache fields, not an error ---------------


async def test_model_without_a_tokenizer_is_served_at_list_price(
        proxy: RunningProxy, pg_dsn: str, key: str) -> None:
    messages = first_turn_openai()
    for _ in range(2):  # the second time would read, had anything been cached
        raw = await oa(proxy, key).chat.completions.with_raw_response.create(
            model="chat-notok", messages=messages)  # type: ignore[arg-type]
        usage = raw.parse().usage
        await settle(proxy)
        assert usage is not None and usage.prompt_tokens_details is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (36, 8, 0)
        extra = usage.model_extra or {}
        assert (extra["cache_read_input_tokens"], extra["cache_creation_input_tokens"]) == (0, 0)
        assert extra["cache_creation"] == {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0,
                                           "ephemeral_24h_input_tokens": 0}
        row = await ledger(pg_dsn, raw.headers["x-request-id"])
        assert row["tokenizer_version"] == "none"
        assert (row["read_tokens"], row["creation_5m"], row["creation_1h"], row["uncached_tokens"]) == (0, 0, 0, 36)
        assert row["cost"] == row["list_cost"] == (Decimal(36) * 3 + Decimal(8) * 15) / 1_000_000

    system, user = [text(SYSTEM, "1h")], [{"role": "user", "content": [text(USER[0], "5m")]}]
    for stream in (False, True):
        araw = await an(proxy, key).messages.with_raw_response.create(
            model="claude-notok", max_tokens=8, system=system, messages=user, stream=stream)  # type: ignore[arg-type]
        parsed = await araw.parse()
        split: tuple[int | None, int | None, int | None] | None = None
        if isinstance(parsed, anthropic.types.Message):
            full = parsed.usage
            split = (full.input_tokens, full.cache_read_input_tokens, full.cache_creation_input_tokens)
        else:
            async for event in parsed:
                if isinstance(event, anthropic.types.RawMessageDeltaEvent):
                    delta = event.usage
                    split = (delta.input_tokens, delta.cache_read_input_tokens, delta.cache_creation_input_tokens)
        assert split == (36, 0, 0), stream
        await settle(proxy)
        row = await ledger(pg_dsn, araw.headers["x-request-id"])
        assert row["cost"] == row["list_cost"] and row["read_tokens"] == 0 and row["tokenizer_version"] == "none"

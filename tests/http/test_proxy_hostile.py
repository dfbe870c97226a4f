"""Hostile input never gets a 5xx or an unbilled 200 (issue 13, items 1-7): bytes that are not UTF-8 in the
credentials, nesting past the one limit (docs/design.md#request-bodies), bodies whose Content-Encoding is wrong or
unknown, absurd usage from upstream, a config nested to death, routes that do not exist, and principals no ledger
can carry.

Counts as in test_proxy_api: with the word tokenizer ``words(p, n)`` is n tokens, the simulated upstream adds 3
template tokens per message and replies with 8; prices 3.00 in / 15.00 out per million."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
import yaml

from promptcache.proxy.domain.nesting import MAX_DEPTH
from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_error, post_bytes, post_raw
from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, unique, words

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
ENDPOINT = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MODEL = {"openai": "chat", "anthropic": "claude"}


def config(url: str, tokenizer: Path, **top: Any) -> dict[str, Any]:
    return {"models": [model_config("chat", url + "/v1", "openai", tokenizer),
                       model_config("claude", url, "anthropic", tokenizer)], **top}


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    async with running_proxy(config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def request(api: str, content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL[api], "max_tokens": 8, "messages": [{"role": "user", "content": content}], **extra}


DEEP = "__deep__"


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists inside one another around ``leaf``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def with_deep(body: dict[str, Any], depth: int) -> str:
    """``body`` as JSON with the string :data:`DEEP` replaced by ``depth`` arrays in one another (written out as
    text: the standard library cannot serialise that depth either)."""
    return json.dumps(body).replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth)


# -- 1. credentials that are not UTF-8 ----------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
async def test_a_key_that_is_not_utf8_is_a_401(proxy: RunningProxy, api: str, header: str) -> None:
    value = b"caf\xe9" if header == "x-api-key" else b"Bearer pc-caf\xe9"  # the byte 0xe9 alone: not UTF-8
    status, body = await post_bytes(proxy.url, ENDPOINT[api], [(header.encode(), value)],
                                    json.dumps(request(api)).encode())
    assert status == 401
    assert assert_error(api, 401, body) == "invalid API key"


# -- 2. nesting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("where", ["cache_control", "cache_control.ttl", "metadata", "part field"])
async def test_a_body_nested_past_the_limit_is_a_400_before_forwarding(
        proxy: RunningProxy, http: aiohttp.ClientSession, simulator: tuple[str, Simulator], pg_dsn: str,
        api: str, where: str) -> None:
    key = await new_key(pg_dsn, unique("deep"))
    part: dict[str, Any] = {"type": "text", "text": "hi"}
    body = request(api, [part])
    deep = DEEP
    if where == "cache_control":
        part["cache_control"] = deep
    elif where == "cache_control.ttl":
        part["cache_control"] = {"type": "ephemeral", "ttl": deep}
    elif where == "metadata":
        body["metadata"] = {"user_id": deep}
    else:
        part["extra"] = deep
    sent = len(simulator[1].requests)
    status, error, _ = await post_raw(http, proxy.url + ENDPOINT[api], with_deep(body, 990), {"x-api-key": key})
    assert status == 400
    assert assert_error(api, 400, error) == f"request body is nested more than {MAX_DEPTH} levels deep"
    assert len(simulator[1].requests) == sent


@pytest.mark.parametrize("depth", [MAX_DEPTH, MAX_DEPTH + 1, 5_000, 200_000])
async def test_the_limit_is_exactly_max_depth(proxy: RunningProxy, http: aiohttp.ClientSession, pg_dsn: str,
                                              depth: int) -> None:
    key = await new_key(pg_dsn, unique("depth"))
    body = request("openai", metadata={"k": DEEP})  # the body and metadata are two levels
    status, error, _ = await post_raw(http, proxy.url + ENDPOINT["openai"], with_deep(body, depth - 2),
                                      {"x-api-key": key})
    if depth <= MAX_DEPTH:
        assert status == 200, error
    else:
        assert status == 400
        assert assert_error("openai", 400, error) == f"request body is nested more than {MAX_DEPTH} levels deep"


# -- 3. Content-Encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_compressed_body_is_decoded_and_billed(proxy: RunningProxy, http: aiohttp.ClientSession,
                                                       pg_dsn: str, api: str) -> None:
    key = await new_key(pg_dsn, unique("gzip"))
    raw = json.dumps(request(api, words("z", 10))).encode()
    for encoding, data in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw)),
                           ("deflate", _raw_deflate(raw)),
                           ("gzip, identity", gzip.compress(raw))):
        status, body, request_id = await post_raw(http, proxy.url + ENDPOINT[api], data,
                                                  {"x-api-key": key, "content-encoding": encoding,
                                                   "content-type": "application/json"})
        assert status == 200, (encoding, body)
        await settle(proxy)
        assert request_id is not None
        row = await ledger(pg_dsn, request_id)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (13, 8)
        assert row["cost"] == (Decimal(13) * 3 + Decimal(8) * 15) / 1_000_000


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize(("encoding", "data", "status", "message"), [
    ("deflate", b"\x78\x9c not deflate at all", 400, "request body is not valid deflate data: "),
    ("gzip", b"\x1f\x8b\x08 broken", 400, "request body is not valid gzip data: "),
    ("gzip", gzip.compress(b'{"model": "chat"}')[:-6], 400, "request body is not valid gzip data: truncated"),
    ("br", b"\x0b\x02\x80hi\x03", 400, "Content-Encoding 'br' is not supported; send one of identity, gzip"),
    ("zstd", b"\x28\xb5\x2f\xfd", 400, "Content-Encoding 'zstd' is not supported"),
    ("gzip", gzip.compress(b" " * 2_000_000), 413, "request body is larger than the 65536-byte limit once decoded"),
])
async def test_a_body_that_does_not_decode_is_an_api_error(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        http: aiohttp.ClientSession, api: str, encoding: str, data: bytes, status: int, message: str) -> None:
    cfg = config(simulator[0], word_tokenizer, limits={"maxBodyBytes": 65536})
    async with running_proxy(cfg, tmp_path, pg_dsn) as running:
        key = await new_key(pg_dsn, unique("enc"))
        started = time.monotonic()
        got, body, _ = await post_raw(http, running.url + ENDPOINT[api], data,
                                      {"x-api-key": key, "content-encoding": encoding})
        assert time.monotonic() - started < 1.0
        assert got == status
        assert assert_error(api, status, body).startswith(message), body


# -- 4. principals the ledger cannot carry ------------------------------------------------------------------


async def test_a_header_principal_that_is_not_utf8_is_a_401_and_a_unicode_one_is_billed(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        http: aiohttp.ClientSession) -> None:
    cfg = config(simulator[0], word_tokenizer, auth={"mode": "header"})
    async with running_proxy(cfg, tmp_path, pg_dsn) as running:
        body = json.dumps(request("openai", words("u", 10))).encode()
        for bad in (b"caf\xe9", b"\xff\xfe", b"tab\there"):
            status, error = await post_bytes(running.url, ENDPOINT["openai"], [(b"x-promptcache-principal", bad)],
                                             body)
            assert status == 401
            assert assert_error("openai", 401, error) == ("trusted principal header x-promptcache-principal: a "
                                                          "principal is printable text, not empty, without leading "
                                                          "or trailing spaces")
        principal = unique("zoë-東京")  # UTF-8 on the wire, as a gateway sends it
        status, answer = await post_bytes(running.url, ENDPOINT["openai"],
                                          [(b"x-promptcache-principal", principal.encode())], body)
        assert status == 200, answer
        await settle(running)
        conn = await asyncpg.connect(pg_dsn)
        try:
            row = await conn.fetchrow("SELECT * FROM ledger WHERE principal_id = $1", principal)
        finally:
            await conn.close()
        assert row is not None
        assert (row["principal_id"], row["prompt_tokens"]) == (principal, 13)


def test_keys_create_refuses_an_empty_or_blank_principal(pg_dsn: str) -> None:
    for principal in ("", "   ", " alice", "bob\n", "caf\udce9"):
        done = subprocess.run([PROMPTCACHE, "keys", "create", "--principal", principal, "--database", pg_dsn],
                              capture_output=True, text=True, timeout=60, errors="surrogateescape")
        assert done.returncode == 2, (principal, done.stdout)
        assert "a principal is printable text, not empty, without leading or trailing spaces" in done.stderr
        assert "key:" not in done.stdout


# -- 5. an upstream reporting absurd usage -----------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_usage_beyond_any_context_is_the_upstreams_error_not_a_free_answer(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path, api: str,
        stream: bool) -> None:
    """2³¹ prompt tokens fit no ledger column and no context window: a 502 (stream: an error event), never a 200
    whose ledger row Postgres would refuse."""
    cfg = {"models": [model_config("chat", simulator[0] + "/huge/v1", "openai", word_tokenizer),
                      model_config("claude", simulator[0] + "/huge", "anthropic", word_tokenizer)]}
    async with running_proxy(cfg, tmp_path, pg_dsn) as running:
        key = await new_key(pg_dsn, unique("huge"))
        async with aiohttp.ClientSession() as http, http.post(
                running.url + ENDPOINT[api], json=request(api, stream=stream), headers={"x-api-key": key}) as response:
            raw = await response.read()
            request_id = response.headers["x-request-id"]
            status = response.status
        await settle(running)
        if stream:
            assert status == 200 and b"the upstream stream ended before it completed" in raw
        else:
            assert status == 502
            assert assert_error(api, 502, json.loads(raw)) == \
                "the upstream model reported no usage"
        conn = await asyncpg.connect(pg_dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", request_id) == 0
            logged = await conn.fetchrow("SELECT status, billed_cost FROM request_log WHERE request_id = $1",
                                         request_id)
        finally:
            await conn.close()
        assert logged is not None and logged["status"] == 502 and logged["billed_cost"] == 0


# -- 6. a config nested to death leaves hot reload working ----------------------------------------------------


async def test_a_config_nested_5000_deep_is_a_reload_error_and_reload_keeps_working(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    good = config(simulator[0], word_tokenizer)
    async with running_proxy(good, tmp_path, pg_dsn) as running:
        registry = running.server.proxy.metrics.registry

        async def reloads(result: str, count: float) -> None:
            deadline = time.monotonic() + 10
            while (registry.get_sample_value("promptcache_config_reloads_total", {"result": result}) or 0) != count:
                assert time.monotonic() < deadline, f"no {result} reload number {count}"
                await asyncio.sleep(0.02)

        running.config_path.write_text("models: " + "[" * 5000 + "]" * 5000 + "\n")
        await reloads("error", 1)
        running.config_path.write_text(yaml.safe_dump({"models": {"a": nested(MAX_DEPTH)}}))
        await reloads("error", 2)
        changed = config(simulator[0], word_tokenizer)
        changed["models"][0]["pricing"]["inputPerMTok"] = "4.00"
        running.write_config(changed)
        await reloads("ok", 1)
        assert running.server.proxy.config.models["chat"].input_per_mtok == Decimal("4.00")


# -- 7. routes that do not exist, in the API's shape ----------------------------------------------------------


async def test_unknown_routes_answer_in_the_apis_json_shape(proxy: RunningProxy, http: aiohttp.ClientSession,
                                                            pg_dsn: str) -> None:
    key = await new_key(pg_dsn, unique("routes"))
    with pytest.raises(openai.NotFoundError) as oa:
        await openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0).embeddings.create(
            model="chat", input="hi")
    assert oa.value.body == {"message": "no route POST /v1/embeddings: this proxy serves POST /v1/chat/completions, "
                                        "POST /v1/responses, POST /v1/messages, POST /v1/messages/count_tokens and "
                                        "GET /v1/models",
                             "type": "invalid_request_error", "param": None, "code": None}
    with pytest.raises(anthropic.NotFoundError) as an:
        await anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0).messages.batches.list()
    assert an.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "no route GET /v1/messages/batches: this proxy serves POST "
                                              "/v1/chat/completions, POST /v1/responses, POST /v1/messages, POST "
                                              "/v1/messages/count_tokens and GET /v1/models"}}
    async with http.get(proxy.url + "/v1/messages") as response:
        assert response.status == 405 and response.content_type == "application/json"
        assert assert_error("anthropic", 405, await response.json()) == "GET is not allowed on /v1/messages"
        assert response.headers["x-request-id"].startswith("req_")
    async with http.post(proxy.url + "/v1/batches", data=b"{}") as response:
        assert response.status == 404
        assert assert_error("openai", 404, await response.json()).startswith("no route POST /v1/batches")


# -- 12. slow clients ------------------------------------------------------------------------------------------


async def test_a_half_sent_head_is_closed_and_a_half_sent_body_is_a_408(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    cfg = config(simulator[0], word_tokenizer, limits={"headerTimeoutSeconds": 0.5, "bodyTimeoutSeconds": 0.5})
    async with running_proxy(cfg, tmp_path, pg_dsn) as running:
        key = await new_key(pg_dsn, unique("slow"))
        host, _, port = running.url.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-api-key: ")  # and then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
        assert 0.4 < time.monotonic() - started < 2.0
        writer.close()

        body = json.dumps(request("openai")).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-api-key: " + key.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                     b"\r\n\r\n" + body[:10])  # the head, a tenth of the body, then nothing
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # the answer; the connection lingers
        assert 0.4 < time.monotonic() - started < 2.0
        lines = head.decode().split("\r\n")
        length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
        answer = json.loads(await reader.readexactly(length))
        writer.close()
        await writer.wait_closed()
        assert lines[0].split()[1] == "408"
        assert assert_error("openai", 408, answer) == "request body not received within 0.5 s"

"""A client's x-request-id (issue 14, item 6): kept when valid, echoed, the ledger key; an id keys one request only, so
reusing one is a 409 and never an unbilled answer; an invalid one is replaced by ours."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_anthropic_error, assert_openai_error
from support.faults import Relay
from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, unique, words

OURS = re.compile(r"req_[0-9a-f]{32}")
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": words("rid", 12)}]


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    config = {"models": [model_config("chat", simulator[0] + "/v1", ["openai", "openai-responses"], word_tokenizer),
                         model_config("claude", simulator[0], "anthropic", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def key(pg_dsn: str) -> str:
    return await new_key(pg_dsn, unique("rid"))


def fresh() -> str:
    return f"client-{secrets.token_hex(8)}"


async def ledger_rows(pg_dsn: str, request_id: str) -> int:
    conn = await asyncpg.connect(pg_dsn)
    try:
        count = await conn.fetchval("SELECT count(*) FROM ledger WHERE request_id = $1", request_id)
    finally:
        await conn.close()
    assert isinstance(count, int)
    return count


async def test_a_valid_id_is_echoed_and_keys_the_ledger_row_on_every_api(proxy: RunningProxy, key: str,
                                                                         pg_dsn: str) -> None:
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    ids = [fresh() for _ in range(4)]
    chat = await oa.chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, extra_headers={"x-request-id": ids[0]})  # type: ignore[arg-type]
    message = await an.messages.with_raw_response.create(
        model="claude", max_tokens=8, messages=MESSAGES, extra_headers={"x-request-id": ids[1]})  # type: ignore[arg-type]
    response = await oa.responses.with_raw_response.create(model="chat", input=words("rid", 12),
                                                           extra_headers={"x-request-id": ids[2]})
    async with oa.chat.completions.with_streaming_response.create(
            model="chat", messages=MESSAGES, stream=True, extra_headers={"x-request-id": ids[3]}) as stream:  # type: ignore[arg-type]
        streamed = stream.headers["x-request-id"]
        async for _ in stream.iter_lines():
            pass
    await settle(proxy)
    assert [chat.headers["x-request-id"], message.headers["x-request-id"], response.headers["x-request-id"],
            streamed] == ids
    for request_id in ids:
        row = await ledger(pg_dsn, request_id)
        assert row["prompt_tokens"] == 15 and row["cost"] > 0


async def test_a_reused_id_is_a_409_and_is_not_forwarded(proxy: RunningProxy, key: str, pg_dsn: str,
                                                         simulator: tuple[str, Simulator]) -> None:
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    an = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    used = fresh()
    await oa.chat.completions.create(model="chat", messages=MESSAGES,  # type: ignore[arg-type]
                                     extra_headers={"x-request-id": used})
    forwarded = len(simulator[1].requests)
    with pytest.raises(openai.ConflictError) as info:
        await oa.chat.completions.create(model="chat", messages=MESSAGES,  # type: ignore[arg-type]
                                         extra_headers={"x-request-id": used})
    assert f"x-request-id {used} was already used" in assert_openai_error(info.value.response.json())
    with pytest.raises(anthropic.ConflictError) as other:  # another API, and another principal, alike
        await anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, unique("rid-other")),
                                       max_retries=0).messages.create(
            model="claude", max_tokens=8, messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"x-request-id": used})
    assert "was already used" in assert_anthropic_error(other.value.response.json(), "invalid_request_error")
    assert len(simulator[1].requests) == forwarded
    await an.close()
    await settle(proxy)
    assert await ledger_rows(pg_dsn, used) == 1


async def test_concurrent_requests_with_one_id_answer_once(proxy: RunningProxy, key: str, pg_dsn: str) -> None:
    shared = fresh()
    async with aiohttp.ClientSession() as http:
        async def send() -> int:
            async with http.post(proxy.url + "/v1/chat/completions",
                                 json={"model": "chat", "messages": MESSAGES},
                                 headers={"authorization": f"Bearer {key}", "x-request-id": shared}) as answer:
                await answer.read()
                return answer.status

        statuses = await asyncio.gather(*(send() for _ in range(12)))
    await settle(proxy)
    assert sorted(statuses) == [200] + [409] * 11
    assert await ledger_rows(pg_dsn, shared) == 1


@pytest.mark.parametrize("sent", ["short", "has space inside", "req_" + "0" * 32, "x" * 129, "über-request-id",
                                  "-leading-dash", "semi;colon;id"])
async def test_an_invalid_id_is_replaced_by_ours(proxy: RunningProxy, key: str, pg_dsn: str, sent: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            proxy.url + "/v1/chat/completions", json={"model": "chat", "messages": MESSAGES},
            headers={"authorization": f"Bearer {key}", "x-request-id": sent.encode().decode("latin-1")}) as answer:
        assert answer.status == 200
        ours = answer.headers["x-request-id"]
    await settle(proxy)
    assert OURS.fullmatch(ours) and ours != sent
    assert (await ledger(pg_dsn, ours))["prompt_tokens"] == 15


async def test_without_postgres_to_reserve_it_the_id_is_ours(tmp_path: Path, pg_dsn: str, pg_relay: Relay,
                                                             simulator: tuple[str, Simulator],
                                                             word_tokenizer: Path) -> None:
    """An id that cannot be reserved cannot be trusted to key one row: the request is answered under ours (said in
    the response), at list price as any request while Postgres is down, and its bill lands once Postgres is back."""
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer)]}
    key = await new_key(pg_dsn, unique("rid-down"))
    async with running_proxy(config, tmp_path, pg_relay.dsn(pg_dsn), tariff_refresh=3600.0) as proxy:
        headers = {"authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.url + "/v1/chat/completions", headers=headers,
                                 json={"model": "chat", "messages": MESSAGES}) as answer:
                assert answer.status == 200  # the key is known to the proxy from here on
            await settle(proxy)
            await pg_relay.cut()
            sent = fresh()
            async with http.post(proxy.url + "/v1/chat/completions", headers={**headers, "x-request-id": sent},
                                 json={"model": "chat", "messages": MESSAGES}) as answer:
                assert answer.status == 200
                ours = answer.headers["x-request-id"]
        await settle(proxy)
        assert OURS.fullmatch(ours)
        metrics = proxy.server.proxy.metrics.registry
        assert metrics.get_sample_value("promptcache_index_fallbacks_total", {"reason": "request_id_unreserved"}) == 1
        await pg_relay.restore()
        await proxy.server.proxy.store.drain_spool()  # or the background drain did
        assert proxy.server.proxy.store.spool.count == 0
    assert (await ledger(pg_dsn, ours))["prompt_tokens"] == 15
    assert await ledger_rows(pg_dsn, sent) == 0

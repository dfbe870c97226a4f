"""Overload (issue 13 item 13, docs/design.md#overload): classifications take turns through the gate, the classify
deadline counts from a classification's turn and not from its wait, and past the queue limit requests are shed with
429 + Retry-After in the calling API's shape, before anything is forwarded or billed.

Postgres is slowed behind a relay so each lookup takes a while; the worked conversation is support.faults's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_error
from support.faults import SDK, TURN0, TURN0_AGAIN, Relay, complete, fetch, wait_until
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

DEADLINE = 0.5
LOOKUP_DELAY = 0.2
"""Each Postgres answer is held this long: a lookup takes at least this, well inside the deadline."""


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, pg_relay: Relay, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    config = {"models": [model_config("chat", simulator[0] + "/v1", "openai", word_tokenizer),
                         model_config("claude", simulator[0], "anthropic", word_tokenizer)],
              "limits": {"classifyConcurrency": 1, "maxQueuedClassifications": 3,
                         "classifyDeadlineSeconds": DEADLINE}}
    async with running_proxy(config, tmp_path, pg_relay.dsn(pg_dsn), tariff_refresh=3600.0) as running:
        yield running
        await settle(running)


async def test_queued_classifications_still_read_the_cache(
        proxy: RunningProxy, pg_dsn: str, pg_relay: Relay, sdk: SDK) -> None:
    """Four at once through one slot: the last waits more than the deadline for its turn, and is classified."""
    key = await new_key(pg_dsn, unique("gate"))
    c = sdk(proxy, key)
    assert (await complete(c, "openai", "chat", 0))[0] == TURN0
    await settle(proxy)
    pg_relay.delay = LOOKUP_DELAY
    results = await asyncio.gather(*(complete(c, "openai", "chat", 0) for _ in range(4)))
    assert [usage for usage, _ in results] == [TURN0_AGAIN] * 4
    registry = proxy.server.proxy.metrics.registry
    assert registry.get_sample_value("promptcache_classify_wait_seconds_count") == 5.0
    within = registry.get_sample_value("promptcache_classify_wait_seconds_bucket", {"le": str(DEADLINE)})
    assert within is not None and within <= 4.0  # at least one waited past the deadline, and still read
    await settle(proxy)
    rows = await fetch(pg_dsn, "SELECT read_tokens FROM ledger WHERE request_id = ANY($1::text[])",
                       [request_id for _, request_id in results])
    assert [r["read_tokens"] for r in rows] == [30] * 4


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_past_the_queue_limit_requests_are_shed_before_forwarding(
        proxy: RunningProxy, pg_dsn: str, pg_relay: Relay, simulator: tuple[str, Simulator], sdk: SDK,
        api: str) -> None:
    key = await new_key(pg_dsn, unique("shed"))
    c = sdk(proxy, key)
    model = "chat" if api == "openai" else "claude"
    assert (await complete(c, api, model, 0))[0] == TURN0
    await settle(proxy)
    pg_relay.delay = 0.35  # each turn still inside the deadline, the four together well past it
    gate = proxy.server.proxy.gate
    held = [asyncio.create_task(complete(c, api, model, 0)) for _ in range(4)]  # one in its turn, three waiting

    async def full() -> bool:
        return gate.waiting == 3

    await wait_until(full, "three classifications waiting")
    forwarded = len(simulator[1].requests)
    path, headers = ("/v1/chat/completions", {"authorization": f"Bearer {key}"}) if api == "openai" else \
        ("/v1/messages", {"x-api-key": key, "anthropic-version": "2023-06-01"})
    body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http, http.post(proxy.url + path, json=body, headers=headers) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        message = assert_error(api, 429, await response.json())
        request_id = response.headers["x-request-id"]
    assert message == "the proxy is overloaded; retry shortly"
    assert len(simulator[1].requests) == forwarded  # shed before anything went upstream
    assert [usage for usage, _ in await asyncio.gather(*held)] == [TURN0_AGAIN] * 4
    await settle(proxy)
    assert await fetch(pg_dsn, "SELECT 1 FROM request_log WHERE request_id = $1", request_id) == []
    registry = proxy.server.proxy.metrics.registry
    assert registry.get_sample_value("promptcache_index_fallbacks_total", {"reason": "shed"}) == 1.0
    assert registry.get_sample_value("promptcache_classify_queue") == 0.0

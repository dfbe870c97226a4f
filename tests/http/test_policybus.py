"""Policies published on Redis reach a running proxy without a restart (docs/design.md#reconciliation)."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import redis.asyncio as aioredis

from promptcache.proxy import policybus
from promptcache.proxy.testing.simulator import Simulator

from support.faults import ledger_rows, wait_until
from support.proxy import model_config, new_key, running_proxy, settle, text, unique, words


async def has_subscriber(bus: aioredis.Redis, prefix: str) -> bool:
    counts = await bus.pubsub_numsub(policybus.channel(prefix))
    return bool(counts and counts[0][1])


async def test_published_multiplier_change_bills_the_next_request_within_two_seconds(
    tmp_path: Path, pg_dsn: str, redis_url: str, simulator: tuple[str, Simulator], word_tokenizer: Path
) -> None:
    url, _ = simulator
    alias, principal = unique("bus"), unique("tenant")
    model = {**model_config(alias, url + "/v1", "openai", word_tokenizer), "cachePolicy": "llm/standard"}
    async with running_proxy({"models": [model]}, tmp_path, pg_dsn, redis_url) as proxy:
        prefix = proxy.server.options.redis_prefix
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, principal),
                                    max_retries=0)
        bus = aioredis.Redis.from_url(redis_url)
        try:
            await wait_until(lambda: has_subscriber(bus, prefix), "the proxy to subscribe")
            published_at = time.monotonic()
            spec = {"minPrefixTokens": 10, "writeMultipliers": {"5m": "3.0"}}
            assert await policybus.publish(bus, prefix, "llm/standard", spec) == 1

            async def applied() -> bool:
                policy = proxy.server.proxy.runtimes.models[alias].config.policy
                return policy.write_multipliers["5m"] == Decimal("3.0")

            await wait_until(applied, "the published policy")
            assert time.monotonic() - published_at < 2.0, "the proxy did not pick up the policy within 2 s"
            messages: Any = [{"role": "user", "content": [text(words("w", 20), "5m")]}]
            completion = await client.chat.completions.create(model=alias, messages=messages)
            await settle(proxy)
            assert completion.usage is not None
            assert (completion.usage.model_extra or {})["cache_creation_input_tokens"] == 20
            # 20 words written at 5m, 3 template tokens uncached, 8 reply tokens:
            # (3·3 + 20·3·3.0 + 8·15) / 1e6 = (9 + 180 + 120) / 1e6 = 0.000309
            [row] = await ledger_rows(pg_dsn, principal)
            assert row["cost"] == Decimal("0.000309")
            assert row["tariff_version"] == proxy.server.proxy.runtimes.models[alias].tariff.version

            for noise in (json.dumps({"policy": "other/policy", "spec": {"writeMultipliers": {"5m": "9"}}}),
                          "{not json", json.dumps({"policy": "llm/standard", "spec": {"defaultTtl": "7d"}})):
                await bus.publish(policybus.channel(prefix), noise)
            await asyncio.sleep(0.2)
            assert proxy.server.proxy.runtimes.models[alias].config.policy.write_multipliers["5m"] == Decimal("3.0")
        finally:
            await bus.delete(policybus.stored_key(prefix, "llm/standard"))
            await bus.aclose()


async def test_a_starting_proxy_catches_up_on_stored_policies(
    tmp_path: Path, pg_dsn: str, redis_url: str, simulator: tuple[str, Simulator], word_tokenizer: Path
) -> None:
    url, _ = simulator
    alias, prefix = unique("bus"), f"{unique('pctest')}:"
    model = {**model_config(alias, url + "/v1", "openai", word_tokenizer), "cachePolicy": "llm/late"}
    bus = aioredis.Redis.from_url(redis_url)
    await bus.set(policybus.stored_key(prefix, "llm/late"),
                  json.dumps({"policy": "llm/late", "spec": {"readMultiplier": "0.05"}}))
    try:
        async with running_proxy({"models": [model]}, tmp_path, pg_dsn, redis_url, redis_prefix=prefix) as proxy:
            async def caught_up() -> bool:
                return proxy.server.proxy.runtimes.models[alias].config.policy.read_multiplier == Decimal("0.05")

            await wait_until(caught_up, "the stored policy", within=2.0)
    finally:
        await bus.delete(policybus.stored_key(prefix, "llm/late"))
        await bus.aclose()

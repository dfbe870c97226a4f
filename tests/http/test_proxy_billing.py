"""Three-turn agent conversations through the official SDKs: exact splits, usage shapes and costs.

The word tokenizer makes every count derivable by hand: a block of ``words(p, n)`` is n tokens,
the simulated upstream adds 3 template tokens per message (and per Anthropic system field),
and its reply "Simulated reply from the local test upstream." is 8 tokens. Prices: 3.00 in,
15.00 out per million; multipliers 1h 2.0, 5m 1.25, read 0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from promptcache.proxy.testing.simulator import REPLY, Simulator

from support.conversation import EXPECTED, SYSTEM, USER, openai_turns
from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, text


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url, _ = simulator
    config = {"models": [
        model_config("chat", url + "/v1", "openai", word_tokenizer),
        model_config("claude", url, "anthropic", word_tokenizer),
        model_config("chat-cached", url + "/cached/v1", "openai", word_tokenizer),
        model_config("claude-cached", url + "/cached", "anthropic", word_tokenizer),
    ]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running




# The same third turn from a principal with nothing cached: writes 1h 20 and 5m 66 - 20 = 46; uncached 18
#   (18·3 + 20·3·2.0 + 46·3·1.25 + 120) / 1e6 = (54 + 120 + 172.5 + 120) / 1e6 = 0.0004665
OTHER_PRINCIPAL = (84, 8, 0, 46, 20, 18, Decimal("0.0004665"))


async def test_openai_three_turns_exact_splits_and_costs(proxy: RunningProxy, pg_dsn: str) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, "acme"), max_retries=0)
    turns = openai_turns()
    for messages, expected in zip(turns, EXPECTED, strict=True):
        raw = await client.chat.completions.with_raw_response.create(model="chat", messages=messages)  # type: ignore[arg-type]
        completion = raw.parse()
        await settle(proxy)
        prompt, out, read, c5m, c1h, uncached, cost = expected
        usage = completion.usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, out, prompt + out)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == read
        extra = usage.model_extra or {}
        assert extra["cache_read_input_tokens"] == read
        assert extra["cache_creation_input_tokens"] == c5m + c1h
        assert extra["cache_creation"] == {"ephemeral_5m_input_tokens": c5m, "ephemeral_1h_input_tokens": c1h,
                                           "ephemeral_24h_input_tokens": 0}
        row = await ledger(pg_dsn, raw.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"], row["read_tokens"]) == (prompt, out, read)
        assert (row["creation_5m"], row["creation_1h"], row["creation_24h"], row["uncached_tokens"]) == (
            c5m, c1h, 0, uncached)
        assert row["cost"] == cost
        assert row["list_cost"] == (Decimal(prompt) * 3 + Decimal(out) * 15) / 1_000_000

    other = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(pg_dsn, "globex"), max_retries=0)
    raw = await other.chat.completions.with_raw_response.create(model="chat", messages=turns[2])  # type: ignore[arg-type]
    usage = raw.parse().usage
    await settle(proxy)
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert (usage.model_extra or {})["cache_creation"]["ephemeral_5m_input_tokens"] == 46
    row = await ledger(pg_dsn, raw.headers["x-request-id"])
    assert (row["read_tokens"], row["creation_5m"], row["creation_1h"], row["cost"]) == (0, 46, 20, OTHER_PRINCIPAL[6])


def anthropic_turns() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    system = [text(SYSTEM, "1h")]
    turns = []
    history: list[dict[str, Any]] = []
    for user in USER:
        turns.append((system, [*history, {"role": "user", "content": [text(user, "5m")]}]))
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    return turns


async def test_anthropic_three_turns_exact_splits_and_costs(proxy: RunningProxy, pg_dsn: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, "acme"), max_retries=0)
    for (system, messages), expected in zip(anthropic_turns(), EXPECTED, strict=True):
        raw = await client.messages.with_raw_response.create(
            model="claude", system=system, messages=messages, max_tokens=64)  # type: ignore[arg-type]
        message = await raw.parse()
        await settle(proxy)
        prompt, out, read, c5m, c1h, uncached, cost = expected
        usage = message.usage
        assert usage.input_tokens == uncached == prompt - read - c5m - c1h
        assert usage.cache_read_input_tokens == read
        assert usage.cache_creation_input_tokens == c5m + c1h
        assert usage.cache_creation is not None
        assert usage.cache_creation.ephemeral_5m_input_tokens == c5m
        assert usage.cache_creation.ephemeral_1h_input_tokens == c1h
        assert usage.output_tokens == out
        row = await ledger(pg_dsn, raw.headers["x-request-id"])
        assert row["cost"] == cost and row["uncached_tokens"] == uncached


async def test_provider_cache_fields_are_replaced(proxy: RunningProxy, pg_dsn: str) -> None:
    """The /cached upstream claims half the prompt was cached; we bill our own split (a first turn)."""
    key = await new_key(pg_dsn, "initech")
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    completion = await oa.chat.completions.create(model="chat-cached", messages=openai_turns()[0])  # type: ignore[arg-type]
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens == 36
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    an = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)
    system, messages = anthropic_turns()[0]
    message = await an.messages.create(model="claude-cached", system=system, messages=messages,  # type: ignore[arg-type]
                                       max_tokens=64)
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens) == (6, 0, 30)
    await settle(proxy)

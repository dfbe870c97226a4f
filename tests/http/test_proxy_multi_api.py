"""One model on three APIs with one cache scope (issue 14, item 3): a prefix written through Chat Completions is
read through Messages and the Responses API when its blocks are the same, and only then.

Word tokenizer (see test_proxy_billing): a system prompt of 20 words and a question of 10 are 20 and 10 tokens, the
simulated upstream adds 3 per message (and per Anthropic system field, and per Responses item) and answers 8.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.proxy import RunningProxy, ledger, model_config, new_key, running_proxy, settle, text, unique, words

SYSTEM, QUESTION = words("policy", 20), words("ask", 10)
TOOLS_CHAT: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
TOOLS_ANTHROPIC: Any = [{"name": "lookup", "input_schema": {"type": "object"}}]


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    config = {"models": [model_config("both", simulator[0] + "/v1", ["openai", "anthropic", "openai-responses"],
                                      word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


class Clients:
    def __init__(self, proxy: RunningProxy, key: str) -> None:
        self.proxy = proxy
        self.openai = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        self.anthropic = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)

    async def chat(self, tools: Any = None) -> str:
        raw = await self.openai.chat.completions.with_raw_response.create(
            model="both", messages=[{"role": "system", "content": [text(SYSTEM, "1h")]},
                                    {"role": "user", "content": [text(QUESTION, "5m")]}],
            **({"tools": tools} if tools else {}))
        await settle(self.proxy)
        return str(raw.headers["x-request-id"])

    async def messages(self, tools: Any = None) -> str:
        raw = await self.anthropic.messages.with_raw_response.create(
            model="both", max_tokens=8, system=[text(SYSTEM, "1h")],
            messages=[{"role": "user", "content": [text(QUESTION, "5m")]}],
            **({"tools": tools} if tools else {}))
        await settle(self.proxy)
        return str(raw.headers["x-request-id"])

    async def responses(self) -> str:
        breakpoint: Any = {"mode": "explicit", "ttl": "30m"}
        raw = await self.openai.responses.with_raw_response.create(
            model="both", prompt_cache_retention="in_memory", input=[
                {"role": "system", "content": [{"type": "input_text", "text": SYSTEM,
                                                "prompt_cache_breakpoint": breakpoint}]},
                {"role": "user", "content": [{"type": "input_text", "text": QUESTION,
                                              "prompt_cache_breakpoint": {"mode": "explicit"}}]}])
        await settle(self.proxy)
        return str(raw.headers["x-request-id"])


async def split(pg_dsn: str, request_id: str) -> tuple[Any, ...]:
    row = await ledger(pg_dsn, request_id)
    return (row["prompt_tokens"], row["read_tokens"], row["creation_5m"], row["creation_1h"], row["uncached_tokens"],
            row["cost"])


# First: the system prompt written at 1h (20) and the question at 5m (10), 6 template tokens uncached:
#   (6·3 + 20·3·2.0 + 10·3·1.25 + 8·15) / 1e6 = 0.0002955. Then all 30 read: (6·3 + 30·0.3 + 120) / 1e6 = 0.000147.
WRITE = (36, 0, 10, 20, 6, Decimal("0.0002955"))
READ = (36, 30, 0, 0, 6, Decimal("0.000147"))


@pytest.mark.parametrize("order", [("chat", "messages", "responses"), ("messages", "responses", "chat"),
                                   ("responses", "chat", "messages")])
async def test_a_prefix_written_through_one_api_is_read_through_the_others(
        proxy: RunningProxy, pg_dsn: str, simulator: tuple[str, Simulator], order: tuple[str, ...]) -> None:
    clients = Clients(proxy, await new_key(pg_dsn, unique("multi")))
    first, *then = order
    assert await split(pg_dsn, await getattr(clients, first)()) == WRITE
    for api in then:
        assert await split(pg_dsn, await getattr(clients, api)()) == READ, api
    stranger = Clients(proxy, await new_key(pg_dsn, unique("stranger")))
    assert await split(pg_dsn, await stranger.messages()) == WRITE  # one scope per principal, as ever


async def test_each_api_is_forwarded_to_its_own_endpoint_untranslated(
        proxy: RunningProxy, pg_dsn: str, simulator: tuple[str, Simulator]) -> None:
    clients = Clients(proxy, await new_key(pg_dsn, unique("forward")))
    sim = simulator[1]
    await clients.chat()
    assert set(sim.requests[-1]) >= {"messages"} and "system" not in sim.requests[-1]
    await clients.messages()
    assert sim.requests[-1]["system"] == [{"type": "text", "text": SYSTEM}] and sim.requests[-1]["max_tokens"] == 8
    await clients.responses()
    assert sim.requests[-1]["input"][0]["content"] == [{"type": "input_text", "text": SYSTEM}]


async def test_tools_differ_in_shape_so_a_prefix_with_tools_is_not_shared(proxy: RunningProxy, pg_dsn: str) -> None:
    clients = Clients(proxy, await new_key(pg_dsn, unique("tools")))
    wrote = await split(pg_dsn, await clients.chat(TOOLS_CHAT))
    again = await split(pg_dsn, await clients.chat(TOOLS_CHAT))
    assert wrote[1] == 0 and again[1] == wrote[2] + wrote[3] > 30  # read through its own API, tool block included
    other = await split(pg_dsn, await clients.messages(TOOLS_ANTHROPIC))
    assert other[1] == 0 and other[2] + other[3] > 30  # the same tool in Anthropic's shape is another block

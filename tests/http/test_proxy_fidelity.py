"""What the SDKs see besides the bill (issue 14, item 6): the alias they asked for in every response and stream
event, and a /v1/models that needs a key and lists what the calling API serves, in its own shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique, words


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url = simulator[0]
    config = {"models": [model_config("chat", url + "/v1", "openai", word_tokenizer),
                         model_config("claude", url, "anthropic", word_tokenizer),
                         model_config("chat-2", url + "/v1", "openai", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


@pytest.fixture
async def key(pg_dsn: str) -> str:
    return await new_key(pg_dsn, unique("fidelity"))


def oa(proxy: RunningProxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def an(proxy: RunningProxy, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key=key, max_retries=0)


async def test_responses_name_the_alias_not_the_upstream_model(proxy: RunningProxy, key: str,
                                                              simulator: tuple[str, Simulator]) -> None:
    messages: Any = [{"role": "user", "content": words("q", 12)}]
    completion = await oa(proxy, key).chat.completions.create(model="chat", messages=messages)
    assert simulator[1].requests[-1]["model"] == "sim-chat"  # forwarded under the upstream's name
    assert completion.model == "chat"
    chunks = [chunk async for chunk in await oa(proxy, key).chat.completions.create(
        model="chat", messages=messages, stream=True, stream_options={"include_usage": True})]
    assert len(chunks) > 3 and {chunk.model for chunk in chunks} == {"chat"}
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 15
    message = await an(proxy, key).messages.create(model="claude", max_tokens=8, messages=messages)
    assert message.model == "claude"
    async with an(proxy, key).messages.stream(model="claude", max_tokens=8, messages=messages) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    starts = [e for e in events if e.type == "message_start"]
    assert len(starts) == 1 and starts[0].message.model == "claude" and final.model == "claude"
    assert final.usage.input_tokens == 15 and final.usage.output_tokens > 0


async def test_models_lists_what_the_calling_api_serves(proxy: RunningProxy, key: str) -> None:
    assert [m.id for m in (await oa(proxy, key).models.list()).data] == ["chat", "chat-2"]
    listed = await an(proxy, key).models.list()
    assert [m.id for m in listed.data] == ["claude"]
    assert (listed.data[0].type, listed.data[0].display_name) == ("model", "claude")


async def test_models_needs_a_key(proxy: RunningProxy) -> None:
    with pytest.raises(openai.AuthenticationError) as failed:
        await oa(proxy, "pc_not-a-key").models.list()
    assert "invalid API key" in str(failed.value)
    with pytest.raises(anthropic.AuthenticationError):
        await an(proxy, "pc_not-a-key").models.list()
    async with aiohttp.ClientSession() as http, http.get(proxy.url + "/v1/models") as response:
        assert response.status == 401
        assert (await response.json())["error"]["message"].startswith("missing API key")

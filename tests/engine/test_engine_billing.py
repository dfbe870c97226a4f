"""Billing against the real engine (docs/design.md#billing-caps, #usage-returned-to-clients): the official SDKs →
the proxy → llama-server with SmolLM2-135M-Instruct, over Chat Completions, Messages and the Responses API (its
markers in OpenAI's own ``prompt_cache_breakpoint`` syntax), streaming and not.

A recording relay (:class:`EngineTap`) sits between the proxy and the engine, so every bill is compared with the
engine's own usage for exactly that request. Expected splits are derived from the engine too: a marked block's tokens
are its ``/tokenize`` count (the GGUF tokenizer counts as the engine does, tests/engine/test_gguf_tokens.py), a
prompt's total is ``/tokenize`` of its ``/apply-template`` rendering. Every request checks:

- the SDK's usage equals the engine's prompt and completion counts, and so does the ledger row;
- read + creation <= prompt, uncached = prompt - read - creation, nothing scaled or priced at list;
- the cost and list cost by the formula of docs/design.md#cost-formula, exactly;
- ``engine_cached_tokens`` (ledger and metric) is what the engine reported.

Engine facts the expectations rest on (llama-server, one slot): its reported cache is the longest common token prefix
with the best-matching KV state it keeps (its slot's, or a prompt it saved to host memory), minus one when the whole
prompt matches (it evaluates at least one token); with ``max_tokens`` 1 the state a request leaves behind is exactly
its prompt. Its cache is shared by every tenant; ours is per principal.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
from aiohttp import web
from anthropic.types import MessageParam, TextBlockParam
from openai.types.chat import ChatCompletionMessageParam
from openai.types.responses import ResponseCompletedEvent

from promptcache.proxy.http.server import serving

from support.conversation import as_responses_input
from support.engine import Engine, model_path
from support.faults import entries, fetch, wait_until
from support.proxy import RunningProxy, model_config, new_key, running_proxy, text, unique

OPENAI, ANTHROPIC, RESPONSES = "smol-openai", "smol-anthropic", "smol-responses"
ALIAS = {"openai": OPENAI, "anthropic": ANTHROPIC, "openai-responses": RESPONSES}
APIS = tuple(ALIAS)
IN, OUT = Decimal("3.00"), Decimal("15.00")
WRITE = {"5m": Decimal("1.25"), "1h": Decimal("2.0"), "24h": Decimal("2.5")}
READ = Decimal("0.1")
"""The policy's default multipliers (docs/design.md#cost-formula); the config below sets none."""
TOKENIZER = "gguf:smollm:3cede1a4c51d"
"""The identity of SmolLM2's own vocabulary (tests/engine/test_gguf_tokens.py)."""
GREEDY = {"temperature": 0}
"""Sampling off (the anthropic SDK no longer takes ``temperature``: sent as an extra body key)."""
CASES = [pytest.param(api, stream, id=f"{api}-{'stream' if stream else 'plain'}")
         for api in APIS for stream in (False, True)]


def handbook(company: str) -> str:
    """A system prompt of about 160 tokens: the same rules for everyone, signed with the caller's own name. The
    engine keeps the rules in its KV state from test to test (its cache is not per tenant, ours is), so only the
    signature onwards is new to it; no earlier prompt shares as much with a test's later requests as its own do."""
    rules = " ".join(f"Rule {i}: answer every customer politely, cite the policy section, never guess a price."
                     for i in range(1, 9))
    return f"Support handbook. {rules} Signed, the {company} support team."


# -- the recording relay in front of the engine ---------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request the proxy forwarded, and the engine's response bytes as they came."""

    path: str
    body: dict[str, Any]
    response: bytes


@dataclass(frozen=True)
class EngineUsage:
    """The engine's own numbers for one request."""

    prompt: int
    completion: int
    cached: int


def engine_usage(seen: Seen) -> EngineUsage:
    """From the engine's response: OpenAI ``usage`` (the one usage chunk of a stream), the Responses API's (a stream's
    ``response.completed``), Anthropic ``usage`` (a stream's ``message_start`` totals and ``message_delta`` output
    count); an Anthropic prompt is input + cache read + cache creation."""
    if seen.body.get("stream") is True:
        lines = seen.response.decode().splitlines()
        payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    else:
        payloads = [json.loads(seen.response)]
    if seen.path == "/v1/chat/completions":
        (usage,) = [p["usage"] for p in payloads if p.get("usage")]
        return EngineUsage(usage["prompt_tokens"], usage["completion_tokens"],
                           usage["prompt_tokens_details"]["cached_tokens"])
    if seen.path == "/v1/responses":
        (usage,) = [p["response"]["usage"] for p in payloads if p.get("type") == "response.completed"] \
            if seen.body.get("stream") is True else [payloads[0]["usage"]]
        return EngineUsage(usage["input_tokens"], usage["output_tokens"],
                           usage["input_tokens_details"]["cached_tokens"])
    assert seen.path == "/v1/messages"
    if seen.body.get("stream") is True:
        (usage,) = [p["message"]["usage"] for p in payloads if p.get("type") == "message_start"]
        (completion,) = [p["usage"]["output_tokens"] for p in payloads if p.get("type") == "message_delta"]
    else:
        usage = payloads[0]["usage"]
        completion = usage["output_tokens"]
    prompt = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0) + usage.get(
        "cache_creation_input_tokens", 0)
    return EngineUsage(prompt, completion, usage["cache_read_input_tokens"])


class EngineTap:
    """An HTTP relay on a loopback port in front of the engine that records what passes, byte for byte (a stream
    is passed on chunk by chunk as it arrives)."""

    def __init__(self, engine_url: str, http: aiohttp.ClientSession) -> None:
        self.engine_url = engine_url
        self.http = http
        self.seen: list[Seen] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024**2)
        app.router.add_post("/{path:.*}", self._relay)
        return app

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self.http.post(self.engine_url + request.path, data=body,
                                  headers={"Content-Type": "application/json"}) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                "Content-Type": upstream.headers.get("Content-Type", "application/json")})
            await response.prepare(request)
            received = bytearray()
            async for chunk in upstream.content.iter_any():
                received += chunk
                await response.write(chunk)
        self.seen.append(Seen(request.path, json.loads(body), bytes(received)))
        await response.write_eof()
        return response

    def take(self) -> Seen:
        """The one request forwarded since the last take."""
        assert len(self.seen) == 1, f"expected one forwarded request, saw {[s.path for s in self.seen]}"
        return self.seen.pop()


class EngineText:
    """The engine's own token counts, without running the model."""

    def __init__(self, engine_url: str, http: aiohttp.ClientSession) -> None:
        self.engine_url = engine_url
        self.http = http

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.http.post(self.engine_url + path, json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def count(self, content: str) -> int:
        return len((await self._post("/tokenize", {"content": content}))["tokens"])

    async def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of the prompt the engine builds from ``messages`` (its chat template, special tokens)."""
        rendered = (await self._post("/apply-template", {"messages": messages}))["prompt"]
        tokens: list[int] = (await self._post("/tokenize", {"content": rendered, "parse_special": True}))["tokens"]
        return tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- a conversation, in each API's shape ----------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """A system prompt marked 1h, earlier (question, reply) pairs unmarked, and the new question marked 5m."""

    system: str
    question: str
    history: tuple[tuple[str, str], ...] = ()

    def _history(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for question, reply in self.history:
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return out

    def openai(self) -> list[ChatCompletionMessageParam]:
        messages = [{"role": "system", "content": [text(self.system, "1h")]}, *self._history(),
                    {"role": "user", "content": [text(self.question, "5m")]}]
        return cast("list[ChatCompletionMessageParam]", messages)

    def responses(self) -> Any:
        """Responses API input items, the markers as OpenAI's breakpoints (1h as its 30m; 5m the request's default,
        with ``prompt_cache_retention="in_memory"``); each typed ``message``, as llama-server requires."""
        return [{"type": "message", **item} for item in as_responses_input(cast("list[dict[str, Any]]", self.openai()))]

    def anthropic(self) -> tuple[list[TextBlockParam], list[MessageParam]]:
        messages = [*self._history(), {"role": "user", "content": [text(self.question, "5m")]}]
        return cast("list[TextBlockParam]", [text(self.system, "1h")]), cast("list[MessageParam]", messages)

    def plain(self) -> list[dict[str, str]]:
        """The same conversation for the engine's /apply-template (both APIs template alike)."""
        return [{"role": "system", "content": self.system}, *self._history(),
                {"role": "user", "content": self.question}]

    def then(self, reply: str, question: str) -> Turn:
        return Turn(self.system, question, (*self.history, (self.question, reply)))


# -- the proxy, the tap and one request through them ----------------------------------------------


@dataclass
class Rig:
    proxy: RunningProxy
    tap: EngineTap
    engine: EngineText
    pg_dsn: str

    def sample(self, name: str, **labels: str) -> float | None:
        return self.proxy.server.proxy.metrics.registry.get_sample_value(name, labels)

    def counter(self, name: str, **labels: str) -> float:
        return self.sample(name, **labels) or 0.0


@pytest.fixture(scope="module")
async def rig(engine: Engine, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    async with aiohttp.ClientSession() as http:
        tap = EngineTap(engine.url, http)
        async with serving(tap.app()) as tap_url:
            models = []
            for alias, url, api in ((OPENAI, tap_url + "/v1", "openai"), (ANTHROPIC, tap_url, "anthropic"),
                                    (RESPONSES, tap_url + "/v1", "openai-responses")):
                model = model_config(alias, url, api, model_path(), minPrefixTokens=16, enabledTtls=["5m", "1h"])
                model["tokenizer"] = {"type": "gguf", "path": str(model_path())}
                models.append(model)
            # The engine takes both cores while it reads a prompt; a generous deadline keeps every bill classified
            # (the deadline itself is tested in tests/http/test_proxy_streaming.py).
            config = {"models": models, "limits": {"classifyDeadlineSeconds": 10.0}}
            async with running_proxy(config, tmp_path_factory.mktemp("engine-billing"), pg_dsn) as proxy:
                yield Rig(proxy, tap, EngineText(engine.url, http), pg_dsn)


@dataclass(frozen=True)
class Answer:
    """What the SDK reported."""

    request_id: str
    prompt: int
    """OpenAI ``prompt_tokens``; Anthropic ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``."""
    completion: int
    read: int
    creation: dict[str, int]
    """``cache_creation``, by tier."""
    uncached: int | None
    """Anthropic ``input_tokens`` (OpenAI's APIs report none)."""


def tiers(creation: Any) -> dict[str, int]:
    raw = creation if isinstance(creation, dict) else creation.model_dump()
    assert set(raw) == {"ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "ephemeral_24h_input_tokens"}
    return {tier: raw[f"ephemeral_{tier}_input_tokens"] for tier in ("5m", "1h", "24h")}


def from_openai(request_id: str, usage: Any) -> Answer:
    assert usage is not None and usage.prompt_tokens_details is not None
    extra = usage.model_extra or {}
    creation = tiers(extra["cache_creation"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == extra["cache_read_input_tokens"]
    assert extra["cache_creation_input_tokens"] == sum(creation.values())
    return Answer(request_id, usage.prompt_tokens, usage.completion_tokens, extra["cache_read_input_tokens"],
                  creation, None)


def from_responses(request_id: str, usage: Any) -> Answer:
    assert usage is not None
    extra = usage.model_extra or {}
    creation = tiers(extra["cache_creation"])
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == extra["cache_read_input_tokens"]
    assert usage.input_tokens_details.cache_write_tokens == extra["cache_creation_input_tokens"] == sum(
        creation.values())
    return Answer(request_id, usage.input_tokens, usage.output_tokens, extra["cache_read_input_tokens"], creation,
                  None)


def from_anthropic(request_id: str, usage: Any, creation: Any) -> Answer:
    assert usage.cache_read_input_tokens is not None and usage.cache_creation_input_tokens is not None
    split = tiers(creation)
    assert usage.cache_creation_input_tokens == sum(split.values())
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    return Answer(request_id, prompt, usage.output_tokens, usage.cache_read_input_tokens, split, usage.input_tokens)


def anthropic_total(usage: Any) -> tuple[int, int, int]:
    return usage.input_tokens, usage.cache_read_input_tokens or 0, usage.cache_creation_input_tokens or 0


async def ask(rig: Rig, key: str, api: str, turn: Turn, *, stream: bool, max_tokens: int) -> Answer:
    if api == "openai":
        async with openai.AsyncOpenAI(base_url=rig.proxy.url + "/v1", api_key=key, max_retries=0) as oa:
            if not stream:
                raw = await oa.chat.completions.with_raw_response.create(
                    model=OPENAI, messages=turn.openai(), max_tokens=max_tokens, temperature=0)
                return from_openai(raw.headers["x-request-id"], raw.parse().usage)
            chunks = await oa.chat.completions.create(model=OPENAI, messages=turn.openai(), max_tokens=max_tokens,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True})
            received = [chunk async for chunk in chunks]
            assert [c.usage is not None for c in received] == [False] * (len(received) - 1) + [True]
            return from_openai(chunks.response.headers["x-request-id"], received[-1].usage)
    if api == "openai-responses":
        async with openai.AsyncOpenAI(base_url=rig.proxy.url + "/v1", api_key=key, max_retries=0) as oa:
            if not stream:
                answered = await oa.responses.with_raw_response.create(
                    model=RESPONSES, input=turn.responses(), max_output_tokens=max_tokens, temperature=0,
                    prompt_cache_retention="in_memory")
                response = answered.parse()
                assert response.model == RESPONSES
                return from_responses(answered.headers["x-request-id"], response.usage)
            streamed = await oa.responses.create(model=RESPONSES, input=turn.responses(), max_output_tokens=max_tokens,
                                               temperature=0, prompt_cache_retention="in_memory", stream=True)
            (completed,) = [e async for e in streamed if isinstance(e, ResponseCompletedEvent)]
            assert completed.response.model == RESPONSES
            return from_responses(streamed.response.headers["x-request-id"], completed.response.usage)
    system, messages = turn.anthropic()
    async with anthropic.AsyncAnthropic(base_url=rig.proxy.url, api_key=key, max_retries=0) as an:
        if not stream:
            answer = await an.messages.with_raw_response.create(
                model=ANTHROPIC, system=system, messages=messages, max_tokens=max_tokens, extra_body=GREEDY)
            message = await answer.parse()
            return from_anthropic(answer.headers["x-request-id"], message.usage, message.usage.cache_creation)
        async with an.messages.stream(model=ANTHROPIC, system=system, messages=messages, max_tokens=max_tokens,
                                      extra_body=GREEDY) as events:
            seen = [event async for event in events]
            final = await events.get_final_message()
        (start,) = [e for e in seen if e.type == "message_start"]
        (delta,) = [e for e in seen if e.type == "message_delta"]
        billed = from_anthropic(events.response.headers["x-request-id"], delta.usage,
                                (delta.usage.model_extra or {})["cache_creation"])
        # message_start carries the split or, if the lookup had not finished, list-price totals: the same prompt.
        assert sum(anthropic_total(start.message.usage)) == billed.prompt
        assert anthropic_total(final.usage) == anthropic_total(delta.usage)
        assert final.usage.output_tokens == billed.completion
        return billed


@dataclass(frozen=True)
class Billed:
    answer: Answer
    engine: EngineUsage
    row: asyncpg.Record
    prompt_tokens: list[int]
    """The engine's tokens for the prompt (its template over the conversation)."""


async def exchange(rig: Rig, key: str, api: str, turn: Turn, *, stream: bool, max_tokens: int) -> Billed:
    """One request through the SDK, the proxy and the tap, with the checks every bill must pass."""
    alias = ALIAS[api]
    engine_cached_before = rig.counter("promptcache_engine_cached_tokens_total", model=alias)
    read_before = rig.counter("promptcache_read_tokens_total", model=alias)
    rig.tap.seen.clear()
    answer = await ask(rig, key, api, turn, stream=stream, max_tokens=max_tokens)
    seen = rig.tap.take()
    assert "cache_control" not in json.dumps(seen.body)
    engine = engine_usage(seen)

    async def committed() -> bool:
        return bool(await fetch(rig.pg_dsn, "SELECT 1 FROM ledger WHERE request_id = $1", answer.request_id))

    await wait_until(committed, f"the ledger row of {answer.request_id}")
    (row,) = await fetch(rig.pg_dsn, "SELECT * FROM ledger WHERE request_id = $1", answer.request_id)
    prompt_tokens = await rig.engine.prompt(turn.plain())

    # The usage the SDK sees is the engine's, and so is the ledger's.
    assert (answer.prompt, answer.completion) == (engine.prompt, engine.completion)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (engine.prompt, engine.completion)
    assert engine.prompt == len(prompt_tokens)
    # Our split, as the SDK and the ledger carry it, fits inside the engine's prompt.
    creation = answer.creation["5m"] + answer.creation["1h"] + answer.creation["24h"]
    assert (row["read_tokens"], row["creation_5m"], row["creation_1h"], row["creation_24h"]) == (
        answer.read, answer.creation["5m"], answer.creation["1h"], answer.creation["24h"])
    assert answer.read + creation <= answer.prompt
    assert row["uncached_tokens"] == answer.prompt - answer.read - creation
    if answer.uncached is not None:
        assert answer.uncached == row["uncached_tokens"]
    assert row["tokenizer_version"] == TOKENIZER
    # Priced exactly by the formula.
    assert row["cost"] == (row["uncached_tokens"] * IN + answer.read * IN * READ
                           + sum(answer.creation[t] * IN * WRITE[t] for t in WRITE)
                           + answer.completion * OUT) / 1_000_000
    assert row["list_cost"] == (answer.prompt * IN + answer.completion * OUT) / 1_000_000
    # The engine's own cache count, recorded and counted as it reported it.
    assert row["engine_cached_tokens"] == engine.cached
    assert rig.counter("promptcache_engine_cached_tokens_total", model=alias) - engine_cached_before == engine.cached
    assert rig.counter("promptcache_read_tokens_total", model=alias) - read_before == answer.read
    # Nothing had to be scaled or priced at list: the real engine's counts hold ours.
    for action in ("scaled", "list_price"):
        assert rig.sample("promptcache_billing_caps_total", model=alias, action=action) is None
    assert rig.sample("promptcache_index_fallbacks_total", reason="deadline") is None
    return Billed(answer, engine, row, prompt_tokens)


def split(billed: Billed) -> tuple[int, int, int, int]:
    """(read, 5m, 1h, 24h) as billed."""
    a = billed.answer
    return a.read, a.creation["5m"], a.creation["1h"], a.creation["24h"]


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("api", "stream"), CASES)
async def test_usage_is_the_engines_and_the_marked_prefix_is_written(rig: Rig, api: str, stream: bool) -> None:
    """A first request: the SDK's totals are the engine's; the marked system prompt is written at 1h and the
    question at 5m, each its exact token count; the chat template's tokens are uncached."""
    turn = Turn(handbook(f"Northwind{api.title()}{'Live' if stream else 'Batch'}"),
                "How do I reset my password?")
    key = await new_key(rig.pg_dsn, unique(f"first-{api}-{stream}"))
    system, question = await rig.engine.count(turn.system), await rig.engine.count(turn.question)
    assert 140 <= system <= 200

    billed = await exchange(rig, key, api, turn, stream=stream, max_tokens=3)

    assert split(billed) == (0, question, system, 0)
    assert billed.answer.prompt > system + question  # the template's tokens are real, and ours never counts them
    assert billed.row["uncached_tokens"] == billed.answer.prompt - system - question
    assert billed.row["cost"] == ((billed.answer.prompt - system - question) * IN + system * IN * WRITE["1h"]
                                  + question * IN * WRITE["5m"] + billed.answer.completion * OUT) / 1_000_000
    assert 1 <= billed.answer.completion <= 3


@pytest.mark.parametrize(("api", "stream"), CASES)
async def test_a_repeated_prefix_is_billed_as_a_read_and_the_engine_served_it_from_cache(
    rig: Rig, pg_dsn: str, api: str, stream: bool,
) -> None:
    """Another tenant's identical request is all cache to the engine but a write to us (nothing is shared across
    principals); the same marked handbook with a new question reads it (the first request's 1h creation), and the
    engine reuses every token up to the question; the identical request again reads the whole marked prompt, and
    the engine reuses all of it but the one token it must evaluate."""
    principal = unique(f"repeat-{api}-{stream}")
    key = await new_key(pg_dsn, principal)
    first = Turn(handbook(f"Contoso{api.title()}{'Live' if stream else 'Batch'}"), "Where is my order?")
    second = Turn(first.system, "Can I change my delivery address?")
    system = await rig.engine.count(first.system)
    q1, q2 = await rig.engine.count(first.question), await rig.engine.count(second.question)

    wrote = await exchange(rig, key, api, first, stream=stream, max_tokens=2)
    assert split(wrote) == (0, q1, system, 0)
    assert sorted((r["virtual_model"], r["cum_tokens"], r["tier"]) for r in await entries(pg_dsn, principal)) == [
        (ALIAS[api], system, "1h"), (ALIAS[api], system + q1, "5m")]

    stranger = await new_key(pg_dsn, unique(f"stranger-{api}-{stream}"))
    other = await exchange(rig, stranger, api, first, stream=stream, max_tokens=2)
    assert split(other) == (0, q1, system, 0)
    assert other.prompt_tokens == wrote.prompt_tokens
    assert other.engine.cached == other.row["engine_cached_tokens"] == other.answer.prompt - 1

    read = await exchange(rig, key, api, second, stream=stream, max_tokens=2)
    assert split(read) == (wrote.answer.creation["1h"], q2, 0, 0) == (system, q2, 0, 0)
    assert read.row["cost"] == ((read.answer.prompt - system - q2) * IN + system * IN * READ
                                + q2 * IN * WRITE["5m"] + read.answer.completion * OUT) / 1_000_000
    reused = common_prefix(wrote.prompt_tokens, read.prompt_tokens)
    assert read.engine.cached == read.row["engine_cached_tokens"] == reused
    assert system < reused < read.answer.prompt  # the engine served the handbook we billed as read, and more

    again = await exchange(rig, key, api, second, stream=stream, max_tokens=2)
    assert split(again) == (system + q2, 0, 0, 0)
    assert again.row["uncached_tokens"] == again.answer.prompt - system - q2
    assert again.row["cost"] == ((again.answer.prompt - system - q2) * IN + (system + q2) * IN * READ
                                 + again.answer.completion * OUT) / 1_000_000
    assert again.answer.prompt == read.answer.prompt
    assert again.engine.cached == again.row["engine_cached_tokens"] == again.answer.prompt - 1


REPLIES = ["Sure, I can help.", "Please share your order number.", "Thanks, I found it.",
           "It ships tomorrow morning.", "Anything else today?"]
QUESTIONS = ["My parcel is late.", "It is order 48213.", "When will it arrive?", "Can it come sooner?",
             "Could you add gift wrap?", "No, that is all."]


@pytest.mark.parametrize("api", APIS)
async def test_read_and_creation_fit_the_prompt_over_a_growing_conversation(rig: Rig, api: str) -> None:
    """Six turns, streaming and not in turn: each reads the previous turn's marked question (its cumulative count)
    and writes the reply and the new question at 5m; the engine reuses exactly the previous turn's prompt (with
    one output token the KV state a turn leaves is its prompt)."""
    key = await new_key(rig.pg_dsn, unique(f"turns-{api}"))
    turn = Turn(handbook(f"Fabrikam{api.title()}"), QUESTIONS[0])
    system = await rig.engine.count(turn.system)
    cumulative = system  # our count of every block so far: the handbook, each question and each reply
    previous: Billed | None = None
    for n in range(len(QUESTIONS)):
        if n:
            turn = turn.then(REPLIES[n - 1], QUESTIONS[n])
        read_to = cumulative
        written = (await rig.engine.count(REPLIES[n - 1]) if n else 0) + await rig.engine.count(QUESTIONS[n])
        cumulative += written
        billed = await exchange(rig, key, api, turn, stream=n % 2 == 1, max_tokens=1)

        if previous is None:
            assert split(billed) == (0, cumulative - system, system, 0)
        else:
            assert split(billed) == (read_to, written, 0, 0)
            assert billed.answer.read + billed.answer.creation["5m"] == cumulative <= billed.answer.prompt
            assert billed.prompt_tokens[:len(previous.prompt_tokens)] == previous.prompt_tokens
            assert billed.engine.cached == billed.row["engine_cached_tokens"] == previous.answer.prompt
        assert billed.row["uncached_tokens"] == billed.answer.prompt - cumulative
        previous = billed

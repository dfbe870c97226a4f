"""Engine bench (issue 12): our token counts and bills against a real engine, per request shape.

A seeded corpus of conversations (>= 300 requests) goes through the in-process proxy to llama.cpp's
``llama-server`` (SmolLM2-135M-Instruct, GGUF tokenizer), with Postgres (a scratch database, dropped after) and
Redis (a key prefix of its own). Each conversation grows turn by turn, so prefixes repeat and reads happen. Per
shape it prints the distribution of (engine prompt - our count of every block), the bills the caps scaled or sent
to list price (``promptcache_billing_caps_total``, read before and after each request), bills with read + creation
> prompt (must be 0), and the billed reads beside what the engine says it served from its own KV cache. Why: the
engine's count is the truth we bill inside; the gap is the chat template plus joint tokenization, and a shape
where it goes negative is one where we count tokens the engine never sees. It also checks that the usage each SDK
returned is the engine's (its ``/metrics`` deltas, and ``timings`` on OpenAI answers). Figures only, no timing
asserted.

Run with ``.venv/bin/python -P bench/engine.py [--seed N] [--per-shape N]`` (``$PROMPTCACHE_ENGINE_BIN`` names the
llama-server directory; without it ``.ci/engine/build`` finds it).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import anthropic
import asyncpg
import openai
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database
from support.engine import CONTEXT, Engine, llama_server, model_path
from support.proxy import RunningProxy, new_key, redis_prefix, running_proxy, settle

REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
MIN_PREFIX = 16
Api = Literal["openai", "anthropic"]
Body = dict[str, Any]
EPHEMERAL_5M = {"type": "ephemeral"}
EPHEMERAL_1H = {"type": "ephemeral", "ttl": "1h"}

WORDS = ("the", "cache", "prefix", "token", "engine", "request", "billing", "tenant", "ledger", "policy",
         "breakpoint", "model", "prompt", "reply", "support", "ticket", "invoice", "refund", "customer", "order",
         "shipping", "delay", "region", "quarterly", "report", "revenue", "churn", "roadmap", "release", "deploy",
         "cluster", "pod", "volume", "config", "reload", "metric", "latency", "throughput", "queue", "retry",
         "timeout", "database", "index", "lookup", "write", "read", "expiry", "window", "slot", "batch", "stream",
         "chunk", "usage", "total", "split", "don't", "isn't", "we're", "it's", "they've", "I'm", "you'll")
PUNCT = (".", ",", "?", "!", ";", ":", " -", "...")
SNIPPETS = ("`kubectl get pods -n prod`", "def f(x):\n    return x * 2\n", "SELECT id FROM orders WHERE total > 100;",
            "https://example.com/docs?page=2#limits", "{\"status\": \"ok\", \"count\": 42}", "v1.37.2", "3.14159",
            "2025-03-01T12:00:00Z", "#1234", "$19.99", "user@example.com", "  indented\n\ttabbed\n")
UNICODE = ("缓存", "提示词", "请求", "東京都", "日本語の文章です", "한국어 문장", "привет мир", "Здравствуйте",
           "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "Ελληνικά", "naïve", "crème brûlée",
           "São Paulo", "Zürich", "Ångström", "e\u0301te\u0301", "ﬁ", "Ⅻ", "①②③", "∑∫√∞≠", "🎉", "🚀🔥", "👩‍👩‍👧",
           "👍🏽", "🇫🇷🇯🇵", "❤️", "✓", "…", "«guillemets»", "„Anführung“", "\u200bzero-width", "nbsp\u00a0here",
           "emoji🙂inline", "混合 mixed テキスト", "Ünïcödé")


def words(rng: random.Random, low: int, high: int, pool: tuple[str, ...] | list[str] = WORDS,
          extra: float = 0.08) -> str:
    """A sentence-ish text of ``low..high`` words, with punctuation and now and then a snippet."""
    out: list[str] = []
    for i in range(rng.randint(low, high)):
        out.append(rng.choice(SNIPPETS) if rng.random() < extra else rng.choice(pool))
        if i and rng.random() < 0.12:
            out[-1] += rng.choice(PUNCT)
        if rng.random() < 0.03:
            out[-1] += "\n"
    return " ".join(out).replace("\n ", "\n")


def unicode_text(rng: random.Random, low: int, high: int) -> str:
    return words(rng, low, high, pool=list(UNICODE) + list(WORDS[:12]), extra=0.02)


@dataclass
class Call:
    """One request of the corpus: the body without ``model`` and ``max_tokens``."""

    shape: str
    api: Api
    model: str
    body: Body
    messages: int
    """Messages in the request, the Anthropic ``system`` counted as one."""
    conversation: int
    turn: int


@dataclass
class Chat:
    """A conversation that grows turn by turn; ``snapshot`` is the request for its current state with its markers.

    ``marks``: which messages get a 5m marker on their last part: ``last`` (the last message), ``last+prev``
    (also the previous user message), ``top`` (Anthropic top-level ``cache_control``), ``none`` (policy placement).
    """

    shape: str
    api: Api
    model: str
    conversation: int
    marks: str
    system: Any = None
    tools: list[Body] | None = None
    messages: list[Body] = field(default_factory=list)
    turn: int = 0

    def snapshot(self) -> Call:
        messages = copy.deepcopy(self.messages)
        if self.marks in ("last", "last+prev"):
            _mark(messages[-1])
        if self.marks == "last+prev":
            users = [i for i, m in enumerate(messages[:-1]) if m["role"] == "user" and m.get("content")]
            if users:
                _mark(messages[users[-1]])
        body: Body = {}
        system = copy.deepcopy(self.system)
        if self.api == "openai":
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
        elif system is not None:
            body["system"] = system
        body["messages"] = messages
        if self.tools:
            body["tools"] = copy.deepcopy(self.tools)
        if self.marks == "top":
            body["cache_control"] = dict(EPHEMERAL_5M)
        self.turn += 1
        count = len(messages) + (1 if self.api == "anthropic" and system is not None else 0)
        return Call(self.shape, self.api, self.model, body, count, self.conversation, self.turn)


def _mark(message: Body, marker: dict[str, str] = EPHEMERAL_5M) -> None:
    """A marker on the message's last content part (a string content becomes one text part, the same hash)."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content = [{"type": "text", "text": content}]
    if isinstance(content, list) and content:
        content[-1]["cache_control"] = dict(marker)


def parts(texts: list[str], marker: dict[str, str] | None = None) -> list[Body]:
    out: list[Body] = [{"type": "text", "text": t} for t in texts]
    if marker is not None:
        out[-1]["cache_control"] = dict(marker)
    return out


def grow(chat: Chat, longest: int, budget: int, step: Callable[[Chat], None],
         first: Callable[[Chat], None]) -> Iterator[Call]:
    """The conversation's requests: the first user turn, then ``step`` (a reply and the next user turn) until
    it holds ``longest`` messages or the shape's ``budget`` of requests is spent."""
    first(chat)
    yield chat.snapshot()
    sent = 1
    while sent < budget:
        step(chat)
        call = chat.snapshot()
        if call.messages > longest:
            return
        yield call
        sent += 1


# -- the shapes --------------------------------------------------------------------------------------------


def openai_multi_turn(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    lengths = [40, 2, *[rng.randint(2, 40) for _ in range(40)]]
    made = 0
    for longest in lengths:
        kind = rng.random()
        system: Any = (parts([words(rng, 12, 36)], EPHEMERAL_1H) if kind < 0.7 else
                       words(rng, 12, 36) if kind < 0.9 else None)
        chat = Chat("openai multi-turn 2-40 msgs", "openai", "smol-openai", next(conv),
                    rng.choice(["last", "last+prev"]), system=system)

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": words(rng, 4, 24)})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": words(rng, 4, 20)})
            c.messages.append({"role": "user", "content": words(rng, 4, 24)})

        for call in grow(chat, longest if system is not None else longest - 1, n - made, step, first):
            made += 1
            yield call
        if made >= n:
            return


def openai_many_parts(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    made = 0
    while made < n:
        system = parts([words(rng, 4, 18) for _ in range(rng.randint(2, 4))], EPHEMERAL_1H)
        chat = Chat("openai many content parts", "openai", "smol-openai", next(conv), "last+prev", system=system)

        def user(c: Chat) -> None:
            c.messages.append({"role": "user", "content": parts([words(rng, 2, 14) for _ in
                                                                  range(rng.randint(2, 10))])})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": parts([words(rng, 3, 14) for _ in
                                                                       range(rng.randint(1, 3))])})
            user(c)

        for call in grow(chat, rng.randint(6, 16), n - made, step, user):
            made += 1
            yield call


TOOL_NAMES = ("get_weather", "search_orders", "refund_order", "lookup_customer", "create_ticket", "list_pods")


TOOLS_TEMPLATE = Path(__file__).with_name("tools-template.jinja")
"""A ChatML template that renders tools and tool calls, for a second engine: SmolLM2's own drops both."""
TOOLS_MODEL = "smol-openai-tools"
"""The alias served by the engine with :data:`TOOLS_TEMPLATE`."""


def openai_tools(rng: random.Random, n: int, conv: Iterator[int], shape: str = "openai tools + tool_calls",
                 model: str = "smol-openai") -> Iterator[Call]:
    made = 0
    while made < n:
        names = rng.sample(TOOL_NAMES, rng.randint(2, 5))
        tools: list[Body] = [{"type": "function", "function": {
            "name": name, "description": words(rng, 4, 12),
            "parameters": {"type": "object", "properties": {
                arg: {"type": rng.choice(["string", "integer"]), "description": words(rng, 2, 8)}
                for arg in rng.sample(["id", "city", "query", "limit", "region", "reason"], rng.randint(1, 3))},
                "required": []}}} for name in names]
        tools[-1]["cache_control"] = dict(EPHEMERAL_1H)
        chat = Chat(shape, "openai", model, next(conv), "last",
                    system=words(rng, 8, 20), tools=tools)
        calls = iter(range(1_000_000))

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": words(rng, 4, 18)})

        def step(c: Chat, names: list[str] = names, calls: Iterator[int] = calls) -> None:
            if rng.random() < 0.55:
                made_calls = [{"id": f"call_{next(calls)}", "type": "function", "function": {
                    "name": rng.choice(names), "arguments": json.dumps({"query": words(rng, 1, 4),
                                                                       "limit": rng.randint(1, 50)})}}
                    for _ in range(rng.randint(1, 2))]
                c.messages.append({"role": "assistant", "content": None if rng.random() < 0.6 else
                                   words(rng, 3, 12), "tool_calls": made_calls})
                for made_call in made_calls:
                    c.messages.append({"role": "tool", "tool_call_id": made_call["id"],
                                       "content": words(rng, 4, 18)})
            else:
                c.messages.append({"role": "assistant", "content": words(rng, 4, 18)})
                c.messages.append({"role": "user", "content": words(rng, 4, 18)})

        for call in grow(chat, rng.randint(6, 24), n - made, step, first):
            made += 1
            yield call


def anthropic_system_list(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    """A few system prompts (lists of parts, 1h marker on the last or a middle part) over many short chats."""
    systems = []
    for _ in range(3):
        texts = [words(rng, 6, 24) for _ in range(rng.randint(2, 5))]
        where = len(texts) - 1 if rng.random() < 0.6 else rng.randrange(len(texts))
        system = parts(texts)
        system[where]["cache_control"] = dict(EPHEMERAL_1H)
        systems.append(system)
    made = 0
    while made < n:
        chat = Chat("anthropic system as list", "anthropic", "smol-anthropic", next(conv), "last",
                    system=rng.choice(systems))

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": words(rng, 4, 18)})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": words(rng, 4, 18)})
            c.messages.append({"role": "user", "content": words(rng, 4, 18)})

        for call in grow(chat, rng.choice([2, 4, 6, 8]), n - made, step, first):
            made += 1
            yield call


def anthropic_multi_turn(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    lengths = [40, 2, *[rng.randint(2, 40) for _ in range(40)]]
    made = 0
    for longest in lengths:
        system = words(rng, 10, 30) if rng.random() < 0.8 else None
        chat = Chat("anthropic multi-turn 2-40 msgs", "anthropic", "smol-anthropic", next(conv),
                    rng.choice(["last", "last+prev", "top"]), system=system)

        def content(c: Chat, low: int, high: int) -> Any:
            if rng.random() < 0.3:
                return parts([words(rng, 2, 12) for _ in range(rng.randint(2, 4))])
            return words(rng, low, high)

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": content(c, 4, 24)})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": content(c, 4, 20)})
            c.messages.append({"role": "user", "content": content(c, 4, 24)})

        for call in grow(chat, longest if system is not None else longest - 1, n - made, step, first):
            made += 1
            yield call
        if made >= n:
            return


def unicode_chats(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    made = 0
    api_cycle = iter(["openai", "anthropic"] * 100)
    while made < n:
        api: Api = "openai" if next(api_cycle) == "openai" else "anthropic"
        system = parts([unicode_text(rng, 6, 18) for _ in range(rng.randint(1, 3))], EPHEMERAL_1H)
        chat = Chat("unicode (CJK, emoji, accents)", api, f"smol-{api}", next(conv),
                    rng.choice(["last", "last+prev"]), system=system)

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": unicode_text(rng, 4, 20)})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": unicode_text(rng, 4, 18)})
            c.messages.append({"role": "user", "content": unicode_text(rng, 4, 20)})

        for call in grow(chat, rng.randint(4, 20), n - made, step, first):
            made += 1
            yield call


def automatic(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    """No markers: the policy places one on the last user message (``automatic.mode: lastUserMessage``)."""
    made = 0
    api_cycle = iter(["openai", "anthropic"] * 100)
    while made < n:
        api: Api = "openai" if next(api_cycle) == "openai" else "anthropic"
        chat = Chat("automatic placement", api, f"smol-{api}-auto", next(conv), "none",
                    system=words(rng, 10, 30) if rng.random() < 0.8 else None)

        def first(c: Chat) -> None:
            c.messages.append({"role": "user", "content": words(rng, 4, 22)})

        def step(c: Chat) -> None:
            c.messages.append({"role": "assistant", "content": words(rng, 4, 20)})
            c.messages.append({"role": "user", "content": words(rng, 4, 22)})

        for call in grow(chat, rng.randint(4, 24), n - made, step, first):
            made += 1
            yield call


SHAPES: tuple[Callable[[random.Random, int, Iterator[int]], Iterator[Call]], ...] = (
    openai_multi_turn, openai_many_parts, openai_tools, anthropic_system_list, anthropic_multi_turn,
    unicode_chats, automatic)


def openai_tools_rendered(rng: random.Random, n: int, conv: Iterator[int]) -> Iterator[Call]:
    """The tools shape again, through the engine whose template renders tools (as most tool-calling models do)."""
    return openai_tools(rng, n, conv, "openai tools, template renders", TOOLS_MODEL)


SHAPES = (*SHAPES, openai_tools_rendered)


def corpus(seed: int, per_shape: int) -> list[Call]:
    rng = random.Random(seed)
    conv = iter(range(1, 1_000_000))
    return [call for shape in SHAPES for call in shape(rng, per_shape, conv)]


# -- measuring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCounters:
    """llama-server's /metrics counters: prompt tokens evaluated and reused, completion tokens, seconds."""

    evaluated: int
    cached: int
    completion: int
    seconds: float

    def __add__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(self.evaluated + other.evaluated, self.cached + other.cached,
                              self.completion + other.completion, self.seconds + other.seconds)

    def __sub__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(self.evaluated - other.evaluated, self.cached - other.cached,
                              self.completion - other.completion, self.seconds - other.seconds)


@dataclass
class Result:
    call: Call
    error: str | None = None
    prompt: int = 0
    """The ledger's prompt tokens (the upstream's usage)."""
    completion: int = 0
    ours: int = 0
    """Our count of every block: the last chain block's cumulative tokens."""
    ours_marked: int = 0
    """Our cumulative count at the deepest breakpoint at or above minPrefixTokens (what a split can cover)."""
    read: int = 0
    creation: int = 0
    engine_cached: int | None = None
    scaled: bool = False
    list_price: bool = False
    fallbacks: list[str] = field(default_factory=list)
    sdk: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(prompt, completion, read, creation) as the SDK parsed them."""
    engine: EngineCounters = EngineCounters(0, 0, 0, 0.0)
    """llama-server's /metrics deltas over the request."""
    timings: tuple[int, int] | None = None
    """(prompt_n + cache_n, predicted_n) from an OpenAI answer's ``timings``."""


def caps(registry: CollectorRegistry) -> dict[tuple[str, ...], float]:
    """The billing caps and index fallbacks counters, by their labels."""
    out: dict[tuple[str, ...], float] = {}
    for metric in registry.collect():
        if metric.name in ("promptcache_billing_caps", "promptcache_index_fallbacks"):
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[(metric.name, *sample.labels.values())] = sample.value
    return out


async def engine_counters(http: aiohttp.ClientSession, engine: Engine) -> EngineCounters:
    async with http.get(f"{engine.url}/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return EngineCounters(int(values["llamacpp:prompt_tokens_total"]),
                          int(values.get("llamacpp:prompt_tokens_cached_total", 0.0)),
                          int(values["llamacpp:tokens_predicted_total"]),
                          values["llamacpp:prompt_seconds_total"] + values["llamacpp:tokens_predicted_seconds_total"])


@dataclass
class Clients:
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic


async def send(clients: Clients, call: Call, max_tokens: int) -> tuple[str, tuple[int, int, int, int],
                                                                          tuple[int, int] | None]:
    """The request through the SDK: its x-request-id, the usage it parsed, and the engine's timings if any."""
    body: dict[str, Any] = dict(call.body)
    if call.api == "openai":
        raw = await clients.openai.chat.completions.with_raw_response.create(
            model=call.model, max_tokens=max_tokens, **body)
        completion = raw.parse()
        usage = completion.usage
        assert usage is not None
        extra = usage.model_extra or {}
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        timings = json.loads(raw.text).get("timings")
        engine = (timings["prompt_n"] + timings["cache_n"], timings["predicted_n"]) if timings else None
        return (raw.headers["x-request-id"],
                (usage.prompt_tokens, usage.completion_tokens, cached or 0,
                 int(extra.get("cache_creation_input_tokens") or 0)), engine)
    araw = await clients.anthropic.messages.with_raw_response.create(
        model=call.model, max_tokens=max_tokens, **body)
    message = await araw.parse()
    au = message.usage
    read, creation = au.cache_read_input_tokens or 0, au.cache_creation_input_tokens or 0
    return araw.headers["x-request-id"], (au.input_tokens + read + creation, au.output_tokens, read, creation), None


async def measure(running: RunningProxy, clients: Clients, conn: asyncpg.Connection, http: aiohttp.ClientSession,
                  engine: Engine, call: Call, max_tokens: int) -> Result:
    registry = running.server.proxy.metrics.registry
    before, engine_before = caps(registry), await engine_counters(http, engine)
    result = Result(call)
    try:
        request_id, result.sdk, result.timings = await send(clients, call, max_tokens)
    except (openai.APIError, anthropic.APIError) as exc:
        await settle(running)
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return result
    await settle(running)
    result.engine = await engine_counters(http, engine) - engine_before
    for key, value in caps(registry).items():
        delta = value - before.get(key, 0.0)
        if delta <= 0:
            continue
        if key[0] == "promptcache_billing_caps":
            result.scaled |= key[2] == "scaled"
            result.list_price |= key[2] == "list_price"
        else:
            result.fallbacks.append(key[1])
    row = await conn.fetchrow("SELECT * FROM ledger WHERE request_id = $1", request_id)
    log = await conn.fetchrow("SELECT chain_tokens, chain_tiers FROM request_log WHERE request_id = $1", request_id)
    if row is None or log is None:
        result.error = f"no ledger or request_log row for {request_id}"
        return result
    result.prompt, result.completion = row["prompt_tokens"], row["completion_tokens"]
    result.read = row["read_tokens"]
    result.creation = row["creation_5m"] + row["creation_1h"] + row["creation_24h"]
    result.engine_cached = row["engine_cached_tokens"]
    chain: list[int] = list(log["chain_tokens"])
    tiers: list[str | None] = list(log["chain_tiers"])
    result.ours = chain[-1] if chain else 0
    result.ours_marked = max((t for t, tier in zip(chain, tiers, strict=True) if tier and t >= MIN_PREFIX),
                             default=0)
    return result


# -- the report --------------------------------------------------------------------------------------------


def pct(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row_of(label: str, results: list[Result]) -> list[str]:
    ok = [r for r in results if r.error is None]
    msgs = [r.call.messages for r in results]
    if not ok:
        return [label, str(len(results)), f"{min(msgs)}-{max(msgs)}", *["-"] * (len(HEADER) - 4), str(len(results))]
    diffs = [r.prompt - r.ours for r in ok]
    reads = sum(r.read for r in ok)
    cached = sum(r.engine_cached or 0 for r in ok)
    verified = sum(min(r.read, r.engine_cached or 0) for r in ok)
    per_msg = [(r.prompt - r.ours) / r.call.messages for r in ok]
    return [label, str(len(results)), f"{min(msgs)}-{max(msgs)}",
            *(str(v) for v in (min(diffs), pct(diffs, 0.5), pct(diffs, 0.9), max(diffs))),
            f"{sum(diffs) / len(diffs):.1f}", f"{sum(per_msg) / len(per_msg):.1f}",
            str(sum(r.scaled for r in ok)), str(sum(r.list_price for r in ok)),
            str(sum(bool(r.fallbacks) for r in ok)), str(sum(r.read + r.creation > r.prompt for r in ok)),
            str(sum(r.read > 0 for r in ok)), str(reads), str(cached),
            f"{100 * verified / reads:.1f}%" if reads else "-", str(len(results) - len(ok))]


HEADER = ["shape", "req", "msgs", "Δmin", "Δp50", "Δp90", "Δmax", "Δmean", "Δ/msg", "scaled", "list$", "idx-fb",
          "r+c>p", "reads", "read tok", "eng cached", "verified", "errors"]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                                   strict=True))))
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def engine_prompt(r: Result) -> tuple[int, int]:
    """(prompt, completion) as llama-server's /metrics counted them: evaluated + reused prompt tokens."""
    return r.engine.evaluated + r.engine.cached, r.engine.completion


def example(r: Result) -> str:
    c = r.call
    ratio = f"{r.ours_marked / r.prompt:.2f}" if r.prompt else "-"
    return (f"conv {c.conversation} turn {c.turn} ({c.api}, {c.messages} msgs): engine prompt {r.prompt}, ours "
            f"{r.ours} (to the last breakpoint {r.ours_marked}, {ratio}x the prompt), billed read {r.read} "
            f"+ creation {r.creation}")


def report(results: list[Result]) -> None:
    by_shape: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_shape[r.call.shape].append(r)
    rows = [HEADER, *(row_of(shape, rs) for shape, rs in by_shape.items()), row_of("TOTAL", results)]
    print(table(rows))
    print("\nΔ = engine prompt - our count of every block (the last chain block's cumulative tokens); Δ/msg its "
          "mean per message.\nscaled / list$ = promptcache_billing_caps_total{action} deltas; idx-fb = requests "
          "with an index fallback (list price for another reason);\nr+c>p = bills with read + creation > prompt "
          "(ledger); reads = bills with a read; verified = Σ min(read, engine cached) / Σ read.")
    ok = [r for r in results if r.error is None]
    ledger_list = [r for r in ok if r.ours_marked and not r.read and not r.creation and not r.fallbacks]
    print(f"\nledger-derived list-price bills (a breakpoint >= minPrefixTokens, read + creation 0, no index "
          f"fallback): {len(ledger_list)}; the metric counted {sum(r.list_price for r in ok)}")
    reasons = Counter(reason for r in ok for reason in r.fallbacks)
    if reasons:
        print(f"index fallbacks by reason: {dict(reasons)}")
    for shape, rs in by_shape.items():
        good = [r for r in rs if r.error is None]
        listed = [r for r in good if r.list_price]
        scaled = [r for r in good if r.scaled]
        if listed or scaled:
            print(f"\n{shape}: {len(listed)} list price, {len(scaled)} scaled; e.g.")
            for r in listed[:3] + scaled[:2]:
                print(f"  {'list price' if r.list_price else 'scaled    '}  {example(r)}")
        unverified = [r for r in good if r.read > (r.engine_cached or 0)]
        if unverified:
            print(f"\n{shape}: {len(unverified)} bills read more than the engine reused; e.g.")
            for r in unverified[:2]:
                print(f"  {example(r)}, engine reused {r.engine_cached}")
        errors = [r for r in rs if r.error is not None]
        for r in errors[:3]:
            print(f"  error: conv {r.call.conversation} turn {r.call.turn}: {r.error}")

    spent = sum((r.engine for r in ok), EngineCounters(0, 0, 0, 0.0))
    print(f"\nengine work: {spent.evaluated} prompt tokens evaluated, {spent.cached} reused from its KV cache, "
          f"{spent.completion} generated, {spent.seconds:.0f} s of engine time "
          f"({spent.evaluated / max(spent.seconds, 1e-9):.0f} evaluated tokens/s)")
    print("\nusage the SDK returned against the engine's own counts, per request kind:")
    kinds = [["kind", "req", "sdk prompt = ledger", "sdk completion = ledger", "ledger = engine /metrics",
              "= timings", "sdk read+creation = ledger"]]
    for api in ("openai", "anthropic"):
        rs = [r for r in ok if r.call.api == api]
        if not rs:
            continue
        timed = [r for r in rs if r.timings is not None]
        kinds.append([api, str(len(rs)),
                      f"{sum(r.sdk[0] == r.prompt for r in rs)}/{len(rs)}",
                      f"{sum(r.sdk[1] == r.completion for r in rs)}/{len(rs)}",
                      f"{sum(engine_prompt(r) == (r.prompt, r.completion) for r in rs)}/{len(rs)}",
                      f"{sum(r.timings == (r.prompt, r.completion) for r in timed)}/{len(timed)}" if timed else "-",
                      f"{sum(r.sdk[2:] == (r.read, r.creation) for r in rs)}/{len(rs)}"])
    widths = [max(len(k[i]) for k in kinds) for i in range(len(kinds[0]))]
    for k in kinds:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(k, widths, strict=True))))
    wrong = [r for r in ok if engine_prompt(r) != (r.prompt, r.completion) or r.sdk[:2] != (r.prompt, r.completion)]
    for r in wrong[:3]:
        print(f"  mismatch: conv {r.call.conversation} turn {r.call.turn} ({r.call.api}): sdk {r.sdk[:2]}, ledger "
              f"{(r.prompt, r.completion)}, engine /metrics {engine_prompt(r)}, timings {r.timings}")


# -- set-up ------------------------------------------------------------------------------------------------


def config(engine: Engine, tools_engine: Engine) -> Body:
    def model(alias: str, api: Api, *, served: Engine = engine, **cache: Any) -> Body:
        return {"alias": alias,
                "upstream": {"url": served.url + "/v1" if api == "openai" else served.url, "model": "smollm2",
                             "api": api},
                "tokenizer": {"type": "gguf", "path": str(model_path())},
                "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
                "cache": {"minPrefixTokens": MIN_PREFIX, "enabledTtls": ["5m", "1h"], **cache}}
    auto: dict[str, Any] = {"automatic": {"mode": "lastUserMessage", "ttl": "5m"}}
    return {"models": [model("smol-openai", "openai"), model("smol-anthropic", "anthropic"),
                       model(TOOLS_MODEL, "openai", served=tools_engine),
                       model("smol-openai-auto", "openai", **auto), model("smol-anthropic-auto", "anthropic", **auto)]}


async def template_drops_tools(http: aiohttp.ClientSession, engine: Engine) -> bool:
    """Whether the model's chat template leaves tool definitions and tool calls out of the prompt."""
    body = {"tools": [{"type": "function", "function": {"name": "get_weather_probe", "description": "d",
                                                        "parameters": {"type": "object", "properties": {}}}}],
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                          "function": {"name": "lookup_probe", "arguments": "{\"q\": 1}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}
    async with http.post(f"{engine.url}/apply-template", json=body) as response:
        prompt = (await response.json())["prompt"]
    return "get_weather_probe" not in prompt and "lookup_probe" not in prompt


async def run(engine: Engine, tools_engine: Engine, args: argparse.Namespace) -> None:
    calls = corpus(args.seed, args.per_shape)
    rng = random.Random(args.seed + 1)
    print(f"corpus: {len(calls)} requests, {len({c.conversation for c in calls})} conversations, seed {args.seed}; "
          f"engine llama-server (SmolLM2-135M-Instruct, ctx {CONTEXT}, one slot) at {engine.url}")
    async with scratch_database("promptcache_bench") as dsn, redis_prefix(REDIS_URL, "enginebench") as prefix, \
            aiohttp.ClientSession() as http:
        await migrate(dsn)
        if await template_drops_tools(http, engine):
            print("note: the engine accepts tools and tool_calls, but SmolLM2's chat template leaves both out of "
                  "the prompt (tool results are kept): our count of those blocks is tokens the engine never sees, "
                  "so those bills go to list price; the same shape runs again on a second engine with "
                  f"{TOOLS_TEMPLATE.name} (tools rendered: {not await template_drops_tools(http, tools_engine)})")
        with tempfile.TemporaryDirectory(prefix="promptcache-enginebench-") as tmp:
            async with running_proxy(config(engine, tools_engine), Path(tmp), dsn, REDIS_URL,
                                     redis_prefix=prefix) as running:
                keys = {shape: await new_key(dsn, f"bench-{i}") for i, shape in
                        enumerate(dict.fromkeys(c.shape for c in calls))}
                version = running.server.proxy.runtimes.models["smol-openai"].tokenizer_version
                print(f"proxy in-process at {running.url}, tokenizer {version}, minPrefixTokens {MIN_PREFIX}\n")
                conn = await asyncpg.connect(dsn)
                results: list[Result] = []
                start = time.perf_counter()
                try:
                    clients: dict[str, Clients] = {
                        shape: Clients(openai.AsyncOpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0),
                                       anthropic.AsyncAnthropic(base_url=running.url, api_key=key, max_retries=0))
                        for shape, key in keys.items()}
                    for n, call in enumerate(calls, 1):
                        served = tools_engine if call.model == TOOLS_MODEL else engine
                        results.append(await measure(running, clients[call.shape], conn, http, served, call,
                                                     rng.randint(1, 4)))
                        if n % 50 == 0:
                            print(f"  {n}/{len(calls)} requests, {time.perf_counter() - start:.0f} s", flush=True)
                    for c in clients.values():
                        await c.openai.close()
                        await c.anthropic.close()
                finally:
                    await conn.close()
                elapsed = time.perf_counter() - start
    print(f"\n{len(results)} requests in {elapsed:.0f} s\n")
    report(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--per-shape", type=int, default=38, help="requests per shape (8 shapes)")
    args = parser.parse_args()
    start = time.perf_counter()
    with llama_server() as engine, llama_server(extra=["--chat-template-file", str(TOOLS_TEMPLATE)]) as tools_engine:
        asyncio.run(run(engine, tools_engine, args))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal runtime {time.perf_counter() - start:.0f} s (engine start included); load average now {load} "
          f"on {os.cpu_count()} cores (the engine's prefill rate falls sharply when other work shares them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

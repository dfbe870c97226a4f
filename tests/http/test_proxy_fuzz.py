"""The fuzz corpus of issue 13, items 1-7: about 5,000 seeded hostile requests, none of which may get a 5xx.

The drill that found items 1-7 sent ~5,000 fuzzed requests; this is that corpus, made reproducible. :func:`corpus`
builds it from one seed (:data:`SEED`) with :class:`random.Random`, class by class (each class has its own stream, so
changing one leaves the others as they were), and each test sends one class to a proxy of its own over raw sockets,
written byte for byte (:func:`wire`: credentials that are not UTF-8, methods and framings no HTTP client sends),
at most :data:`CONCURRENCY` at a time. For every request:

- the status is below 500, except 502/504 (or a stream that ends in an error event) for the requests that point
  at a simulated upstream fault on purpose (``Case.fault``, docs/design.md#settling-and-commit), never for input;
- where the documented rule fixes the answer, it is that answer (``Case.expect``, ``Case.message``);
- an error is in the calling API's JSON shape (docs/design.md#error-shapes) and carries ``x-request-id``; no body
  holds traceback text. The one exception is bytes that are not HTTP at all (the ``framing`` class): aiohttp's
  parser answers them with its plain-text 400 before any handler runs, and the proxy logs one WARNING line.

Then the ledger: every complete API 2xx has exactly one ledger row, billed to the right principal, with the totals
the client saw, and its request-log row; nothing else is billed; every forwarded upstream fault is logged with its
status and no cost. Last, the proxy still answers ``/healthz`` and ``/readyz`` and its log (the proxy's own JSON
formatter on the root logger, WARNING and above) holds no traceback and no ERROR record of the proxy or its HTTP
server (asyncio's reports of a driver's future nobody awaited are a warning, not a failure).

A failure names each case (``corpus()[n]``), its request bytes, the answer and the log lines of its request id.

Counts as in test_proxy_hostile: the word tokenizer, the simulated upstream (3 template tokens per message)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import logging
import random
import re
import socket
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

import asyncpg
import pytest

from promptcache.proxy.domain.blocks import Api
from promptcache.proxy.domain.nesting import MAX_DEPTH
from promptcache.proxy.http.server import JsonFormatter
from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_anthropic_error, assert_error, assert_openai_error
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

SEED = 13
CONCURRENCY = 16
ANSWER_TIMEOUT = 30.0
"""Seconds a request may take before it counts as unanswered (the slowest, the hanging upstream, takes 2)."""
LIMIT = 1024 * 1024
"""``limits.maxBodyBytes`` of every proxy here: bombs and oversized bodies are cheap to make at 1 MiB."""
UPSTREAM_TIMEOUT = 2.0
KEY = b"{{key}}"
"""Stands for the test's valid API key in a case's bytes (the key is made when the test runs)."""
KEY_TAB = b"{{key-with-a-tab}}"
"""The valid key with a tab after its third character."""
PRINCIPAL_HEADER = "x-promptcache-principal"
ENDPOINT = {"openai": b"/v1/chat/completions", "anthropic": b"/v1/messages"}
POST_ROUTES = {"openai": (b"/v1/chat/completions", b"/v1/responses"),
               "anthropic": (b"/v1/messages", b"/v1/messages/count_tokens")}
MODEL = {"openai": "chat", "anthropic": "claude"}
APIS: tuple[Api, Api] = ("openai", "anthropic")
TIERS = ("5m", "1h", "24h")
MINUTES = {"5m": 5, "1h": 60, "24h": 1440}
FAULTS = {"huge": "/huge", "error": "/error", "hang": "/hang", "drop": "/disconnect", "gone": ""}
"""Aliases ``chat-<fault>`` / ``claude-<fault>``: the simulator's misbehaving paths (proxy/testing/simulator.py) and
an address where nothing listens; besides, ``-cached`` (provider cache fields) and ``-plain`` (no tokenizer)."""
FAULT_STATUS = {"huge": 502, "error": 502, "hang": 504, "gone": 502}
"""A fault's status when the request is not streamed (docs/design.md#settling-and-commit); a stream of ``huge`` or
``drop`` is a 200 whose last event is an error."""
NO_USAGE = "the upstream model reported no usage"
STREAM_BROKEN = "the upstream stream ended before it completed"
TOO_DEEP = f"request body is nested more than {MAX_DEPTH} levels deep"
BAD_KEY = "invalid API key"
NO_KEY = "missing API key: send Authorization: Bearer <key> or x-api-key"
THROTTLED = "too many invalid API keys from this address"
BAD_PRINCIPAL = (f"trusted principal header {PRINCIPAL_HEADER}: a principal is printable text, not empty, without "
                 "leading or trailing spaces")
NO_PRINCIPAL = f"missing trusted principal header {PRINCIPAL_HEADER}"
NOT_OBJECT = "request body must be a JSON object"
NOT_JSON = "request body is not valid JSON"
SURROGATE = "request body contains an unpaired UTF-16 surrogate escape"
TOO_LARGE = f"request body is larger than the {LIMIT}-byte limit"
Mode = Literal["keys", "header"]


@dataclass(frozen=True)
class Case:
    """One request of the corpus and what the design says of its answer."""

    kind: str
    note: str
    api: Api
    """Whose error shape the answer must have (docs/design.md#endpoints)."""
    body: bytes = b""
    path: bytes = b"/v1/chat/completions"
    method: bytes = b"POST"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    framing: Literal["length", "chunked", "none"] = "length"
    expect: frozenset[int] = frozenset()
    """The statuses the design allows; empty: any below 500."""
    message: str | tuple[str, ...] | None = None
    """The start of the error message (one of them) the design or test_proxy_hostile fixes."""
    fault: str | None = None
    """The upstream fault this request triggers on purpose (a key of :data:`FAULTS`)."""
    principal: str | None = None
    """Header mode: the principal the ledger must name."""
    mode: Mode = "keys"
    raw: bytes | None = None
    """The whole request as written, for framings built by hand."""
    n: int = -1


# -- the wire ------------------------------------------------------------------------------------------------


def wire(case: Case, key: bytes) -> bytes:
    """The request's bytes, as written to the socket."""
    if case.raw is not None:
        return case.raw.replace(KEY, key)
    lines = [case.method + b" " + case.path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value.replace(KEY_TAB, key[:3] + b"\t" + key[3:]).replace(KEY, key)
              for name, value in case.headers]
    body = case.body
    if case.framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        pieces = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif case.framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float = 0.0
    failure: str | None = None
    """Why there is no proper answer (nothing came back, a timeout)."""

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    @property
    def streamed(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")


def parse_reply(raw: bytes) -> Reply:
    """Status, headers and body of one HTTP/1.1 answer read to EOF (interim 1xx answers skipped, chunks joined)."""
    while True:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            return Reply(0, {}, raw, failure=f"no complete answer: {raw[:200]!r}")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return Reply(0, {}, raw, failure=f"no status line: {raw[:200]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if 100 <= status < 200:
            raw = rest
            continue
        break
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = _dechunk(rest)
        if not complete:
            return Reply(status, headers, body, failure="the chunked body ended early")
        return Reply(status, headers, body)
    if "content-length" in headers:
        return Reply(status, headers, rest[:int(headers["content-length"])])
    return Reply(status, headers, rest)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    out = io.BytesIO()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return out.getvalue(), False
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return out.getvalue(), False
        if size == 0:
            return out.getvalue(), True
        out.write(data[:size])
        data = data[size + 2:]


async def send(url: str, data: bytes) -> Reply:
    """Write ``data`` on a new connection and read the answer to EOF (every request says Connection: close)."""
    host, _, port = url.removeprefix("http://").partition(":")
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError as exc:
        return Reply(0, {}, b"", failure=f"cannot connect: {exc!r}")
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # an early answer (413) may close before all is written
            await writer.drain()
        try:
            raw = await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT)
        except TimeoutError:
            return Reply(0, {}, b"", failure=f"no answer within {ANSWER_TIMEOUT:g} s")
        except ConnectionError as exc:
            return Reply(0, {}, b"", failure=f"connection failed: {exc!r}")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    reply = parse_reply(raw)
    reply.seconds = time.monotonic() - started
    return reply


# -- the corpus: valid requests to start from ------------------------------------------------------------------


VOCABULARY = ("alpha", "beta", "gamma", "delta", "cache", "prefix", "naïve", "zoë", "東京", "🙂", "Ωμέγα", "e\u0301",
              "\u202ertl", "zero\u200bwidth", "quote\"d", "back\\slash", "tab\there", "line\nbreak", "nul\u0000byte",
              "x" * 64)


def sentence(rng: random.Random, words: int | None = None) -> str:
    count = words if words is not None else rng.choice((1, 3, 12, 12, 30, 30, 200))
    return " ".join(rng.choice(VOCABULARY) + str(rng.randrange(1000)) for _ in range(count))


def text_part(rng: random.Random) -> dict[str, Any]:
    return {"type": "text", "text": sentence(rng)}


def tool(rng: random.Random, api: Api) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"q": {"type": "string", "description": sentence(rng, 5)}},
              "required": ["q"]}
    name = f"tool_{rng.randrange(100)}"
    if api == "openai":
        return {"type": "function", "function": {"name": name, "description": sentence(rng, 8), "parameters": schema}}
    return {"name": name, "description": sentence(rng, 8), "input_schema": schema}


@dataclass
class Built:
    """A valid request body, and the objects in it a marker may sit on, in block order."""

    api: Api
    body: dict[str, Any]
    sites: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    blocks: int
    last_is_site: bool


def build(rng: random.Random, api: Api, model: str | None = None, stream: bool | None = None) -> Built:
    """A valid request of ``api``: tools, a system prompt, a few turns of string or part content, tool calls."""
    body: dict[str, Any] = {"model": model or MODEL[api], "max_tokens": rng.choice((1, 8, 64))}
    sites: list[dict[str, Any]] = []
    order: list[bool] = []  # per block: whether it can carry a marker (a string content cannot)
    if rng.random() < 0.25:
        body["tools"] = [tool(rng, api) for _ in range(rng.randint(1, 3))]
        sites += body["tools"]
        order += [True] * len(body["tools"])
    if api == "anthropic" and rng.random() < 0.5:
        if rng.random() < 0.4:
            body["system"] = sentence(rng)
            order.append(False)
        else:
            body["system"] = [text_part(rng) for _ in range(rng.randint(1, 3))]
            sites += body["system"]
            order += [True] * len(body["system"])
    messages: list[dict[str, Any]] = []
    if api == "openai" and rng.random() < 0.3:
        messages.append({"role": "system", "content": sentence(rng)})
        order.append(False)
    turns = rng.choice((1, 1, 2, 3, 4))
    for turn in range(turns):
        role = "user" if (turns - 1 - turn) % 2 == 0 else "assistant"
        message: dict[str, Any] = {"role": role}
        if rng.random() < 0.4:
            message["content"] = sentence(rng)
            order.append(False)
        else:
            parts = [text_part(rng) for _ in range(rng.randint(1, 3))]
            if role == "user" and rng.random() < 0.15:
                parts.append({"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                          "data": "iVBORw0KGgo="}} if api == "anthropic" else
                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
            message["content"] = parts
            sites += parts
            order += [True] * len(parts)
        if api == "openai" and role == "assistant" and rng.random() < 0.3:
            message["tool_calls"] = [{"id": f"call_{rng.randrange(99)}", "type": "function",
                                      "function": {"name": "tool_1", "arguments": json.dumps({"q": sentence(rng, 2)})}}]
            sites += message["tool_calls"]
            order.append(True)
        messages.append(message)
    body["messages"] = messages
    streaming = rng.random() < 0.4 if stream is None else stream
    if streaming:
        body["stream"] = True
        if api == "openai" and rng.random() < 0.6:
            body["stream_options"] = {"include_usage": rng.random() < 0.7}
    elif rng.random() < 0.2:
        body["stream"] = False
    return Built(api, body, sites, messages, len(order), bool(order) and order[-1])


def with_valid_markers(rng: random.Random, built: Built) -> None:
    """Up to four markers whose TTLs never increase along the chain, and sometimes a top-level one that fits."""
    count = min(len(built.sites), rng.choice((0, 0, 1, 2, 3, 4)))
    chosen = sorted(rng.sample(range(len(built.sites)), count))
    tiers = sorted((rng.choice(TIERS) for _ in chosen), key=lambda t: -MINUTES[t])
    for index, tier in zip(chosen, tiers, strict=True):
        built.sites[index]["cache_control"] = {"type": "ephemeral"} if tier == "5m" and rng.random() < 0.5 else \
            {"type": "ephemeral", "ttl": tier}
    if built.blocks and rng.random() < 0.2:
        last = built.sites[-1].get("cache_control") if built.last_is_site else None
        if last is not None:
            built.body["cache_control"] = dict(last)
        elif count < 4:
            built.body["cache_control"] = {"type": "ephemeral", "ttl": tiers[-1] if tiers else rng.choice(TIERS)}


def valid(rng: random.Random, api: Api, model: str | None = None, stream: bool | None = None) -> Built:
    built = build(rng, api, model, stream)
    with_valid_markers(rng, built)
    return built


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def key_header(rng: random.Random) -> tuple[bytes, bytes]:
    return (b"x-api-key", KEY) if rng.random() < 0.5 else (b"Authorization", b"Bearer " + KEY)


def post(kind: str, note: str, api: Api, body: bytes, *, expect: Sequence[int] = (),
         message: str | tuple[str, ...] | None = None,
         headers: Sequence[tuple[bytes, bytes]] | None = None, extra: Sequence[tuple[bytes, bytes]] = (),
         rng: random.Random | None = None, **more: Any) -> Case:
    """A POST to the API's endpoint with the test's key (``headers`` replaces the credentials)."""
    if headers is None:
        headers = [key_header(rng or random.Random(note))]
    sent = (*headers, (b"content-type", b"application/json"), *extra)
    return Case(kind, note, api, body, ENDPOINT[api], headers=sent, expect=frozenset(expect), message=message,
                **more)


SLOT = "__slot__"


def with_literals(value: Any, literals: Sequence[str]) -> bytes:
    """``value`` as JSON with its ``__slot__0__``, ``__slot__1__``… strings replaced by raw JSON text (NaN, 1e400,
    10**5000, a depth no serialiser reaches, duplicate keys)."""
    text = json.dumps(value, ensure_ascii=False)
    for i, literal in enumerate(literals):
        text = text.replace(json.dumps(f"{SLOT}{i}__"), literal)
    return text.encode()


def slot(i: int = 0) -> str:
    return f"{SLOT}{i}__"


# -- the classes ----------------------------------------------------------------------------------------------


def baseline(rng: random.Random) -> Iterator[Case]:
    """Valid requests, both APIs, streaming and not, marked and not: each is a 200 and billed once."""
    for i in range(400):
        api = APIS[i % 2]
        built = valid(rng, api)
        yield post("baseline", f"a valid {api} request", api, dumps(built.body), expect=[200], rng=rng)


def credentials(rng: random.Random) -> Iterator[Case]:
    """Item 1: API keys that are not UTF-8, not ASCII, not printable, empty, very long, or almost the key."""
    unknown = [b"pc-" + bytes(rng.choice(b"abcdef0123456789") for _ in range(40)) for _ in range(4)]
    unknown_key = (BAD_KEY, THROTTLED)  # a key that could be one costs a lookup, and 20 in 10 s get 429s
    variants: list[tuple[str, list[tuple[bytes, bytes]], Sequence[int], str | tuple[str, ...] | None]] = []
    for value, note in [(b"caf\xe9", "latin-1 e-acute"), (b"\xff\xfe", "0xff 0xfe"), (b"pc-\x80abc", "a lone 0x80"),
                        (b"\xc3", "a cut two-byte sequence"), (b"\xed\xa0\x80", "a UTF-8 surrogate"),
                        (b"\xc0\xaf", "an overlong slash"), (b"\xf4\x90\x80\x80", "past U+10FFFF"),
                        (KEY + b"\xe9", "the key and 0xe9"), ("zoë".encode(), "UTF-8 non-ASCII"),
                        ("東京🙂".encode(), "UTF-8 CJK and emoji"), (b"pc-\xc2\xa0x", "a UTF-8 no-break space"),
                        (b"a\tb", "a tab inside"), (KEY_TAB, "a tab inside the key")]:
        variants.append((f"x-api-key: {note}", [(b"x-api-key", value)], [401], BAD_KEY))
        variants.append((f"Bearer: {note}", [(b"Authorization", b"Bearer " + value)], [401], BAD_KEY))
    for size in (100, 1000, 4000, 8000):
        long = bytes(rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_") for _ in range(size))
        variants.append((f"a {size}-byte ASCII key", [(b"x-api-key", long)], [401, 429], unknown_key))
        variants.append((f"a {size}-byte Bearer key", [(b"Authorization", b"Bearer " + long)], [401, 429], unknown_key))
        variants.append((f"a {size}-byte key of 0xe9", [(b"x-api-key", b"\xe9" * size)], [401], BAD_KEY))
    variants.append(("a 7000-byte key of UTF-8 'é'", [(b"x-api-key", "é".encode() * 3500)], [401], BAD_KEY))
    for headers, note in [([], "no key at all"), ([(b"x-api-key", b"")], "an empty x-api-key"),
                          ([(b"x-api-key", b"   ")], "a blank x-api-key"),
                          ([(b"Authorization", b"")], "an empty Bearer"),
                          ([(b"Authorization", b"Bearer")], "Bearer and nothing"),
                          ([(b"Authorization", b"Bearer    ")], "Bearer and spaces"),
                          ([(b"Authorization", b"Basic " + KEY)], "Basic, not Bearer"),
                          ([(b"Authorization", KEY)], "the key without Bearer"),
                          ([(PRINCIPAL_HEADER.encode(), b"alice")], "only a principal header (keys mode)")]:
        variants.append((note, headers, [401], NO_KEY))
    for value in unknown:
        variants.append(("an unknown key", [(b"x-api-key", value)], [401, 429], unknown_key))
        variants.append(("an unknown Bearer key", [(b"Authorization", b"Bearer " + value)], [401, 429], unknown_key))
    variants.append(("an unknown x-api-key beside a valid Bearer",
                     [(b"x-api-key", unknown[0]), (b"Authorization", b"Bearer " + KEY)], [401, 429], unknown_key))
    for headers, note in [([(b"x-api-key", KEY)], "the key"), ([(b"Authorization", b"Bearer " + KEY)], "Bearer key"),
                          ([(b"Authorization", b"bearer " + KEY)], "lower-case bearer"),
                          ([(b"Authorization", b"BEARER   " + KEY + b"  ")], "BEARER, spaces around the key"),
                          ([(b"x-api-key", b" \t" + KEY + b" \t")], "the key between blanks"),
                          ([(b"x-api-key", b""), (b"Authorization", b"Bearer " + KEY)], "empty x-api-key, Bearer key"),
                          ([(b"x-api-key", KEY), (b"Authorization", b"Bearer caf\xe9")], "the key, a bad Bearer"),
                          ([(b"x-api-key", KEY), (PRINCIPAL_HEADER.encode(), b"\xff")], "the key, a bad principal")]:
        variants.append((f"valid: {note}", headers, [200], None))
    for i in range(450):
        note, headers, expect, message = variants[i % len(variants)]
        api = APIS[rng.randrange(2)]
        body = valid(rng, api).body
        yield post("credentials", note, api, dumps(body), headers=headers, expect=expect, message=message)


PRINCIPALS_VALID = ["alice", "zoë-東京", "team a/b:c@d", "🙂", "Ωμέγα", "e\u0301", "x" * 4000, "ü" * 3000,
                    "\u05e9\u05dc\u05d5\u05dd", "tenant#42", "  padded  "]
PRINCIPALS_INVALID: list[tuple[bytes, str]] = [
    (b"caf\xe9", BAD_PRINCIPAL), (b"\xff\xfe", BAD_PRINCIPAL), (b"ok\x80", BAD_PRINCIPAL),
    (b"\xed\xa0\x80", BAD_PRINCIPAL), (b"\xc0\xaf", BAD_PRINCIPAL), (b"tab\there", BAD_PRINCIPAL),
    ("zero\u200bwidth".encode(), BAD_PRINCIPAL), ("bidi\u202eover".encode(), BAD_PRINCIPAL),
    ("line\u2028sep".encode(), BAD_PRINCIPAL), ("nel\u0085x".encode(), BAD_PRINCIPAL),
    ("bom\ufeffx".encode(), BAD_PRINCIPAL), (b"\xe9" * 5000, BAD_PRINCIPAL), ("a\u00a0b".encode(), BAD_PRINCIPAL),
    (b"", NO_PRINCIPAL), (b"   ", NO_PRINCIPAL), (b"\t", NO_PRINCIPAL), ("\u00a0\u3000".encode(), NO_PRINCIPAL),
]


def principals(rng: random.Random) -> Iterator[Case]:
    """Item 4: header mode, principals that are not UTF-8, not printable, blank, or fine but unusual (each billed
    to itself), with bodies whose content is odd but valid, so that classification has work to fail at."""
    odd_parts: list[tuple[str, str]] = [("NaN", "a NaN in a part"), ("1e400", "1e400 in a part"),
                                        ("1" + "0" * 400, "a 401-digit integer in a part"),
                                        ('"nul\\u0000"', "an escaped NUL in a part"), ("-0.0", "minus zero"),
                                        ("[" * 100 + "]" * 100, "100 levels in a part")]
    for i in range(450):
        api = APIS[rng.randrange(2)]
        built = valid(rng, api)
        literals: list[str] = []
        note = ""
        if rng.random() < 0.5 and built.sites:
            literal, note = rng.choice(odd_parts)
            rng.choice(built.sites)["odd"] = slot()
            literals.append(literal)
        body = with_literals(built.body, literals)
        if i % 3 == 2:
            value, message = PRINCIPALS_INVALID[rng.randrange(len(PRINCIPALS_INVALID))]
            yield post("principals", f"principal {value[:40]!r} {note}".strip(), api, body,
                       headers=[(PRINCIPAL_HEADER.encode(), value)], expect=[401], message=message, mode="header")
        else:
            name = rng.choice(PRINCIPALS_VALID) + (f"-{i}" if rng.random() < 0.5 else "")
            yield post("principals", f"principal {name[:40]!r} {note}".strip(), api, body,
                       headers=[(PRINCIPAL_HEADER.encode(), name.encode())], expect=[200], mode="header",
                       principal=name.strip())


@dataclass(frozen=True)
class Marker:
    """A ``cache_control`` value: what Python makes of it (for the oracle) and its JSON text (for the body)."""

    value: Any
    text: str


def marker(value: Any, text: str | None = None) -> Marker:
    return Marker(value, json.dumps(value) if text is None else text)


DEEP_TEXT = "[" * 40 + "1" + "]" * 40
MARKERS_VALID = [marker({"type": "ephemeral"}), marker({"type": "ephemeral", "ttl": "5m"}),
                 marker({"type": "ephemeral", "ttl": "1h"}), marker({"type": "ephemeral", "ttl": "24h"}),
                 marker({"ttl": "1h", "type": "ephemeral"}), marker(None),
                 marker({"type": "ephemeral", "ttl": "5m"}, '{"type":"ephemeral","ttl":1,"ttl":"5m"}')]
MARKERS_INVALID = [
    marker("ephemeral"), marker(1), marker(1.5), marker(True), marker(False), marker([]), marker({}),
    marker([{"type": "ephemeral"}]), marker(float("nan"), "NaN"), marker(float("inf"), "1e400"),
    marker(10**400, "1" + "0" * 400), marker("x" * 5000), marker([], DEEP_TEXT),
    marker({"type": None}), marker({"type": 1}), marker({"type": True}), marker({"type": []}),
    marker({"type": {}}), marker({"type": "EPHEMERAL"}), marker({"type": ""}), marker({"type": "persistent"}),
    marker({"type": "ephemeral\u0000"}), marker({"type": "ephemeral "}), marker({"type": "é" * 3000}),
    marker({"type": float("nan")}, '{"type":NaN}'), marker({"type": []}, '{"type":' + DEEP_TEXT + "}"),
    marker({"type": "ephemeral", "ttl": 300}), marker({"type": "ephemeral", "ttl": 5}),
    marker({"type": "ephemeral", "ttl": 5.0}), marker({"type": "ephemeral", "ttl": "5M"}),
    marker({"type": "ephemeral", "ttl": "5 m"}), marker({"type": "ephemeral", "ttl": ""}),
    marker({"type": "ephemeral", "ttl": "1d"}), marker({"type": "ephemeral", "ttl": None}),
    marker({"type": "ephemeral", "ttl": []}), marker({"type": "ephemeral", "ttl": {}}),
    marker({"type": "ephemeral", "ttl": True}), marker({"type": "ephemeral", "ttl": "5m\u0000"}),
    marker({"type": "ephemeral", "ttl": "\uff15m"}), marker({"type": "ephemeral", "ttl": ["5m"]}),
    marker({"type": "ephemeral", "ttl": float("inf")}, '{"type":"ephemeral","ttl":Infinity}'),
    marker({"type": "ephemeral", "ttl": 10**400}, '{"type":"ephemeral","ttl":1' + "0" * 400 + "}"),
    marker({"type": "ephemeral", "ttl": []}, '{"type":"ephemeral","ttl":' + DEEP_TEXT + "}"),
    marker({"type": "ephemeral", "ttl": "5m", "scope": "global"}), marker({"type": "ephemeral", "x": {}}),
    marker({"type": 1}, '{"type":"ephemeral","type":1}'), marker({"ttl": "5m"}),
]
INVALID = object()


def tier_of(value: Any) -> Any:
    """docs/design.md#marker-objects and #rejections: None for no marker, the tier, or :data:`INVALID`."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") != "ephemeral" or set(value) - {"type", "ttl"}:
        return INVALID
    ttl = value.get("ttl", "5m")
    return ttl if isinstance(ttl, str) and ttl in TIERS else INVALID


def markers_accepted(built: Built, placed: dict[int, Any], on_message: bool, top: Any) -> bool:
    """The rejection rules (docs/design.md#rejections) on explicit markers at site indexes ``placed``, a marker on
    a whole message, and the top-level one (``...`` for none)."""
    if on_message:
        return False
    tiers: dict[int, str] = {}
    for index, value in placed.items():
        tier = tier_of(value)
        if tier is INVALID:
            return False
        if tier is not None:
            tiers[index] = tier
    if len(tiers) > 4:
        return False
    chain = [tiers[i] for i in sorted(tiers)]
    if top is not ...:
        top_tier = tier_of(top)
        if top_tier is INVALID:
            return False
        if top_tier is not None:
            last = tiers.get(len(built.sites) - 1) if built.last_is_site else None
            if built.blocks == 0 or (last is not None and last != top_tier) or (last is None and len(tiers) >= 4):
                return False
            if last is None:
                chain.append(top_tier)
    return all(MINUTES[later] <= MINUTES[earlier] for earlier, later in itertools.pairwise(chain))


def pick_marker(rng: random.Random) -> Marker:
    return rng.choice(MARKERS_VALID if rng.random() < 0.55 else MARKERS_INVALID)


def put_marker(holder: dict[str, Any], choice: Marker, literals: list[str]) -> None:
    holder["cache_control"] = slot(len(literals))
    literals.append(choice.text)


def markers(rng: random.Random) -> Iterator[Case]:
    """Item 2's first half: ``cache_control`` and its ``type``/``ttl`` of every wrong type, on every block that takes
    one (tools, system parts, content parts, tool calls), on a whole message, at the top level, too many, out of
    TTL order, and in places that are not markers at all (metadata, a part's extra field, a tool's schema)."""
    for i in range(700):
        api = APIS[i % 2]
        built = build(rng, api)
        placed: dict[int, Any] = {}
        literals: list[str] = []
        notes: list[str] = []
        if built.sites:
            for index in sorted(rng.sample(range(len(built.sites)), min(len(built.sites), rng.choice((1, 1, 2, 5))))):
                choice = pick_marker(rng)
                put_marker(built.sites[index], choice, literals)
                placed[index] = choice.value
                notes.append(f"site {index}: {choice.text[:60]}")
        on_message = False
        if rng.random() < 0.08:
            choice = pick_marker(rng)
            put_marker(rng.choice(built.messages), choice, literals)
            on_message = choice.value is not None
            notes.append(f"message: {choice.text[:60]}")
        top: Any = ...
        if rng.random() < 0.25:
            choice = pick_marker(rng)
            put_marker(built.body, choice, literals)
            top = choice.value
            notes.append(f"top level: {choice.text[:60]}")
        if rng.random() < 0.2:
            where = rng.choice(("metadata", "part extra", "tool schema"))
            choice = rng.choice(MARKERS_INVALID)
            if where == "metadata":
                built.body["metadata"] = {"cache_control": slot(len(literals))}
            elif where == "part extra" and built.sites:
                rng.choice(built.sites)["extra"] = {"cache_control": slot(len(literals))}
            else:
                built.body.setdefault("tools", []).append(tool(rng, api))
                holder = built.body["tools"][-1]
                schema = holder["function"]["parameters"] if api == "openai" else holder["input_schema"]
                schema["properties"]["cache_control"] = slot(len(literals))
                built.sites.insert(len(built.body["tools"]) - 1, holder)  # a block the oracle must count
                built.blocks += 1
                placed = {(k + 1 if k >= len(built.body["tools"]) - 1 else k): v for k, v in placed.items()}
            literals.append(choice.text)
            notes.append(f"not a marker ({where}): {choice.text[:60]}")
        accepted = markers_accepted(built, placed, on_message, top)
        yield post("markers", "; ".join(notes) or "no marker", api, with_literals(built.body, literals),
                   expect=[200] if accepted else [400], rng=rng)


def deep(depth: int, style: str) -> str:
    """``depth`` containers inside one another around ``1``: arrays, objects, or the two in turn."""
    if style == "arrays":
        return "[" * depth + "1" + "]" * depth
    if style == "objects":
        return '{"a":' * depth + "1" + "}" * depth
    opening = "".join("[" if i % 2 else '{"a":' for i in range(depth))
    closing = "".join("]" if i % 2 else "}" for i in reversed(range(depth)))
    return opening + "1" + closing


def containers_above(value: Any, target: str) -> int | None:
    """How many objects and arrays enclose the string ``target`` in ``value`` (the outermost counted)."""
    if value == target:
        return 0
    children: Sequence[Any] = list(value.values()) if isinstance(value, dict) else value \
        if isinstance(value, list) else []
    for child in children:
        below = containers_above(child, target)
        if below is not None:
            return below + 1
    return None


NEST_PLACES = ("metadata", "part extra", "tool schema", "system part extra", "message extra", "top-level extra",
               "part text", "tool call arguments", "cache_control", "cache_control.ttl", "cache_control.type",
               "stop")
MARKER_PLACES = ("cache_control", "cache_control.ttl", "cache_control.type")


def nesting(rng: random.Random) -> Iterator[Case]:
    """Item 2's second half: documents nested below, at and above the one limit (128), to 100,000 levels, in
    metadata, part fields, tool schemas, system parts, markers and elsewhere."""
    depths = [MAX_DEPTH - 20, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 1,
              MAX_DEPTH + 2, 200, 980, 990, 1025, 5000]
    for i in range(500):
        api = APIS[i % 2]
        built = build(rng, api)
        place = rng.choice(NEST_PLACES)
        part: dict[str, Any] = {"type": "text", "text": sentence(rng, 3)}
        if place == "metadata":
            built.body["metadata"] = {"user_id": slot()}
        elif place == "part extra":
            part["extra"] = slot()
        elif place == "tool schema":
            built.body.setdefault("tools", []).append(tool(rng, api))
            holder = built.body["tools"][-1]
            schema = holder["function"]["parameters"] if api == "openai" else holder["input_schema"]
            schema["properties"]["deep"] = {"type": "object", "default": slot()}
        elif place == "system part extra" and api == "anthropic":
            built.body["system"] = [{"type": "text", "text": sentence(rng, 3), "extra": slot()}]
        elif place == "system part extra":
            built.messages.insert(0, {"role": "system", "content": [{"type": "text", "text": "s", "x": slot()}]})
        elif place == "message extra":
            built.messages[-1]["name_of"] = slot()
        elif place == "top-level extra":
            built.body["extra_body"] = slot()
        elif place == "part text":
            part["text"] = slot()
        elif place == "tool call arguments" and api == "openai":
            built.messages.insert(0, {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": slot()}}]})
        elif place == "tool call arguments":
            built.messages.insert(0, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "f", "input": {"q": slot()}}]})
        elif place == "cache_control":
            part["cache_control"] = slot()
        elif place == "cache_control.ttl":
            part["cache_control"] = {"type": "ephemeral", "ttl": slot()}
        elif place == "cache_control.type":
            part["cache_control"] = {"type": slot(), "ttl": "5m"}
        else:
            built.body["stop"] = slot()
        last = built.messages[-1]
        if last["role"] != "user" or isinstance(last.get("content"), str) or "content" not in last:
            built.messages.append({"role": "user", "content": [part]})
        else:
            last["content"].append(part)
        above = containers_above(built.body, slot())
        assert above is not None, place
        total = (20_000, 100_000)[i % 2] if i < 8 else rng.choice(depths)  # a few huge ones: 100-600 KB each
        style = rng.choice(("arrays", "objects", "mixed"))
        body = with_literals(built.body, [deep(max(total - above, 1), style)])
        note = f"{total} levels ({style}) at {place}"
        if above + max(total - above, 1) > MAX_DEPTH:
            yield post("nesting", note, api, body, expect=[400], message=TOO_DEEP, rng=rng)
        else:
            yield post("nesting", note, api, body, expect=[400] if place in MARKER_PLACES else [200], rng=rng)


def gz(data: bytes, level: int = 9) -> bytes:
    """gzip without a timestamp, so the corpus is the same bytes each run."""
    return gzip.compress(data, level, mtime=0)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@cache
def bombs() -> dict[str, bytes]:
    """Small bodies that inflate past the limit (and one that inflates to exactly it)."""
    exact = b'{"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
    exact += b" " * (LIMIT - len(exact))
    return {"gzip 1 MiB + 1": gz(b" " * (LIMIT + 1)), "gzip 64 MiB": gz(b"\0" * (64 << 20), 1),
            "deflate 8 MiB": zlib.compress(b"{" * (8 << 20)), "raw deflate 8 MiB": _raw_deflate(b"a" * (8 << 20)),
            "gzip of a gzip bomb": gz(gz(b" " * (16 << 20))),
            "exact": gz(exact)}


def encoding(rng: random.Random) -> Iterator[Case]:
    """Item 3: bodies whose Content-Encoding is right, stacked, wrong, undecodable, truncated, unknown, or a bomb."""
    b = bombs()
    for i in range(550):
        api = APIS[i % 2]
        raw = dumps(valid(rng, api).body)
        choice = i % 22
        decoded_ok: list[tuple[str, bytes]] = [
            ("gzip", gz(raw)), ("x-gzip", gz(raw)), ("deflate", zlib.compress(raw)),
            ("deflate", _raw_deflate(raw)), ("GZIP", gz(raw)), (" gzip ", gz(raw)),
            ("identity", raw), ("identity, gzip", gz(raw)), ("gzip, deflate", zlib.compress(
                gz(raw))), ("gzip,gzip", gz(gz(raw))), ("", raw), (",", raw)]
        bad: list[tuple[str, bytes, str]] = [
            ("gzip", raw, "request body is not valid gzip data"),
            ("deflate", raw, "request body is not valid deflate data"),
            ("gzip", gz(raw)[:rng.randrange(1, len(gz(raw)) - 1)],
             "request body is not valid gzip data"),
            ("deflate", zlib.compress(raw)[:-3], "request body is not valid deflate data"),
            ("gzip", gz(raw) + b"trailing", "request body is not valid gzip data"),
            ("gzip", zlib.compress(raw), "request body is not valid gzip data"),
            ("deflate", gz(raw), "request body is not valid deflate data"),
            ("gzip", b"\x1f\x8b\x08" + bytes(rng.randrange(256) for _ in range(30)),
             "request body is not valid gzip data"),
            ("gzip", b"", "request body is not valid gzip data"),
            ("gzip, gzip", gz(raw), "request body is not valid gzip data"),
            ("deflate", bytes(rng.randrange(256) for _ in range(200)), "request body is not valid deflate data"),
        ]
        unknown = ["br", "zstd", "compress", "x-compress", "*", "gzip;q=1.0", "chunked", "snappy", "aes128gcm",
                   "identity, br", "gzip, zstd", "b\xe9r", "é" * 100]
        if choice < 6:
            coding, data = decoded_ok[rng.randrange(len(decoded_ok))]
            yield post("encoding", f"Content-Encoding {coding!r}, encoded so", api, data, expect=[200],
                       extra=[(b"content-encoding", coding.encode("latin-1"))], rng=rng)
        elif choice < 13:
            coding, data, message = bad[rng.randrange(len(bad))]
            yield post("encoding", f"Content-Encoding {coding!r}, {len(data)} bytes that are not so", api, data,
                       expect=[400], message=message, extra=[(b"content-encoding", coding.encode())], rng=rng)
        elif choice < 17:
            coding = rng.choice(unknown)
            data = rng.choice((raw, gz(raw), b"\x0b\x02\x80hi\x03", b"\x28\xb5\x2f\xfd" + raw))
            yield post("encoding", f"Content-Encoding {coding!r} (not taken)", api, data, expect=[400],
                       message="Content-Encoding ", extra=[(b"content-encoding", coding.encode("utf-8"))], rng=rng)
        elif choice < 20:
            name = rng.choice([n for n in b if n != "exact"])
            coding = {"gzip of a gzip bomb": "gzip, gzip"}.get(name, name.split()[0].replace("raw", "deflate"))
            yield post("encoding", f"a bomb: {name}, {len(b[name])} bytes as {coding!r}", api, b[name],
                       expect=[413], message=TOO_LARGE, extra=[(b"content-encoding", coding.encode())], rng=rng)
        elif choice == 20:
            if api == "openai":
                yield post("encoding", "gzip inflating to exactly the limit", api, b["exact"], expect=[200],
                           extra=[(b"content-encoding", b"gzip")], rng=rng)
            else:
                yield post("encoding", "a body of exactly the limit", "openai", b'{"model":"chat","messages":[]}' +
                           b" " * (LIMIT - 30), expect=[200], rng=rng)
        else:
            yield post("encoding", "a body one byte over the limit", api, raw + b" " * (LIMIT + 1 - len(raw)),
                       expect=[413], message=TOO_LARGE, rng=rng)


def json_bodies(rng: random.Random) -> Iterator[Case]:
    """Invalid JSON and bad UTF-8: truncations, mutations, raw bytes that are not UTF-8, lone surrogate escapes,
    other encodings, comments, literals no JSON has."""
    fixed: list[tuple[str, bytes, Sequence[int], str | None]] = [
        ("an empty body", b"", [400], NOT_JSON), ("whitespace", b" \n\t ", [400], NOT_JSON),
        ("null", b"null", [400], NOT_OBJECT), ("a BOM and an object", b"\xef\xbb\xbf{}", [400], None),
        ("single quotes", b"{'model': 'chat'}", [400], NOT_JSON), ("a comment", b'{"model": "chat" /* x */}', [400],
                                                                     NOT_JSON),
        ("a trailing comma", b'{"model": "chat", "messages": [],}', [400], NOT_JSON),
        ("an unquoted key", b'{model: "chat"}', [400], NOT_JSON), ("two objects", b"{}{}", [400], NOT_JSON),
        ("undefined", b'{"model": undefined}', [400], NOT_JSON), ("NaN as the body", b"NaN", [400], NOT_OBJECT),
        ("a lone surrogate key", b'{"\\ud800": 1, "model": "chat", "messages": []}', [400], SURROGATE),
        ("a 5,000-digit integer", b'{"model": "chat", "messages": [], "n": 1' + b"0" * 5000 + b"}", [400], NOT_JSON),
        ("a 4,300-digit integer", b'{"model": "chat", "messages": [], "n": 1' + b"0" * 4299 + b"}", [200], None),
        ("only an open brace", b"{", [400], NOT_JSON), ("a NUL byte after the object", b'{"model":"chat"}\x00', [400],
                                                          NOT_JSON),
    ]
    bad_utf8 = [b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf", b"\xc1\xbf",
                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xbf\xbf"]
    surrogates = ["\\ud800", "\\udfff", "\\ud800\\u0041", "\\udbff", "x\\udc00y"]
    for i in range(550):
        api = APIS[i % 2]
        built = valid(rng, api)
        raw = dumps(built.body)
        choice = i % 11
        if choice == 0:
            note, body, expect, message = fixed[rng.randrange(len(fixed))]
            yield post("json", note, "openai", body, expect=expect, message=message, rng=rng)
        elif choice == 1:
            cut = rng.randrange(1, len(raw) - 1)
            yield post("json", f"cut at byte {cut} of {len(raw)}", api, raw[:cut], expect=[400], rng=rng)
        elif choice in (2, 3):
            mutated = bytearray(raw)
            for _ in range(rng.choice((1, 1, 3, 10))):
                at = rng.randrange(len(mutated))
                action = rng.randrange(3)
                if action == 0:
                    mutated[at] = rng.randrange(256)
                elif action == 1:
                    del mutated[at]
                else:
                    mutated.insert(at, rng.choice(b'{}[]",:\\0eE.-+ \x00\xff'))
            yield post("json", "bytes flipped, dropped or inserted", api, bytes(mutated), rng=rng)
        elif choice in (4, 5):
            junk = rng.choice(bad_utf8)
            target = rng.choice(built.sites) if built.sites and rng.random() < 0.7 else None
            if target is not None:
                target["text"] = slot()
                text = json.dumps(built.body, ensure_ascii=False).encode()
                body = text.replace(json.dumps(slot()).encode(), b'"bad ' + junk + b' bytes"')
                note = f"the raw bytes {junk!r} in a text part"
            else:
                body = raw.replace(b'"model"', b'"mo' + junk + b'del"', 1) if rng.random() < 0.5 else \
                    raw.replace(b'"role"', b'"role' + junk + b'"', 1)
                note = f"the raw bytes {junk!r} in a key"
            # Surrogates written as UTF-8 bytes are not UTF-8 (RFC 3629): bodies are decoded strictly.
            yield post("json", note, api, body, expect=[400], message=NOT_JSON, rng=rng)
        elif choice == 6:
            escape = rng.choice(surrogates)
            place = rng.choice(("text", "metadata", "role", "model"))
            if place == "text" and built.sites:
                rng.choice(built.sites)["text"] = slot()
            elif place == "metadata" or not built.sites:
                built.body["metadata"] = {"user_id": slot()}
            elif place == "role":
                built.messages[-1]["role"] = slot()
            else:
                built.body["model"] = slot()
            yield post("json", f"the escape {escape} in {place}", api, with_literals(built.body, [f'"{escape}"']),
                       expect=[400], message=SURROGATE, rng=rng)
        elif choice == 7:
            rng.choice(built.sites or [built.body])["text"] = slot()
            yield post("json", "a paired surrogate escape (an emoji)", api,
                       with_literals(built.body, ['"\\ud83d\\ude00"']), expect=[200], rng=rng)
        elif choice == 8:
            codec = rng.choice(("utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig"))
            surrogate = codec.startswith("utf-16") and rng.random() < 0.7
            if surrogate:  # a lone surrogate escape, where a check for the bytes \u cannot see it
                rng.choice(built.sites or [built.body])["text"] = slot()
            document = with_literals(built.body, ['"\\udc00"'] if surrogate else []).decode()
            encoded = document.encode(codec, errors="replace")
            # Bodies are UTF-8 (RFC 8259 §8.1): UTF-16/32 and a BOM are refused; latin-1 or cp1252 of ASCII text
            # is UTF-8 and parses, of other text it is not.
            utf8 = True
            try:
                encoded.decode("utf-8")
            except UnicodeDecodeError:
                utf8 = False
            ok = utf8 and not surrogate and codec != "utf-8-sig"
            yield post("json", f"the body in {codec}" + (", with the escape \\udc00" if surrogate else ""), api,
                       encoded, expect=[200, 400] if ok else [400], message=None if ok else NOT_JSON, rng=rng)
        elif choice == 9:
            words = rng.choice((2_000, 2_000, 20_000, 100_000))  # the last two: 100 KB and 500 KB
            built.body["messages"][-1]["content"] = "long " * words
            yield post("json", f"a text of {words:,} words", api, dumps(built.body), expect=[200], rng=rng)
        else:
            twice = raw.replace(b'"model"', b'"model": "nope", "model"', 1)
            yield post("json", "a duplicate key (the last wins)", api, twice, expect=[200], rng=rng)


NUMBERS = ["1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "1.5",
           "-1", "0", "-0.0", "9223372036854775808", "18446744073709551616", "2147483648", "5e-324",
           "1.7976931348623157e308", "123456789012345678901234567890.5", '"8"', "true", "null", "[]", "{}"]


def numbers(rng: random.Random) -> Iterator[Case]:
    """Huge and odd numbers: max_tokens 10**400, floats, NaN and Infinity literals, in the fields the proxy passes
    on (200), in parts it hashes (200) and in the fields it reads (400)."""
    passed = {"openai": ["max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "logprobs",
                         "max_completion_tokens"],
              "anthropic": ["max_tokens", "temperature", "top_p", "top_k"]}
    for i in range(400):
        api = APIS[i % 2]
        built = valid(rng, api)
        literal = rng.choice(NUMBERS)
        where = rng.choice(("passed", "passed", "part", "metadata", "tool schema", "read", "stream_options"))
        expect: list[int] = [200]
        if where == "passed":
            name = rng.choice(passed[api])
            built.body[name] = slot()
        elif where == "part" and built.sites:
            name = rng.choice(("text", "odd"))
            rng.choice(built.sites)[name] = slot()
        elif where == "tool schema":
            built.body.setdefault("tools", []).append(tool(rng, api))
            holder = built.body["tools"][-1]
            schema = holder["function"]["parameters"] if api == "openai" else holder["input_schema"]
            name = "maximum"
            schema["properties"]["q"]["maximum"] = slot()
        elif where == "read":
            name = rng.choice(("model", "stream", "messages"))
            built.body[name] = slot()
            fine = {"model": ('"8"', [404]), "stream": ("true", [200]), "messages": ("[]", [200])}[name]
            expect = fine[1] if literal == fine[0] else [400]
        elif where == "stream_options" and api == "openai" and built.body.get("stream") is True:
            name = "stream_options"
            built.body[name] = slot() if rng.random() < 0.5 else {"include_usage": slot()}
            if isinstance(built.body[name], str) and literal not in ("null", "{}"):
                expect = [400]
        else:
            name = "metadata"
            built.body["metadata"] = {"user_id": slot()}
        yield post("numbers", f"{literal[:40]} in {where} ({name})", api, with_literals(built.body, [literal]),
                   expect=expect, rng=rng)


def shapes(rng: random.Random) -> Iterator[Case]:
    """Wrong top-level types and structures (docs/design.md#block-order: malformed structure is a 400 before
    anything is forwarded); unknown models and models of the other API."""
    bodies: list[tuple[str, str, Sequence[int], str | None]] = [
        ("an array body", "[]", [400], NOT_OBJECT), ("an array of the body", "[BODY]", [400], NOT_OBJECT),
        ("a string body", '"hi"', [400], NOT_OBJECT), ("a number body", "1e400", [400], NOT_OBJECT),
        ("true", "true", [400], NOT_OBJECT), ("false", "false", [400], NOT_OBJECT), ("-0", "-0", [400], NOT_OBJECT),
    ]
    fields: list[tuple[str, Any, Sequence[int], str | None]] = [
        ("model", ..., [400], "model must be a non-empty string"), ("model", None, [400], None),
        ("model", 1, [400], None), ("model", [], [400], None), ("model", {}, [400], None), ("model", "", [400], None),
        ("model", True, [400], None), ("model", "nope", [404], "model 'nope' does not exist"),
        ("model", "chat ", [404], None), ("model", "CHAT", [404], None), ("model", "m" * 100_000, [404], None),
        ("model", "chat\u0000", [404], None), ("model", "東京", [404], None), ("model", "OTHER", [400], None),
        ("messages", ..., [400], "messages must be an array"), ("messages", None, [400], None),
        ("messages", {}, [400], None), ("messages", "hi", [400], None), ("messages", 1, [400], None),
        ("messages", [], [200], None), ("messages", [None], [400], "messages[0] must be an object"),
        ("messages", [1], [400], None), ("messages", ["hi"], [400], None), ("messages", [[]], [400], None),
        ("messages", [{}], [400], None), ("messages", [{"role": 1, "content": "x"}], [400], None),
        ("messages", [{"role": "", "content": "x"}], [400], None),
        ("messages", [{"role": "us\u0000er", "content": "x"}], [400], None),
        ("messages", [{"role": ["user"], "content": "x"}], [400], None),
        ("messages", [{"role": "🤖", "content": "x"}], [200], None),
        ("messages", [{"role": "user", "content": 1}], [400], None),
        ("messages", [{"role": "user", "content": {}}], [400], None),
        ("messages", [{"role": "user", "content": True}], [400], None),
        ("messages", [{"role": "user", "content": []}], [200], None),
        ("messages", [{"role": "user", "content": [1]}], [400], None),
        ("messages", [{"role": "user", "content": [None]}], [400], None),
        ("messages", [{"role": "user", "content": ["hi"]}], [400], None),
        ("messages", [{"role": "user", "content": [[]]}], [400], None),
        ("messages", [{"role": "user", "content": [{}]}], [200], None),
        ("messages", [{"role": "user", "content": [{"type": 1}]}], [200], None),
        ("messages", [{"role": "user", "content": [{"type": ["image"]}]}], [200], None),
        ("messages", [{"role": "user", "content": [{"type": "text", "text": None}]}], [200], None),
        ("messages", [{"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}}], [400], None),
        ("tools", {}, [400], "tools must be an array"), ("tools", "x", [400], None), ("tools", [1], [400], None),
        ("tools", [{}], [200], None), ("tools", None, [200], None), ("tools", [[]], [400], None),
        ("stream", "true", [400], "stream must be true or false"), ("stream", 1, [400], None),
        ("stream", None, [400], None), ("stream", [], [400], None), ("metadata", "x", [200], None),
        ("metadata", [1, {}], [200], None), ("cache_control", [], [400], None),
    ]
    per_api: dict[Api, list[tuple[str, Any, Sequence[int], str | None]]] = {
        "openai": [("messages", [{"role": "user", "content": None}], [200], None),
                   ("messages", [{"role": "assistant", "content": None, "tool_calls": {}}], [400], None),
                   ("messages", [{"role": "assistant", "content": None, "tool_calls": [1]}], [400], None),
                   ("messages", [{"role": "assistant", "content": None, "tool_calls": None}], [200], None),
                   ("messages", [{"role": "assistant", "content": None, "tool_calls": [{}]}], [200], None),
                   ("stream_options", "x", [400], "stream_options must be an object"),
                   ("stream_options", [], [400], None), ("stream_options", None, [200], None),
                   ("stream_options", {}, [200], None), ("stream_options", {"include_usage": "yes"}, [200], None)],
        "anthropic": [("messages", [{"role": "user", "content": None}], [400], None),
                      ("system", 1, [400], None), ("system", {}, [400], None), ("system", [1], [400], None),
                      ("system", [], [200], None), ("system", None, [200], None), ("system", "", [200], None),
                      ("system", [{"type": "text", "text": 5}], [200], None), ("system", ["x"], [400], None)],
    }
    for i in range(450):
        api = APIS[i % 2]
        built = valid(rng, api, stream=rng.random() < 0.3)
        if i % 10 == 0:
            note, template, expect, message = bodies[rng.randrange(len(bodies))]
            yield post("shapes", note, api, template.replace("BODY", dumps(built.body).decode()).encode(),
                       expect=expect, message=message, rng=rng)
            continue
        name, value, expect, message = rng.choice(fields + per_api[api])
        built.body.pop("cache_control", None)
        if value is ...:
            built.body.pop(name, None)
        elif name == "model" and value == "OTHER":
            built.body["model"] = MODEL["anthropic" if api == "openai" else "openai"]
        else:
            built.body[name] = value
        yield post("shapes", f"{name}: {json.dumps(value) if value is not ... else 'missing'}"[:120], api,
                   dumps(built.body), expect=expect, message=message, rng=rng)


def shape_of(path: bytes, headers: Sequence[tuple[bytes, bytes]]) -> Api:
    """docs/design.md#endpoints: Anthropic's shape for /v1/messages… or an anthropic-version header."""
    target = path.split(b"?")[0].split(b"#")[0]
    if target.startswith(b"http://"):
        target = b"/" + target.split(b"/", 3)[3]
    decoded = unquote_to_bytes(target)
    if decoded.startswith(b"/v1/messages") or any(k.lower() == b"anthropic-version" for k, _ in headers):
        return "anthropic"
    return "openai"


def routes(rng: random.Random) -> Iterator[Case]:
    """Item 7: routes that do not exist and methods the routes do not take, in the calling API's JSON shape."""
    unknown = [b"/v1/responses/resp_1", b"/v1/messages/batches", b"/v1/batches",
               b"/v1/completions", b"/v1/embeddings", b"/v1/chat/completions/", b"/v1/messages/", b"/", b"/v1",
               b"/v2/messages", b"/v1/chat//completions", b"/V1/MESSAGES", b"/v1/messages%00", b"/v1/../v1/messages",
               b"//v1/messages", b"/v1/messages;x", b"/%e6%9d%b1%e4%ba%ac", b"/v1/%ff%fe", b"/v1/" + b"a" * 4000,
               b"/v1/chat/completions.json", b"/v1/messages/../../etc/passwd", b"/.env", b"/v1/models/chat"]
    same = [(b"/v1/%6dessages", "anthropic"), (b"/v1/messages?beta=true", "anthropic"),
            (b"/v1/chat/completions?x=%ff", "openai"), (b"http://h/v1/messages", "anthropic"),
            (b"/v1/chat/completions#frag", "openai")]
    methods = [b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE", b"PROPFIND"]
    for i in range(250):
        api = APIS[rng.randrange(2)]
        body = dumps(valid(rng, api).body)
        extra: list[tuple[bytes, bytes]] = [(b"anthropic-version", b"2023-06-01")] if rng.random() < 0.3 else []
        headers = (key_header(rng), (b"content-type", b"application/json"), *extra)
        choice = i % 5
        if choice in (0, 1):
            path = rng.choice(unknown)
            method = rng.choice((b"POST", b"POST", *methods))
            yield Case("routes", f"{method.decode()} {path[:60].decode('latin-1')}", shape_of(path, headers),
                       b"" if method == b"HEAD" else body, path, method, headers, expect=frozenset({404}),
                       message=None if method == b"HEAD" else "no route ")
        elif choice == 2:
            path = rng.choice(POST_ROUTES[api])
            method = rng.choice(methods)
            message = None if method == b"HEAD" else f"{method.decode()} is not allowed on {path.decode()}"
            yield Case("routes", f"{method.decode()} {path.decode()}", shape_of(path, headers), b"", path, method,
                       headers, expect=frozenset({405}), message=message)
        elif choice == 3:
            path = rng.choice((b"/healthz", b"/readyz", b"/metrics", b"/v1/models"))
            if rng.random() < 0.5:
                yield Case("routes", f"POST {path.decode()}", shape_of(path, headers), body, path, b"POST", headers,
                           expect=frozenset({405}), message=f"POST is not allowed on {path.decode()}")
            else:
                yield Case("routes", f"GET {path.decode()}", shape_of(path, headers), b"", path, b"GET", headers,
                           expect=frozenset({200}))
        else:
            path, owner = same[rng.randrange(len(same))]
            owner_api: Api = "anthropic" if owner == "anthropic" else "openai"
            body = dumps(valid(rng, owner_api).body)
            yield Case("routes", f"POST {path.decode('latin-1')} (the {owner} route)", owner_api, body, path,
                       b"POST", headers, expect=frozenset({200}))


def content_types(rng: random.Random) -> Iterator[Case]:
    """Missing, wrong and garbled Content-Type (the body is JSON whatever the header says), chunked bodies,
    Expect: 100-continue, no Content-Length at all."""
    kinds: list[tuple[str, bytes | None]] = [
        ("no Content-Type", None), ("text/plain", b"text/plain"),
        ("form-urlencoded", b"application/x-www-form-urlencoded"), ("multipart", b"multipart/form-data; boundary=x"),
        ("charset=utf-16", b"application/json; charset=utf-16"), ("garbage bytes", b"\xff\xfe;;;=="),
        ("4,000 bytes", b"application/json; x=" + b"y" * 4000), ("empty", b""), ("octet-stream",
                                                                                   b"application/octet-stream")]
    for i in range(150):
        api = APIS[i % 2]
        built = valid(rng, api)
        body = dumps(built.body)
        note, value = kinds[rng.randrange(len(kinds))]
        headers: list[tuple[bytes, bytes]] = [key_header(rng)]
        if value is not None:
            headers.append((b"content-type", value))
        framing: Literal["length", "chunked", "none"] = "length"
        expect = [200]
        choice = i % 6
        if choice == 1:
            framing = "chunked"
            note += ", chunked"
        elif choice == 2:
            headers.append((b"expect", b"100-continue"))
            note += ", Expect: 100-continue"
        elif choice == 3:
            framing, body, expect = "none", b"", [400]
            note += ", no Content-Length and no body"
        elif choice == 4 and built.sites:
            rng.choice(built.sites)["text"] = "café ü"
            body = json.dumps(built.body, ensure_ascii=False).encode("latin-1", errors="replace")
            headers = [key_header(rng), (b"content-type", b"application/json; charset=latin-1")]
            expect = [400]
            note += ", a latin-1 body that says so"
        yield Case("content_type", note, api, body, ENDPOINT[api], headers=tuple(headers), framing=framing,
                   expect=frozenset(expect))


def upstream(rng: random.Random) -> Iterator[Case]:
    """Item 5 and the upstream faults: absurd usage (``/huge``: 2³¹ more prompt tokens), a 500, a hang, a cut
    stream, an address where nothing listens (each the only kind of request that may get a 5xx), provider cache
    fields (``/cached``), a model with no tokenizer, and bad input sent to the faulty models (still a 400: nothing
    is forwarded)."""
    for i in range(300):
        api = APIS[i % 2]
        stream = rng.random() < 0.5
        fault = rng.choice(("huge", "huge", "huge", "error", "hang", "drop", "drop", "gone", "cached", "plain"))
        if fault == "hang" and rng.random() < 0.6:
            fault = "huge"  # each hang holds a slot for the upstream timeout
        alias = f"{MODEL[api]}-{fault}"
        built = valid(rng, api, alias, stream)
        if i % 12 in (5, 10):  # one in six, both APIs
            built.body["messages"] = rng.choice(({}, "hi", [1], [{"role": "", "content": "x"}]))
            yield post("upstream", f"bad messages to {alias}", api, dumps(built.body), expect=[400], rng=rng)
            continue
        note = f"{alias}, {'streaming' if stream else 'not streaming'}"
        if fault in ("cached", "plain") or (fault == "drop" and not stream):
            yield post("upstream", note, api, dumps(built.body), expect=[200], rng=rng)
        elif fault in ("huge", "drop") and stream:
            yield post("upstream", note, api, dumps(built.body), expect=[200], fault=fault, rng=rng)
        else:
            status = FAULT_STATUS[fault]
            yield post("upstream", note, api, dumps(built.body), expect=[status], fault=fault,
                       message=NO_USAGE if fault == "huge" else None, rng=rng)


def framing(rng: random.Random) -> Iterator[Case]:
    """Requests the HTTP parser itself refuses, among them the control-character and over-long credentials of
    item 1 and methods no route knows: control bytes, bare CR or LF and 8 KB+ lines in header values, too many
    headers, malformed header names, raw bytes in the target, unknown methods, broken chunked bodies, conflicting
    lengths, TLS and HTTP/2 on the HTTP port."""
    body = b'{"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'

    def request(method: bytes = b"POST", target: bytes = b"/v1/chat/completions",
                headers: Sequence[bytes] = (b"x-api-key: " + KEY,), tail: bytes | None = None) -> bytes:
        head = b"".join(h + b"\r\n" for h in headers)
        if tail is None:
            tail = b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        return method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + head + tail

    cases: list[tuple[str, bytes, Api]] = [
        ("two Content-Types", request(headers=[b"x-api-key: " + KEY, b"content-type: application/json",
                                                b"content-type: text/plain"]), "openai"),
        ("two Host headers", request(headers=[b"x-api-key: " + KEY, b"Host: y"]), "openai"),
        ("200 headers", request(headers=[b"x-api-key: " + KEY] + [b"x-h%d: v" % i for i in range(200)]), "openai"),
        ("a header name with a space", request(headers=[b"x api key: " + KEY]), "openai"),
        ("a header name with 0xe9", request(headers=[b"x-api-k\xe9y: " + KEY]), "openai"),
        ("a header without a colon", request(headers=[b"x-api-key " + KEY]), "openai"),
        ("an obsolete folded header", request(headers=[b"x-api-key: a", b" " + KEY]), "openai"),
        ("a raw 0xff in the target", request(target=b"/v1/\xff"), "openai"),
        ("a space in the target", request(target=b"/v1/chat completions"), "openai"),
        ("a control byte in the target", request(target=b"/v1/messages\x01"), "anthropic"),
        ("a 9,000-byte target", request(target=b"/v1/" + b"a" * 9000), "openai"), ("the target *",
                                                                                   request(target=b"*"), "openai"),
        ("method FOO", request(method=b"FOO"), "openai"), ("method get", request(method=b"get"), "openai"),
        ("method BREW", request(method=b"BREW", target=b"/v1/messages"), "anthropic"),
        ("chunk size zz", request(tail=b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nab\r\n0\r\n\r\n"),
         "openai"),
        ("a chunk without its CRLF", request(tail=b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                                                   b"2\r\nabcd0\r\n\r\n"), "openai"),
        ("Content-Length and Transfer-Encoding", request(
            tail=b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"), "openai"),
        ("Content-Length abc", request(tail=b"Content-Length: abc\r\nConnection: close\r\n\r\n"), "openai"),
        ("Content-Length -1", request(tail=b"Content-Length: -1\r\nConnection: close\r\n\r\n"), "openai"),
        ("two different Content-Lengths", request(
            tail=b"Content-Length: 3\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd"), "openai"),
        ("Transfer-Encoding gzip", request(tail=b"Transfer-Encoding: gzip\r\nConnection: close\r\n\r\n"), "openai"),
        ("an HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "openai"),
        ("HTTP/3.0", b"POST /v1/messages HTTP/3.0\r\nHost: x\r\nConnection: close\r\n\r\n", "anthropic"),
        ("no version", b"POST /v1/messages\r\nHost: x\r\n\r\n", "anthropic"),
        ("a TLS ClientHello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)), "openai"),
    ]
    controls = [*range(0x09), *range(0x0b, 0x0d), *range(0x0e, 0x20), 0x7f]  # all but tab, LF and CR
    headers = [(b"x-api-key", b""), (b"Authorization", b"Bearer "), (PRINCIPAL_HEADER.encode(), b""),
               (b"content-encoding", b""), (b"content-type", b"application/json")]
    while len(cases) < 200:  # header values the parser refuses, at random: a key, a principal, an encoding
        name, prefix = rng.choice(headers)
        value = bytearray(b"pc-" + bytes(rng.choice(b"abcdef0123456789") for _ in range(rng.randrange(1, 40))))
        how = rng.choice(("control", "control", "LF", "CR", "long"))
        if how == "long":
            value += b"k" * rng.randrange(8190, 70_000)
            note = f"a {len(value):,}-byte {name.decode()}"
        else:
            byte = rng.choice(controls) if how == "control" else b"\n\r"[how == "CR"]
            value.insert(rng.randrange(1, len(value)), byte)
            note = f"{name.decode()} with the byte {byte:#04x} inside"
        cases.append((note, request(headers=[name + b": " + prefix + bytes(value)]), "openai"))
    for note, raw, api in cases:
        yield Case("framing", note, api, raw=raw, expect=frozenset(range(400, 500)))


CLASSES: dict[str, Callable[[random.Random], Iterator[Case]]] = {
    "baseline": baseline, "credentials": credentials, "principals": principals, "markers": markers,
    "nesting": nesting, "encoding": encoding, "json": json_bodies, "numbers": numbers, "shapes": shapes,
    "routes": routes, "content_type": content_types, "upstream": upstream, "framing": framing,
}


@cache
def corpus() -> tuple[Case, ...]:
    """Every case, numbered; class ``k`` comes from ``random.Random(f"{SEED}:{k}")``."""
    cases: list[Case] = []
    for kind, make in CLASSES.items():
        cases += make(random.Random(f"{SEED}:{kind}"))
    return tuple(replace(case, n=n) for n, case in enumerate(cases))


def digest(cases: Sequence[Case]) -> str:
    h = hashlib.sha256()
    for case in cases:
        h.update(repr((case.kind, case.note, case.api, case.expect, case.fault, case.principal, case.mode)).encode())
        h.update(wire(case, b"KEY"))
    return h.hexdigest()


# -- the verdict ---------------------------------------------------------------------------------------------


def sse(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event."""
    out: list[tuple[str | None, str]] = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" ").decode())
        if data:
            out.append((name, "\n".join(data)))
    return out


def error_shape(api: Api, status: int, body: Any) -> str:
    """The message of an error in ``api``'s shape; AssertionError otherwise."""
    code = body.get("error", {}).get("code") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
        else None
    code = code if code == "invalid_cache_control" else None
    if status == 504 and api == "anthropic":
        return assert_anthropic_error(body, "api_error")
    return assert_error(api, status, body, code)


def stream_error(api: Api, events: Sequence[tuple[str | None, str]]) -> str | None:
    """The message of the stream's error event, checked for the API's shape, or None when there is none."""
    for name, data in events:
        if api == "anthropic" and name == "error":
            return assert_anthropic_error(json.loads(data), "api_error")
        if api == "openai" and data.startswith("{") and '"error"' in data:
            payload = json.loads(data)
            if isinstance(payload, dict) and "error" in payload:
                return assert_openai_error(payload)
    return None


@dataclass
class Outcome:
    case: Case
    reply: Reply
    problems: list[str] = field(default_factory=list)
    billed: bool = False
    """A complete API 2xx: exactly one ledger row expected."""
    usage: tuple[int, int] | None = None
    """(prompt, completion) as the client saw them, for a complete non-streaming 2xx."""
    logged: int | None = None
    """The status the request log must hold, with no cost (a forwarded upstream fault)."""


def judge(case: Case, reply: Reply) -> Outcome:
    out = Outcome(case, reply)
    problems = out.problems
    if reply.failure is not None:
        problems.append(reply.failure)
        if reply.status == 0:
            return out
    status = reply.status
    if b"Traceback" in reply.body or re.search(rb'File "[^"]+", line \d+', reply.body):
        problems.append("traceback text in the body")
    if status >= 500 and not (case.fault and status == FAULT_STATUS.get(case.fault)):
        problems.append(f"a {status} for {'client input' if case.fault is None else f'fault {case.fault}'}")
    if case.expect and status not in case.expect:
        problems.append(f"status {status}, the design gives {sorted(case.expect)}")
    if case.kind == "framing" and reply.request_id is None:
        # Refused by aiohttp's HTTP parser before any handler runs: its plain-text 400, by design
        # (docs/design.md#request-bodies), and one WARNING line in the log, checked with the log below.
        if (status, reply.headers.get("content-type", "").split(";")[0]) != (400, "text/plain"):
            problems.append(f"the parser's refusal is {status} {reply.headers.get('content-type')!r}")
        return out
    if not re.fullmatch(r"req_[0-9a-f]{32}", reply.request_id or ""):
        problems.append(f"no x-request-id (got {reply.request_id!r})")
    if status >= 400 and case.method != b"HEAD":
        try:
            payload = json.loads(reply.body)
        except ValueError:
            problems.append(f"the error body is not JSON ({reply.headers.get('content-type')})")
        else:
            try:
                message = error_shape(case.api, status, payload)
            except (AssertionError, KeyError, AttributeError) as exc:
                problems.append(f"the error is not in the {case.api} shape: {exc!r}"[:300])
            else:
                if case.message is not None and not message.startswith(case.message):
                    problems.append(f"message {message[:200]!r}, expected {case.message!r}")
    api_call = case.method == b"POST" and case.raw is None and \
        case.path.split(b"?")[0].split(b"#")[0].removeprefix(b"http://h") in (*ENDPOINT.values(), b"/v1/%6dessages")
    if case.fault is not None and status in (502, 504):
        out.logged = status
    if 200 <= status < 300 and api_call:
        if reply.streamed:
            events = sse(reply.body)
            try:
                broken = stream_error(case.api, events)
            except (AssertionError, ValueError) as exc:
                problems.append(f"a stream error event not in the {case.api} shape: {exc!r}"[:300])
                return out
            done = [d for _, d in events][-1:] == ["[DONE]"] if case.api == "openai" else \
                any(n == "message_stop" for n, _ in events)
            if broken is None and done:
                out.billed = True
                try:
                    out.usage = stream_usage(case.api, events)
                except (ValueError, KeyError, TypeError) as exc:
                    problems.append(f"a stream's usage event does not parse: {exc!r}")
            elif case.fault in ("huge", "drop") and broken is not None and broken.startswith(STREAM_BROKEN):
                out.logged = 502
            else:
                problems.append(f"a 200 stream that did not complete (error event {broken!r})")
        else:
            try:
                out.usage = totals(case.api, json.loads(reply.body)["usage"])
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"a 200 without usage: {exc!r}")
            out.billed = True
    return out


def totals(api: Api, usage: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) of a usage object as the proxy rewrote it (docs/design.md#usage-returned-to-clients)."""
    if api == "openai":
        return usage["prompt_tokens"], usage["completion_tokens"]
    return (usage["input_tokens"] + usage["cache_read_input_tokens"] + usage["cache_creation_input_tokens"],
            usage["output_tokens"])


def stream_usage(api: Api, events: Sequence[tuple[str | None, str]]) -> tuple[int, int] | None:
    """The billed totals a stream told its client: OpenAI's usage chunk (when asked for), Anthropic's
    message_delta."""
    for name, data in reversed(events):
        if (api == "anthropic" and name == "message_delta") or (api == "openai" and '"usage"' in data):
            payload = json.loads(data)
            if isinstance(payload.get("usage"), dict):
                return totals(api, payload["usage"])
    return None


# -- running a class ------------------------------------------------------------------------------------------


def fuzz_config(simulator_url: str, nowhere: str, tokenizer: Path, mode: Mode) -> dict[str, Any]:
    models = [model_config("chat", simulator_url + "/v1", "openai", tokenizer),
              model_config("claude", simulator_url, "anthropic", tokenizer)]
    for fault, path in (*FAULTS.items(), ("cached", "/cached")):
        base = nowhere if fault == "gone" else simulator_url + path
        models.append(model_config(f"chat-{fault}", base + "/v1", "openai", tokenizer))
        models.append(model_config(f"claude-{fault}", base, "anthropic", tokenizer))
    for api in APIS:
        plain = model_config(f"{MODEL[api]}-plain", simulator_url + ("/v1" if api == "openai" else ""), api, tokenizer)
        del plain["tokenizer"]
        models.append(plain)
    return {"models": models, "auth": {"mode": "apiKeys" if mode == "keys" else "header"},
            "limits": {"maxBodyBytes": LIMIT, "upstreamTimeoutSeconds": UPSTREAM_TIMEOUT}}


def nowhere() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


class Captured(logging.Handler):
    """The proxy's log as it would write it (its own JSON formatter), WARNING and above, for the whole test."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.errors: list[tuple[str, str]] = []
        """(logger, line) of each ERROR record."""

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.lines.append(line)
        if record.levelno >= logging.ERROR:
            self.errors.append((record.name, line))

    @property
    def tracebacks(self) -> list[str]:
        return [line for line in self.lines if "Traceback" in line]

    @property
    def ours(self) -> list[str]:
        """ERROR records of the proxy and its HTTP server (asyncio's and the drivers' own are reported apart)."""
        return [line for name, line in self.errors if name.startswith(("promptcache", "aiohttp"))]


@contextlib.contextmanager
def captured_log() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def describe(outcome: Outcome, key: bytes, log: Sequence[str]) -> str:
    case, reply = outcome.case, outcome.reply
    data = wire(case, key)
    request_id = reply.request_id
    lines = [line for line in log if request_id and request_id in line][:3]
    return "\n".join([
        f"corpus()[{case.n}] {case.kind}: {case.note}",
        f"  problems: {'; '.join(outcome.problems)}",
        f"  request ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}): {data[:700]!r}"
        + (" …" if len(data) > 700 else ""),
        f"  answer: {reply.status} {json.dumps(reply.headers)[:300]} {reply.body[:500]!r}",
        *(f"  log: {line[:1500]}" for line in lines),
    ])


async def run_class(kind: str, simulator: tuple[str, Simulator], tokenizer: Path, tmp_path: Path,
                    pg_dsn: str) -> None:
    cases = [case for case in corpus() if case.kind == kind]
    assert cases, kind
    modes = sorted({case.mode for case in cases})
    assert len(modes) == 1, modes
    mode: Mode = "header" if modes == ["header"] else "keys"
    principal = unique(f"fuzz-{kind}")
    key = (await new_key(pg_dsn, principal)).encode()
    started = time.monotonic()
    with captured_log() as log:
        async with running_proxy(fuzz_config(simulator[0], nowhere(), tokenizer, mode), tmp_path, pg_dsn) as proxy:
            if mode == "keys":  # the key's first use, before any unknown key can get this address throttled
                warm = post(kind, "the key's first use", "openai", b'{"model":"chat","messages":[]}',
                            headers=[(b"x-api-key", KEY)], expect=[200])
                first = await send(proxy.url, wire(warm, key))
                assert first.status == 200, first
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(case: Case) -> Outcome:
                async with gate:
                    return judge(case, await send(proxy.url, wire(case, key)))

            outcomes = await asyncio.gather(*(one(case) for case in cases))
            await settle(proxy)
            sent_seconds = time.monotonic() - started
            await check_ledger(outcomes, pg_dsn, principal)
            await check_alive(proxy)
    problems = [o for o in outcomes if o.problems]
    summary = Counter(re.sub(r"\d+", "N", p.split(":")[0])[:70] for o in problems for p in o.problems)
    statuses = Counter(o.reply.status for o in outcomes)
    tracebacks, ours = log.tracebacks, log.ours
    slowest = sorted(outcomes, key=lambda o: -o.reply.seconds)[:3]
    report = [f"{kind}: {len(cases)} requests in {sent_seconds:.1f} s, statuses {dict(sorted(statuses.items()))}, "
              f"{sum(o.billed for o in outcomes)} billed; slowest "
              + ", ".join(f"{o.reply.seconds:.2f} s (#{o.case.n} {o.case.note[:40]})" for o in slowest)]
    if problems:
        report.append(f"{len(problems)} cases with problems: {dict(summary.most_common(12))}")
        seen: set[str] = set()
        for outcome in problems:  # one example of each kind of problem first, then the rest, 12 in all
            sig = outcome.problems[0][:60] + outcome.case.note[:20]
            if sig not in seen and len(seen) < 12:
                seen.add(sig)
                report.append(describe(outcome, key, log.lines))
    if ours or tracebacks:
        report.append(f"the proxy's log holds {len(ours)} ERROR records of its own and {len(tracebacks)} "
                      f"tracebacks; first: {(tracebacks or ours)[0][:2000]}")
    others = [line for _, line in log.errors if line not in ours and line not in tracebacks]
    if others:  # asyncio's "exception was never retrieved" for a driver's future: reported, not failed on
        warnings.warn(f"{kind}: {len(others)} other ERROR records in the proxy's log, first: {others[0][:600]}",
                      stacklevel=1)
    (tmp_path / "fuzz-report.txt").write_text("\n".join(report) + "\n\nall problems:\n" + "\n".join(
        describe(o, key, log.lines) for o in problems) + "\n\nERROR records:\n" + "\n".join(
        line for _, line in log.errors))
    report.append(f"(every case with a problem, and every ERROR record: {tmp_path / 'fuzz-report.txt'})")
    assert not problems and not ours and not tracebacks, "\n".join(report)


async def check_ledger(outcomes: Sequence[Outcome], pg_dsn: str, principal: str) -> None:
    """Every complete API 2xx billed once, to its principal, with the totals its client saw, and logged; nothing
    else billed; a forwarded fault logged with its status and no cost."""
    ids = [o.reply.request_id for o in outcomes if o.reply.request_id]
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT request_id, count(*) OVER (PARTITION BY request_id) AS n, principal_id, "
                                "prompt_tokens, completion_tokens, cost FROM ledger "
                                "WHERE request_id = ANY($1::text[])", ids)
        logs = await conn.fetch("SELECT request_id, status, billed_cost FROM request_log "
                                "WHERE request_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    ledger = {row["request_id"]: row for row in rows}
    logged = {row["request_id"]: row for row in logs}
    for o in outcomes:
        request_id = o.reply.request_id
        if request_id is None:
            continue
        row, log = ledger.get(request_id), logged.get(request_id)
        if not o.billed:
            if row is not None:
                o.problems.append(f"billed, though the answer was {o.reply.status} (cost {row['cost']})")
            if o.logged is not None and (log is None or log["status"] != o.logged or log["billed_cost"] != 0):
                o.problems.append(f"the request log holds {dict(log) if log else None}, not status {o.logged} "
                                  "at no cost")
            continue
        if row is None:
            o.problems.append("an unbilled 2xx: no ledger row")
            continue
        expected = o.case.principal if o.case.mode == "header" else principal
        if row["n"] != 1:
            o.problems.append(f"{row['n']} ledger rows")
        if row["principal_id"] != expected:
            o.problems.append(f"billed to {row['principal_id']!r}, not {expected!r}")
        if o.usage is not None and (row["prompt_tokens"], row["completion_tokens"]) != o.usage:
            o.problems.append(f"billed {(row['prompt_tokens'], row['completion_tokens'])}, the client saw {o.usage}")
        if not isinstance(row["cost"], Decimal) or row["cost"] <= 0:
            o.problems.append(f"a cost of {row['cost']!r}")
        if log is None or log["status"] != 200 or log["billed_cost"] != row["cost"]:
            o.problems.append(f"the request log holds {dict(log) if log else None} for a billed 200")


async def check_alive(proxy: RunningProxy) -> None:
    for path in (b"/healthz", b"/readyz"):
        reply = await send(proxy.url, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.status == 200, (path, reply)
        assert json.loads(reply.body)["status"] in ("ok", "ready"), reply.body


# -- the tests -----------------------------------------------------------------------------------------------


def test_the_corpus_is_seeded_and_covers_every_class() -> None:
    """The same corpus each run (a failure reproduces by its number), ~5,000 requests over both APIs, streaming and
    not, every class present, the deliberate faults only in ``upstream``."""
    cases = corpus()
    corpus.cache_clear()
    assert digest(corpus()) == digest(cases)
    counts = Counter(case.kind for case in cases)
    assert set(counts) == set(CLASSES)
    assert 4_500 <= len(cases) <= 6_000, counts
    assert {case.api for case in cases} == set(APIS)
    assert {case.kind for case in cases if case.fault} == {"upstream"}
    streaming = sum(b'"stream": true' in case.body for case in cases)
    assert 800 < streaming < len(cases) - 800, streaming
    assert sum(MAX_DEPTH - 2 <= int(c.note.split()[0]) <= MAX_DEPTH + 2 for c in cases if c.kind == "nesting") >= 100


@pytest.mark.parametrize("kind", list(CLASSES))
async def test_no_request_of_the_fuzz_corpus_gets_a_5xx(kind: str, simulator: tuple[str, Simulator],
                                                        word_tokenizer: Path, tmp_path: Path, pg_dsn: str) -> None:
    await run_class(kind, simulator, word_tokenizer, tmp_path, pg_dsn)

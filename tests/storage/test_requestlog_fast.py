"""docs/design.md#request-log: the fast reader accepts exactly what the strict one accepts, as the same request.

``parse_line`` (what files are read with) decodes with msgspec and hands anything it does not accept
outright to ``parse_json_line``, the strict reader whose messages the error tests pin. So for any
line, valid or not, the two must agree: the same request, or the same error naming the same field.
Lines are generated valid (in our own and in other writers' spellings) and then broken in the ways
that the typed decoder alone would let through: repeated keys, spaced or odd hashes, escapes, nulls.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storage.test_requestlog import MALFORMED

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import (
    LogFormatError,
    LoggedRequest,
    parse_json_line,
    parse_line,
    to_json_line,
)
from promptcache.proxy.storage.requestlog import _fast as fast_only

T0 = datetime(2025, 3, 1, tzinfo=UTC)
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> LoggedRequest:
    tokens = 0
    chain = []
    for _ in range(draw(st.integers(0, 6))):
        tokens += draw(st.integers(0, 5000))
        chain.append(ChainBlock(draw(st.binary(min_size=1, max_size=32)), tokens,
                                draw(st.sampled_from(["user", "system", "a:b", "null", "x y"]) | names),
                                draw(st.sampled_from([None, *TIERS]))))
    money = st.decimals(min_value=0, max_value=10**6, places=draw(st.integers(0, 9)), allow_nan=False)
    return LoggedRequest(
        id=draw(names), ts=T0 + timedelta(microseconds=draw(st.integers(0, 10**12))), principal=draw(names),
        model=draw(names), tokenizer_version=draw(names), api=draw(st.sampled_from(["openai", "anthropic"])),
        status=draw(st.integers(100, 599)), prompt_tokens=draw(st.integers(0, 2**31 - 1)),
        completion_tokens=draw(st.integers(0, 9)), read_tokens=draw(st.integers(0, 9)),
        creation_tokens={tier: draw(st.integers(0, 9)) for tier in TIERS}, input_per_mtok=draw(money),
        output_per_mtok=draw(money), billed_cost=draw(money), list_cost=draw(money), chain=tuple(chain),
        engine_cached_tokens=draw(st.none() | st.integers(0, 9)),
        prompt_cache_key=draw(st.none() | st.sampled_from(["k", "tenant:1", "a-b_c"])),
    )


def strict(line: str) -> LoggedRequest | str:
    try:
        return parse_json_line(line, 3)
    except LogFormatError as exc:
        return str(exc)


def fast(line: str) -> LoggedRequest | str | None:
    try:
        return parse_line(line.encode("utf-8", "surrogatepass"), 3)
    except LogFormatError as exc:
        return str(exc)


def spellings(request: LoggedRequest, data: st.DataObject) -> str:
    """The line as we write it, or as another JSON writer might (spaces, ASCII escapes)."""
    line = to_json_line(request)
    style = data.draw(st.sampled_from(["ours", "spaced", "ascii"]))
    if style == "ours":
        return line
    return json.dumps(json.loads(line), ensure_ascii=style == "ascii", separators=None)


_TS = re.compile(r'("ts":\s*"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:)([0-9]{2})(\.[0-9]+)?Z"')
"""A timestamp's date and minutes, seconds, fraction: msgspec decodes timestamps by rules of its own."""
MUTATIONS: list[tuple[str, Any]] = [
    ("repeat a top-level key", lambda d: d.replace('"status":', '"status":500,"status":', 1)),
    ("repeat a top-level key, spaced", lambda d: d.replace('"status":', '"status" : 500 , "status":', 1)),
    ("repeat a chain key", lambda d: d.replace('"t":', '"t":1,"t":', 1)),
    ("repeat a marker as null", lambda d: d.replace('"m":', '"m":null,"m":', 1)),
    ("repeat a creation key", lambda d: d.replace('"5m":', '"5m":7,"5m":', 1)),
    ("repeat an optional key", lambda d: d[:-1] + ',"engine_cached_tokens":3,"engine_cached_tokens":4}'),
    ("space in a hash", lambda d: d.replace('"h":"', '"h":"00 ', 1)),
    ("odd hash", lambda d: d.replace('"h":"', '"h":"0', 1)),
    ("long hash", lambda d: d.replace('"h":"', '"h":"' + "ab" * 32, 1)),
    ("empty hash", lambda d: d.replace('"h":"', '"h":"",', 1).replace('"h":"",', '"h":"","x":"', 1)),
    ("escaped key", lambda d: d.replace('"status"', '"st\\u0061tus"', 1)),
    ("null value", lambda d: d.replace('"principal":', '"principal":null,"x":', 1)),
    ("decreasing tokens", lambda d: d.replace('"t":', '"t":-1', 1)),
    ("huge number", lambda d: d.replace('"status":', '"status":1' + "0" * 30 + ',"y":', 1)),
    ("float count", lambda d: d.replace('"read_tokens":', '"read_tokens":1.0,"z":', 1)),
    ("money as a number", lambda d: d.replace('"list_cost":"', '"list_cost":1,"w":"', 1)),
    ("space in money", lambda d: d.replace('"billed_cost":"', '"billed_cost":"1 ', 1)),
    ("empty money", lambda d: d.replace('"input_per_mtok":"', '"input_per_mtok":"","v":"', 1)),
    ("money with an exponent", lambda d: d.replace('"output_per_mtok":"', '"output_per_mtok":"1e3","u":"', 1)),
    ("extra key", lambda d: d[:-1] + ',"latency_ms":1}'),
    ("missing key", lambda d: d.replace('"api":', '"apx":', 1)),
    ("trailing garbage", lambda d: d + "x"),
    ("deep nesting", lambda d: d.replace('"chain":', '"chain":' + "[" * 200 + "]" * 200 + ',"q":', 1)),
    ("lone surrogate", lambda d: d.replace('"id":"', '"id":"\\ud800', 1)),
    ("bad timestamp", lambda d: d.replace('Z"', '"', 1)),
    ("naive timestamp", lambda d: _TS.sub(lambda m: f'{m[1]}{m[2]}{m[3] or ""}"', d, count=1)),
    ("offset timestamp", lambda d: _TS.sub(lambda m: f'{m[1]}{m[2]}{m[3] or ""}+05:30"', d, count=1)),
    ("zero offset", lambda d: _TS.sub(lambda m: f'{m[1]}{m[2]}{m[3] or ""}+00:00"', d, count=1)),
    ("lowercase timestamp", lambda d: _TS.sub(lambda m: f'{m[1].lower()}{m[2]}{m[3] or ""}z"', d, count=1)),
    ("leap second", lambda d: _TS.sub(lambda m: f'{m[1]}60{m[3] or ""}Z"', d, count=1)),
    ("past 9999 in UTC", lambda d: _TS.sub('"ts":"9999-12-31T23:59:59-05:00"', d, count=1)),
    ("before year 1 in UTC", lambda d: _TS.sub('"ts":"0001-01-01T00:00:00+05:30"', d, count=1)),
    ("nanoseconds", lambda d: _TS.sub(lambda m: f'{m[1]}{m[2]}.123456789Z"', d, count=1)),
]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fast_reader_agrees_with_the_strict_one_on_valid_lines(data: st.DataObject) -> None:
    request = data.draw(requests())
    line = spellings(request, data)
    assert strict(line) == request
    assert fast(line) == request


@settings(max_examples=300, deadline=None)
@given(requests())
def test_our_own_lines_take_the_fast_path(request: LoggedRequest) -> None:
    """What export writes, the fast reader takes without the strict one (the speed replay's bench measures)."""
    assert fast_only(to_json_line(request).encode("utf-8")) == request


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_fast_reader_agrees_with_the_strict_one_on_broken_lines(data: st.DataObject) -> None:
    line = spellings(data.draw(requests()), data)
    for _ in range(data.draw(st.integers(1, 2))):
        _, mutate = data.draw(st.sampled_from(MUTATIONS))
        line = mutate(line)
    assert fast(line) == strict(line)


def test_fast_reader_gives_the_strict_messages() -> None:
    """Every malformed line the error tests pin, read as a file line: the same message."""
    for line, _ in MALFORMED:
        assert fast(line) == strict(line)
        assert isinstance(fast(line), str)


def test_blank_and_undecodable_lines() -> None:
    assert parse_line(b"  \r\n", 1) is None
    assert parse_line(b"\n", 1) is None
    assert fast("{}") == "line 3: id: missing"
    with pytest.raises(LogFormatError, match=r"^line 9: not UTF-8 \(invalid start byte at byte 7\)$"):
        parse_line(b'{"id":"\xff"}\n', 9)


def test_exact_decimals_survive() -> None:
    request = parse_line(b"".join([to_json_line(LoggedRequest(
        "r", T0, "p", "m", "t", "openai", 200, 1, 1, 0, dict.fromkeys(TIERS, 0), Decimal("0.10"),
        Decimal("1E+1"), Decimal("0.0000001"), Decimal("0E-10"), ())).encode()]), 1)
    assert request is not None
    assert (str(request.input_per_mtok), str(request.output_per_mtok), str(request.list_cost)) == \
        ("0.10", "10", "0E-10")

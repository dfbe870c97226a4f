"""docs/design.md#blocks-and-prefix-hashes (blocks, canonical bytes, cumulative hashes) and §3 marker stripping."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.proxy.domain.blocks import (
    NO_MARKER,
    canonical_json,
    extract_blocks,
    parse_blocks,
    scan_markers,
    strip_markers,
)
from promptcache.proxy.domain.errors import BadRequest, InvalidCacheControl

from support.builders import text_parts


def hashes(body: Any, api: str = "anthropic", ignore: tuple[str, ...] = ()) -> list[bytes]:
    return [b.hash for b in extract_blocks(body, api, ignore) if not b.ignored]  # type: ignore[arg-type]


# --- canonical bytes and cumulative hashing -------------------------------------------------


def test_canonical_bytes_and_cumulative_hash_by_hand() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "héllo ☃", "cache_control": {"type": "ephemeral"}}],
            },
        ],
    }
    blocks = extract_blocks(body, "openai")
    assert [b.role for b in blocks] == ["system", "user"]
    # Written out by hand: sorted keys, no spaces, raw UTF-8 (no \u escapes), marker removed.
    first = b"system\x00" + b'{"text":"You are terse.","type":"text"}'
    second = b"user\x00" + '{"text":"héllo ☃","type":"text"}'.encode()
    assert blocks[0].canonical == b'{"text":"You are terse.","type":"text"}'
    assert blocks[1].canonical == '{"text":"héllo ☃","type":"text"}'.encode()
    # The same bytes through the serialiser docs/design.md#blocks-and-prefix-hashes names.
    dumped = json.dumps(
        {"type": "text", "text": "héllo ☃"}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert b"user\x00" + dumped.encode() == second

    assert blocks[0].hash == hashlib.sha256(first).digest()
    assert blocks[1].hash == hashlib.sha256(first + second).digest()
    assert blocks[1].hash != hashlib.sha256(second).digest()


def test_canonical_json_float_and_nested_format_is_pythons() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "f",
                        "input": {"b": 1.5, "a": 1e-7, "c": [1e16, 2]},
                    },
                ],
            }
        ]
    }
    (block,) = extract_blocks(body, "anthropic")
    assert (
        block.canonical
        == b'{"id":"t1","input":{"a":1e-07,"b":1.5,"c":[1e+16,2]},"name":"f","type":"tool_use"}'
    )
    assert block.hash == hashlib.sha256(b"assistant\x00" + block.canonical).digest()


def python_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and the infinities too: the standard library parses them
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])),
)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400)
@given(content=st.dictionaries(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])),
                               _json_value, max_size=5))
def test_property_canonical_bytes_are_exactly_pythons_json(content: dict[str, Any]) -> None:
    assert canonical_json(content) == python_json(content)


@settings(max_examples=400)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"])))
def test_property_text_parts_take_a_shortcut_to_the_same_bytes(text: str) -> None:
    """A text part (most blocks) is written without a walk or a sort; the bytes are still Python's."""
    assert canonical_json({"type": "text", "text": text}) == python_json({"type": "text", "text": text})
    assert canonical_json({"text": text, "type": "text"}) == python_json({"type": "text", "text": text})


@pytest.mark.parametrize("value", [
    {"text": "".join(map(chr, range(0x80))) + "\u2028\u2029\ufeff\U0001f600", "type": "text"},
    {"z": 2**64 - 1, "a": -(2**63), "m": [2**64, {"k": 10**30}]},
    {"n": [0.1, -0.0, 1e16, 1e-7, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), -float("inf")]},
    {"deep": [[[[[[[[[[{"x": [1.5]}]]]]]]]]]]},
    {"é": 1, "e": 2, "\U0001f600": 3, "\uffff": 4, "": 5},
])
def test_canonical_bytes_edge_cases_are_pythons_json(value: dict[str, Any]) -> None:
    assert canonical_json(value) == python_json(value)


def test_hash_depends_on_role() -> None:
    user = {"messages": [{"role": "user", "content": "hi"}]}
    assistant = {"messages": [{"role": "assistant", "content": "hi"}]}
    assert hashes(user) != hashes(assistant)


def test_hash_of_a_prefix_is_shared_by_its_extensions() -> None:
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    extended = {"messages": [*short["messages"], {"role": "user", "content": "c"}]}
    assert hashes(extended)[:2] == hashes(short)
    assert len(set(hashes(extended))) == 3


# --- markers never change hashes -------------------------------------------------------------


@pytest.mark.parametrize(
    "marker",
    [
        ...,
        None,
        {"type": "ephemeral"},
        {"type": "ephemeral", "ttl": "5m"},
        {"type": "ephemeral", "ttl": "1h"},
        {"type": "ephemeral", "ttl": "24h"},
    ],
)
def test_marker_is_excluded_from_the_hash(marker: Any) -> None:
    plain = {"messages": [{"role": "user", "content": text_parts(..., ..., ...)}]}
    marked = {"messages": [{"role": "user", "content": text_parts(..., marker, ...)}]}
    assert hashes(marked) == hashes(plain)
    assert extract_blocks(marked, "anthropic")[1].canonical == b'{"text":"part1","type":"text"}'


def test_top_level_marker_is_not_hashed() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    marked = {"cache_control": {"type": "ephemeral"}, **plain}
    assert hashes(marked) == hashes(plain)


def test_marker_on_tool_and_system_is_not_hashed() -> None:
    tool = {"name": "f", "input_schema": {"type": "object"}}
    plain = {
        "tools": [tool],
        "system": [{"type": "text", "text": "s"}],
        "messages": [{"role": "user", "content": "x"}],
    }
    marked = {
        "tools": [{**tool, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "x"}],
    }
    assert hashes(marked) == hashes(plain)


# --- block order and shapes ------------------------------------------------------------------


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_string_content_is_a_single_text_part(api: str) -> None:
    as_string = {"messages": [{"role": "user", "content": "hi"}]}
    as_list = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    blocks = extract_blocks(as_string, api)  # type: ignore[arg-type]
    assert len(blocks) == 1
    assert blocks[0].content == {"type": "text", "text": "hi"}
    assert blocks[0].path == "messages[0].content"
    assert hashes(as_string, api) == hashes(as_list, api)


def test_tools_come_first_then_system_then_messages() -> None:
    # Dict order deliberately puts messages before tools.
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "text", "text": "r"}]}
        ],
        "system": "be brief",
        "tools": [{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}],
    }
    blocks = extract_blocks(body, "anthropic")
    assert [(b.position, b.role, b.path, b.message) for b in blocks] == [
        (0, "tool_definition", "tools[0]", None),
        (1, "tool_definition", "tools[1]", None),
        (2, "system", "system", None),
        (3, "user", "messages[0].content[0]", 0),
        (4, "user", "messages[0].content[1]", 0),
    ]


def test_anthropic_system_string_equals_single_text_part_list() -> None:
    as_string = {"system": "rules", "messages": [{"role": "user", "content": "hi"}]}
    as_list = {"system": [{"type": "text", "text": "rules"}], "messages": [{"role": "user", "content": "hi"}]}
    assert hashes(as_string) == hashes(as_list)
    two = {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "messages": []}
    blocks = extract_blocks(two, "anthropic")
    assert [(b.role, b.path) for b in blocks] == [("system", "system[0]"), ("system", "system[1]")]


def test_anthropic_system_null_is_absent_and_openai_ignores_system_field() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert hashes({"system": None, "messages": msgs}) == hashes({"messages": msgs})
    assert hashes({"system": "x", "messages": msgs}, "openai") == hashes({"messages": msgs}, "openai")


def test_openai_tool_calls_follow_the_message_content() -> None:
    call0 = {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    call1 = {"id": "c1", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}}
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "checking", "tool_calls": [call0, call1]},
            {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
            {"role": "assistant", "content": None, "tool_calls": [call0]},
        ]
    }
    blocks = extract_blocks(body, "openai")
    assert [(b.role, b.path, b.message) for b in blocks] == [
        ("user", "messages[0].content", 0),
        ("assistant", "messages[1].content", 1),
        ("tool_call", "messages[1].tool_calls[0]", 1),
        ("tool_call", "messages[1].tool_calls[1]", 1),
        ("tool", "messages[2].content", 2),
        ("tool_call", "messages[3].tool_calls[0]", 3),
    ]
    assert blocks[2].content == call0
    assert blocks[2].canonical == json.dumps(call0, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_anthropic_does_not_read_tool_calls() -> None:
    body = {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}]}
    assert [b.role for b in extract_blocks(body, "anthropic")] == ["assistant"]


def test_name_and_tool_call_id_are_not_hashed() -> None:
    a = {"messages": [{"role": "tool", "tool_call_id": "c0", "name": "f", "content": "sunny"}]}
    b = {"messages": [{"role": "tool", "tool_call_id": "zz", "name": "g", "content": "sunny"}]}
    assert hashes(a, "openai") == hashes(b, "openai")


def test_text_and_image_properties() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "tool_result", "tool_use_id": "t", "content": "ok"},
                ],
            }
        ]
    }
    blocks = extract_blocks(body, "anthropic")
    assert [b.text for b in blocks] == ["look", None, None, None]
    assert [b.is_image for b in blocks] == [False, True, True, False]


# --- ignorePrefixes --------------------------------------------------------------------------


def _nonce_body(nonce: str | None) -> dict[str, Any]:
    system = [{"type": "text", "text": "You are a helpful assistant."}]
    if nonce is not None:
        system.insert(0, {"type": "text", "text": f"x-billing-nonce: {nonce}"})
    return {"system": system, "messages": [{"role": "user", "content": "hi"}]}


def test_ignored_system_block_is_left_out_of_the_chain() -> None:
    ignore = ("x-billing-nonce:",)
    blocks = extract_blocks(_nonce_body("123"), "anthropic", ignore)
    assert [b.ignored for b in blocks] == [True, False, False]
    assert blocks[0].hash == b""
    assert hashes(_nonce_body("123"), ignore=ignore) == hashes(_nonce_body("456"), ignore=ignore)
    assert hashes(_nonce_body("123"), ignore=ignore) == hashes(_nonce_body(None), ignore=ignore)
    # Without the setting the nonce is an ordinary block and changes every later hash.
    assert hashes(_nonce_body("123"))[1:] != hashes(_nonce_body("456"))[1:]


def test_ignore_prefixes_apply_to_system_role_only() -> None:
    ignore = ("x-billing-nonce:",)
    body = {"messages": [{"role": "user", "content": "x-billing-nonce: 1"}]}
    assert [b.ignored for b in extract_blocks(body, "anthropic", ignore)] == [False]
    openai_system = {
        "messages": [{"role": "system", "content": "x-billing-nonce: 9"}, {"role": "user", "content": "hi"}]
    }
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    assert hashes(openai_system, "openai", ignore) == hashes(plain, "openai")


# --- strip_markers ---------------------------------------------------------------------------


def strip(body: dict[str, Any], api: str) -> dict[str, Any]:
    """What the proxy forwards: the markers scan_markers found, and the top-level one, removed."""
    return strip_markers(body, scan_markers(body, api)[0])  # type: ignore[arg-type]


def test_strip_markers_removes_every_marker_but_not_inside_tool_schemas() -> None:
    mark = {"type": "ephemeral", "ttl": "1h"}
    schema = {"type": "object", "properties": {"cache_control": {"type": "string", "cache_control": "keep"}}}
    body = {
        "model": "m",
        "cache_control": {"type": "ephemeral"},
        "tools": [
            {"name": "f", "input_schema": schema, "cache_control": mark},
            {"name": "g", "input_schema": {}},
        ],
        "system": [{"type": "text", "text": "s", "cache_control": mark}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": mark}]},
            {"role": "assistant", "content": "b"},
        ],
    }
    original = copy.deepcopy(body)
    out = strip(body, "anthropic")
    assert out == {
        "model": "m",
        "tools": [{"name": "f", "input_schema": schema}, {"name": "g", "input_schema": {}}],
        "system": [{"type": "text", "text": "s"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": "b"},
        ],
    }
    assert out["tools"][0]["input_schema"]["properties"]["cache_control"] == {
        "type": "string",
        "cache_control": "keep",
    }
    assert body == original


def test_strip_markers_openai_tool_calls_and_function_parameters() -> None:
    mark = {"type": "ephemeral"}
    params = {"type": "object", "properties": {"cache_control": {"type": "boolean"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {
        "tools": [{**tool, "cache_control": mark}],
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": None, "tool_calls": [{**call, "cache_control": mark}]},
        ],
    }
    original = copy.deepcopy(body)
    assert strip(body, "openai") == {
        "tools": [tool],
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ],
    }
    assert body == original


def test_strip_markers_leaves_the_openai_system_field_and_an_unmarked_body_alone() -> None:
    body = {
        "system": [{"type": "text", "text": "s", "cache_control": {}}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert strip(body, "openai") is body


# --- malformed bodies ------------------------------------------------------------------------


_MALFORMED = [
        ("openai", ["not", "a", "dict"], "request body"),
        ("openai", {}, "messages"),
        ("anthropic", {"messages": {"role": "user"}}, "messages"),
        ("openai", {"messages": ["hi"]}, "messages[0]"),
        ("openai", {"messages": [{"content": "hi"}]}, "messages[0].role"),
        ("openai", {"messages": [{"role": 7, "content": "hi"}]}, "messages[0].role"),
        ("anthropic", {"messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
        ("openai", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
        ("anthropic", {"messages": [{"role": "user", "content": {"type": "text"}}]}, "messages[0].content"),
        ("anthropic", {"messages": [{"role": "user"}]}, "messages[0].content"),
        ("openai", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]"),
        (
            "anthropic",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, 3]}]},
            "messages[0].content[1]",
        ),
        ("openai", {"tools": {"name": "f"}, "messages": []}, "tools"),
        ("openai", {"tools": ["f"], "messages": []}, "tools[0]"),
        (
            "openai",
            {"messages": [{"role": "assistant", "tool_calls": {"id": "c"}}]},
            "messages[0].tool_calls",
        ),
        ("openai", {"messages": [{"role": "assistant", "tool_calls": [None]}]}, "messages[0].tool_calls[0]"),
        ("anthropic", {"system": 5, "messages": []}, "system"),
        ("anthropic", {"system": ["rules"], "messages": []}, "system[0]"),
]
_UNSERIALISABLE = ("anthropic", {"messages": [{"role": "user", "content": [{"type": "x", "v": {1, 2}}]}]},
                   "messages[0].content[0]")


@pytest.mark.parametrize(("api", "body", "path"), [*_MALFORMED, _UNSERIALISABLE])
def test_malformed_bodies_raise_bad_request_naming_the_path(api: str, body: Any, path: str) -> None:
    with pytest.raises(BadRequest) as err:
        extract_blocks(body, api)  # type: ignore[arg-type]
    assert not isinstance(err.value, InvalidCacheControl)
    assert err.value.code == "invalid_request_error"
    assert str(err.value).startswith(f"{path} ")


@pytest.mark.parametrize(("api", "body", "path"), _MALFORMED)
def test_the_marker_scan_rejects_every_malformed_structure_alike(api: str, body: Any, path: str) -> None:
    """The proxy validates with scan_markers before forwarding: it must refuse what parse_blocks does."""
    with pytest.raises(BadRequest) as scanned:
        scan_markers(body, api)  # type: ignore[arg-type]
    with pytest.raises(BadRequest) as parsed:
        parse_blocks(body, api)  # type: ignore[arg-type]
    assert str(scanned.value) == str(parsed.value)
    assert str(scanned.value).startswith(f"{path} ")


# --- properties ------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
_marker = st.sampled_from(
    [
        ...,
        None,
        {"type": "ephemeral"},
        {"type": "ephemeral", "ttl": "5m"},
        {"type": "ephemeral", "ttl": "1h"},
        {"type": "ephemeral", "ttl": "24h"},
    ]
)
_part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(
        lambda n, x: {"type": "tool_use", "id": "t", "name": n, "input": {"x": x}},
        _text,
        st.one_of(st.integers(), st.floats(allow_nan=False), _text),
    ),
)
_message = st.tuples(st.sampled_from(["user", "assistant"]), st.lists(_part, min_size=1, max_size=4))
_request = st.fixed_dictionaries(
    {
        "tools": st.lists(
            st.builds(lambda n: {"name": n, "input_schema": {"type": "object"}}, _text), max_size=2
        ),
        "system": st.lists(st.builds(lambda t: {"type": "text", "text": t}, _text), max_size=2),
        "messages": st.lists(_message, min_size=1, max_size=5),
    }
)


def _build(request: dict[str, Any], markers: list[Any]) -> dict[str, Any]:
    """The request with ``markers[i]`` attached to the i-th markable object (in block order)."""
    it = iter(markers)

    def mark(obj: dict[str, Any]) -> dict[str, Any]:
        m = next(it)
        return obj if m is ... else {**obj, "cache_control": m}

    return {
        "tools": [mark(t) for t in request["tools"]],
        "system": [mark(p) for p in request["system"]],
        "messages": [{"role": r, "content": [mark(p) for p in parts]} for r, parts in request["messages"]],
    }


def _markable(request: dict[str, Any]) -> int:
    return len(request["tools"]) + len(request["system"]) + sum(len(p) for _, p in request["messages"])


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(request=_request, data=st.data())
def test_property_moving_or_removing_markers_never_changes_a_hash(request: dict[str, Any], data: Any) -> None:
    n = _markable(request)
    plain = _build(request, [...] * n)
    first = data.draw(st.lists(_marker, min_size=n, max_size=n))
    second = data.draw(st.lists(_marker, min_size=n, max_size=n))
    top = data.draw(_marker)
    marked = _build(request, first)
    if top is not ...:
        marked["cache_control"] = top
    expected = hashes(plain)
    assert hashes(marked) == expected
    assert hashes(_build(request, second)) == expected
    # Stripping the markers gives exactly the unmarked request, and leaves the marked one as it was.
    before = copy.deepcopy(marked)
    assert strip(marked, "anthropic") == plain
    assert marked == before


@settings(max_examples=100)
@given(request=_request)
def test_property_hashes_match_a_reference_cumulative_sha256(request: dict[str, Any]) -> None:
    body = _build(request, [...] * _markable(request))
    running = hashlib.sha256()
    expected = []
    items = [("tool_definition", t) for t in body["tools"]] + [("system", p) for p in body["system"]]
    items += [(m["role"], p) for m in body["messages"] for p in m["content"]]
    for role, obj in items:
        dumped = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        running.update(role.encode() + b"\x00" + dumped.encode())
        expected.append(running.copy().digest())
    assert hashes(body) == expected


@settings(max_examples=150)
@given(request=_request, data=st.data(), ignore=st.sampled_from([(), ("",), ("a", "b")]),
       api=st.sampled_from(["openai", "anthropic"]))
def test_property_the_marker_scan_agrees_with_the_full_parse(
    request: dict[str, Any], data: Any, ignore: tuple[str, ...], api: str
) -> None:
    body = _build(request, data.draw(st.lists(_marker, min_size=_markable(request), max_size=_markable(request))))
    if data.draw(st.booleans()):  # OpenAI messages may carry string content
        body["messages"][0]["content"] = "a string"
    blocks = parse_blocks(body, api, ignore)  # type: ignore[arg-type]
    marked, count, last = scan_markers(body, api, ignore)  # type: ignore[arg-type]
    assert count == len(blocks)
    assert marked == [b for b in blocks if b.marker is not NO_MARKER]
    chain = [b for b in blocks if not b.ignored]
    assert last == (chain[-1] if chain else None)

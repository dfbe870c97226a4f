"""docs/design.md#breakpoints-markers-and-limits: breakpoint validation and placement (explicit, top-level automatic,
policy automatic)."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.proxy.domain.blocks import extract_blocks
from promptcache.proxy.domain.errors import BadRequest, InvalidCacheControl
from promptcache.proxy.domain.markers import with_automatic
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.prepare import admit, prepare

from support.builders import text_parts

E = {"type": "ephemeral"}
M5 = {"type": "ephemeral", "ttl": "5m"}
H1 = {"type": "ephemeral", "ttl": "1h"}
D24 = {"type": "ephemeral", "ttl": "24h"}
_ = ...  # no cache_control key at all


def place(
    body: dict[str, Any], spec: dict[str, Any] | None = None, api: str = "anthropic"
) -> list[str | None]:
    """Per block position: validated before forwarding (admit), then the policy's automatic breakpoint."""
    policy = CachePolicy.from_spec(spec)
    sent = admit(body, api, policy).sent  # type: ignore[arg-type]
    return with_automatic(extract_blocks(body, api, policy.ignore_prefixes), sent, policy)  # type: ignore[arg-type]


def one_message(*markers: Any, top: Any = ...) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text_parts(*markers)}]}
    if top is not ...:
        body["cache_control"] = top
    return body


def rejected(
    body: dict[str, Any], spec: dict[str, Any] | None = None, api: str = "anthropic"
) -> InvalidCacheControl:
    with pytest.raises(InvalidCacheControl) as err:
        place(body, spec, api)
    assert isinstance(err.value, BadRequest)
    assert err.value.code == "invalid_cache_control"
    return err.value


# --- explicit markers ------------------------------------------------------------------------


def test_explicit_markers_become_breakpoints_of_their_tier() -> None:
    assert place(one_message(_, D24, _, H1, M5)) == [None, "24h", None, "1h", "5m"]


def test_missing_ttl_takes_policy_default() -> None:
    assert place(one_message(E, _)) == ["5m", None]
    assert place(one_message(E, _), {"defaultTtl": "1h"}) == ["1h", None]


def test_null_marker_is_no_marker() -> None:
    assert place(one_message(None, None, None, None, None, None)) == [None] * 6
    assert place(one_message(_, _, top=None)) == [None, None]


def test_markers_on_tools_and_system_count() -> None:
    body = {
        "tools": [{"name": "f", "input_schema": {}, "cache_control": D24}],
        "system": [{"type": "text", "text": "s", "cache_control": H1}],
        "messages": [{"role": "user", "content": text_parts(M5)}],
    }
    assert place(body) == ["24h", "1h", "5m"]


def test_openai_tool_call_marker_counts() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "cache_control": H1}]},
        ]
    }
    assert place(body, api="openai") == [None, "1h"]


@pytest.mark.parametrize(
    "marker",
    [
        {"type": "persistent"},
        {"ttl": "5m"},
        {},
        {"type": None},
        {"type": "ephemeral", "ttl": "5m", "scope": "global"},
    ],
)
def test_unknown_type_is_rejected(marker: dict[str, Any]) -> None:
    err = rejected(one_message(_, _, marker))
    assert (err.rule, err.block) == ("type", 2)
    assert str(err).startswith("block 2 (messages[0].content[2]): type: ")


@pytest.mark.parametrize("marker", ["ephemeral", True, 5, ["ephemeral"]])
def test_non_object_marker_is_rejected(marker: Any) -> None:
    err = rejected(one_message(_, marker))
    assert (err.rule, err.block) == ("type", 1)


@pytest.mark.parametrize("ttl", ["10m", "1d", "5M", 300, "", None])
def test_unknown_ttl_is_rejected(ttl: Any) -> None:
    err = rejected(one_message({"type": "ephemeral", "ttl": ttl}))
    assert (err.rule, err.block) == ("tier", 0)
    assert "block 0" in str(err)


def test_disabled_tier_is_rejected() -> None:
    err = rejected(one_message(_, M5, D24), {"enabledTtls": ["5m", "1h"]})
    assert (err.rule, err.block) == ("disabled_tier", 2)
    assert str(err).startswith("block 2 (messages[0].content[2]): disabled_tier: ")
    assert place(one_message(H1, M5), {"enabledTtls": ["5m", "1h"]}) == ["1h", "5m"]


def test_rule_error_names_tool_and_system_paths() -> None:
    body = {
        "tools": [{"name": "f", "input_schema": {}}],
        "system": [{"type": "text", "text": "s", "cache_control": {}}],
        "messages": [],
    }
    err = rejected(body)
    assert (err.rule, err.block) == ("type", 1)
    assert str(err).startswith("block 1 (system[0]): type: ")


# --- limits ----------------------------------------------------------------------------------


def test_four_breakpoints_by_default_and_the_fifth_is_rejected() -> None:
    assert place(one_message(M5, M5, M5, M5, _)) == ["5m"] * 4 + [None]
    err = rejected(one_message(M5, _, M5, M5, M5, _, M5))
    assert (err.rule, err.block) == ("too_many_breakpoints", 6)


def test_custom_max_breakpoints() -> None:
    spec = {"maxBreakpoints": 2}
    assert place(one_message(H1, M5, _), spec) == ["1h", "5m", None]
    err = rejected(one_message(H1, _, M5, M5), spec)
    assert (err.rule, err.block) == ("too_many_breakpoints", 3)


def test_null_markers_do_not_use_slots() -> None:
    assert place(one_message(None, M5, None, M5, None, M5, None, M5)) == [None, "5m"] * 4


@pytest.mark.parametrize(
    ("markers", "expected"),
    [
        ((H1, M5), ["1h", "5m"]),
        ((D24, H1, M5), ["24h", "1h", "5m"]),
        ((H1, H1, _, M5, M5), ["1h", "1h", None, "5m", "5m"]),
        ((D24, _, M5), ["24h", None, "5m"]),
    ],
)
def test_shorter_ttl_may_follow_longer(markers: tuple[Any, ...], expected: list[str | None]) -> None:
    assert place(one_message(*markers)) == expected


@pytest.mark.parametrize(
    ("markers", "block"),
    [((M5, H1), 1), ((H1, _, M5, _, D24), 4), ((D24, M5, H1), 2), ((_, E, D24), 2)],
)
def test_longer_ttl_after_shorter_is_rejected(markers: tuple[Any, ...], block: int) -> None:
    err = rejected(one_message(*markers))
    assert (err.rule, err.block) == ("ttl_order", block)


# --- top-level automatic caching -------------------------------------------------------------


def test_top_level_marker_goes_on_the_last_block() -> None:
    body = {
        "tools": [{"name": "f", "input_schema": {}}],
        "cache_control": E,
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": text_parts(_, _)}],
    }
    assert place(body) == [None, None, None, "5m"]
    assert place({**body, "cache_control": H1}) == [None, None, None, "1h"]


def test_top_level_merges_with_same_tier_on_last_block() -> None:
    # Four explicit markers, the last on the last block: the top-level one needs no extra slot.
    assert place(one_message(H1, H1, H1, H1, top=H1)) == ["1h"] * 4
    assert place(one_message(M5, _, E, top=M5)) == ["5m", None, "5m"]


def test_top_level_conflicts_with_a_different_tier_on_the_last_block() -> None:
    err = rejected(one_message(_, _, M5, top=H1))
    assert (err.rule, err.block) == ("automatic_conflict", 2)


def test_top_level_conflicts_when_all_slots_are_taken() -> None:
    err = rejected(one_message(M5, M5, M5, M5, _, top=E))
    assert (err.rule, err.block) == ("automatic_conflict", 4)
    assert place(one_message(M5, M5, M5, _, top=E)) == ["5m", "5m", "5m", "5m"]
    assert place(one_message(M5, M5, M5, _, _, top=E)) == ["5m", "5m", "5m", None, "5m"]
    err = rejected(one_message(H1, _, top=E), {"maxBreakpoints": 1})
    assert (err.rule, err.block) == ("automatic_conflict", 1)


def test_top_level_respects_ttl_order() -> None:
    err = rejected(one_message(M5, _, top=H1))
    assert (err.rule, err.block) == ("ttl_order", 1)
    assert place(one_message(H1, _, top=M5)) == ["1h", "5m"]


def test_top_level_marker_is_validated() -> None:
    err = rejected(one_message(_, top={"type": "forever"}))
    assert (err.rule, err.block) == ("type", None)
    assert str(err).startswith("top-level cache_control: type: ")
    assert rejected(one_message(_, top={"type": "ephemeral", "ttl": "2h"})).rule == "tier"
    assert rejected(one_message(_, top=D24), {"enabledTtls": ["5m"]}).rule == "disabled_tier"


def test_top_level_marker_on_a_request_without_blocks() -> None:
    err = rejected({"messages": [], "cache_control": E})
    assert (err.rule, err.block) == ("automatic_conflict", None)


def test_top_level_marker_skips_ignored_blocks() -> None:
    body = {
        "system": [{"type": "text", "text": "rules"}, {"type": "text", "text": "nonce: 1"}],
        "messages": [],
        "cache_control": E,
    }
    assert place(body, {"ignorePrefixes": ["nonce:"]}) == ["5m", None]


def test_marker_on_an_ignored_block_is_no_breakpoint() -> None:
    body = {
        "system": [{"type": "text", "text": "nonce: 1", "cache_control": H1}, {"type": "text", "text": "s"}],
        "messages": [{"role": "user", "content": text_parts(M5)}],
    }
    # The ignored 1h marker neither counts nor constrains the TTL order of the later 5m one.
    assert place(body, {"ignorePrefixes": ["nonce:"], "maxBreakpoints": 1}) == [None, None, "5m"]


# --- policy automatic placement --------------------------------------------------------------


def conversation(*last_markers: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": text_parts(_, _, prefix="q2-")},
            {"role": "assistant", "content": text_parts(*last_markers, prefix="a2-")},
        ]
    }


def test_policy_last_block() -> None:
    spec = {"automatic": {"mode": "lastBlock", "ttl": "1h"}}
    assert place(conversation(_, _), spec) == [None, None, None, None, None, "1h"]
    # Without a ttl the automatic tier is the policy default.
    assert place(conversation(_), {"automatic": {"mode": "lastBlock"}}) == [None] * 4 + ["5m"]


def test_policy_last_user_message() -> None:
    spec = {"automatic": {"mode": "lastUserMessage", "ttl": "5m"}}
    assert place(conversation(_, _), spec) == [None, None, None, "5m", None, None]


def test_policy_last_user_message_openai_with_tool_turns() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
            {"role": "tool", "tool_call_id": "c", "content": "r"},
        ]
    }
    spec = {"automatic": {"mode": "lastUserMessage", "ttl": "1h"}}
    assert place(body, spec, api="openai") == [None, "1h", None, None]
    assert place({"messages": [{"role": "system", "content": "s"}]}, spec, api="openai") == [None]


def test_policy_automatic_keeps_an_explicit_marker_on_the_target() -> None:
    spec = {"automatic": {"mode": "lastBlock", "ttl": "5m"}}
    assert place(conversation(_, H1), spec) == [None, None, None, None, None, "1h"]


def test_policy_automatic_is_skipped_when_slots_are_full() -> None:
    spec = {"automatic": {"mode": "lastBlock", "ttl": "5m"}, "maxBreakpoints": 2}
    assert place(conversation(M5, M5, _), spec) == [None, None, None, None, "5m", "5m", None]
    assert place(conversation(M5, _), spec) == [None, None, None, None, "5m", "5m"]


def test_policy_automatic_is_skipped_when_it_would_break_ttl_order() -> None:
    last_block_1h = {"automatic": {"mode": "lastBlock", "ttl": "1h"}}
    assert place(conversation(M5, _), last_block_1h) == [None, None, None, None, "5m", None]
    assert place(conversation(D24, _), last_block_1h) == [None, None, None, None, "24h", "1h"]
    # lastUserMessage 5m before a later explicit 1h breakpoint would break the order.
    last_user_5m = {"automatic": {"mode": "lastUserMessage", "ttl": "5m"}}
    assert place(conversation(H1), last_user_5m) == [None, None, None, None, "1h"]
    last_user_1h = {"automatic": {"mode": "lastUserMessage", "ttl": "1h"}}
    assert place(conversation(M5), last_user_1h) == [None, None, None, "1h", "5m"]


def test_policy_automatic_off_places_nothing() -> None:
    assert place(conversation(_, _), {"automatic": {"mode": "off", "ttl": "1h"}}) == [None] * 6


# --- prepare ties it together ----------------------------------------------------------------


def test_prepare_rejects_before_forwarding_and_maps_tiers_to_the_chain() -> None:
    policy = CachePolicy.from_spec({"ignorePrefixes": ["nonce:"]})
    body = {
        "system": [{"type": "text", "text": "nonce: 7"}, {"type": "text", "text": "s", "cache_control": H1}],
        "messages": [{"role": "user", "content": text_parts(_, M5)}],
    }
    prepared = prepare(body, "anthropic", policy)
    assert prepared.tiers == ["1h", None, "5m"]
    assert [b.path for b in prepared.hashed] == [
        "system[1]",
        "messages[0].content[0]",
        "messages[0].content[1]",
    ]
    assert prepared.tokens is None and prepared.chain is None
    assert prepared.forward["system"][1] == {"type": "text", "text": "s"}
    assert prepare(body, "anthropic", policy, forward_markers=True).forward is body
    with pytest.raises(InvalidCacheControl):
        prepare(one_message(M5, H1), "anthropic", policy)


def test_marker_on_a_whole_message_is_rejected_not_silently_forwarded() -> None:
    body = {"messages": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}]}
    with pytest.raises(InvalidCacheControl) as err:
        extract_blocks(body, "openai")
    assert err.value.rule == "placement"
    assert "messages[0]" in str(err.value)

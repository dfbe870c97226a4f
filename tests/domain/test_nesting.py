"""The one nesting limit (docs/design.md#request-bodies): exact at the boundary, safe at any depth, and for YAML
neither fooled nor stalled by shared nodes."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from promptcache.proxy.domain.nesting import MAX_DEPTH, TooDeep, deeper_than, load_yaml


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [0, 1, 2, MAX_DEPTH - 1, MAX_DEPTH])
def test_up_to_the_limit_passes(depth: int) -> None:
    assert not deeper_than(nested(depth))


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 200_000])
def test_past_the_limit_is_too_deep_at_any_depth(depth: int) -> None:
    assert deeper_than(nested(depth))


def test_an_alias_bomb_costs_its_distinct_nodes() -> None:
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9^9 leaves expanded
    started = time.monotonic()
    assert load_yaml("\n".join(lines)) is not None
    assert time.monotonic() - started < 2.0


def test_a_yaml_cycle_is_too_deep() -> None:
    with pytest.raises(TooDeep, match=f"^nested more than {MAX_DEPTH} levels deep$"):
        load_yaml("a: &a [*a]\n")
    with pytest.raises(TooDeep):
        load_yaml("a: " + "[" * 10_000 + "]" * 10_000)
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: [")

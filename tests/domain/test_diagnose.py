"""The cache-miss reasons, worked out from two chains (docs/design.md#cache-miss-diagnostics)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.diagnose import Diagnosis, Previous, diagnose
from promptcache.proxy.domain.policy import CachePolicy

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
POLICY = CachePolicy(min_prefix_tokens=10)


def chain(*blocks: tuple[str, str, int, str | None]) -> list[ChainBlock]:
    """(role, content, tokens of the block, tier) per block; hashes cumulative as the proxy's are."""
    running, total, out = hashlib.sha256(), 0, []
    for role, content, tokens, tier in blocks:
        running.update(f"{role}\0{content}".encode())
        total += tokens
        out.append(ChainBlock(running.copy().digest(), total, role, tier))
    return out


BASE = [("tool_definition", "t", 5, None), ("system", "s", 20, "1h"), ("user", "q", 10, "5m")]


def previous(blocks: list[ChainBlock], *, model: str = "m", ago: timedelta = timedelta(minutes=1),
             status: int = 200) -> Previous:
    return Previous(model, NOW - ago, status, [b.hash[:16] for b in blocks], [b.tokens for b in blocks],
                    [b.role for b in blocks], [b.tier for b in blocks])


def test_the_whole_written_prefix_read_is_a_hit() -> None:
    assert diagnose(chain(*BASE), 35, "m", previous(chain(*BASE)), POLICY, NOW) == Diagnosis(None, 0, 35)


@pytest.mark.parametrize(("changed", "expected"), [
    (0, Diagnosis("tools_changed", 35, 0)),
    (1, Diagnosis("system_changed", 35, 5)),
    (2, Diagnosis("messages_changed", 10, 25, 2)),
])
def test_the_first_difference_names_the_reason(changed: int, expected: Diagnosis) -> None:
    now = [(r, c + ("!" if i == changed else ""), t, m) for i, (r, c, t, m) in enumerate(BASE)]
    read = 25 if changed == 2 else 0
    assert diagnose(chain(*now), read, "m", previous(chain(*BASE)), POLICY, NOW) == expected


def test_a_shorter_request_differs_where_it_ends() -> None:
    assert diagnose(chain(*BASE[:2]), 25, "m", previous(chain(*BASE)), POLICY, NOW) == \
        Diagnosis("messages_changed", 10, 25, 2)


def test_an_identical_prefix_that_was_not_read() -> None:
    base = chain(*BASE)
    assert diagnose(base, 25, "m", previous(base, ago=timedelta(minutes=6)), POLICY, NOW) == \
        Diagnosis("expired", 10, 35)
    assert diagnose(base, 25, "m", previous(base), POLICY, NOW) == Diagnosis("unavailable", 10, 35)
    assert diagnose(base, 0, "m", previous(base, status=502), POLICY, NOW) == Diagnosis("unavailable", 35, 35)
    assert diagnose(base, None, "m", previous(base), POLICY, NOW) == Diagnosis("unavailable", 35, 35)
    short = chain(("system", "s", 3, "1h"), ("user", "q", 2, "5m"))
    assert diagnose(short, 0, "m", previous(short), POLICY, NOW) == Diagnosis("below_min_prefix", 5, 5)


def test_model_and_missing_previous() -> None:
    base = chain(*BASE)
    assert diagnose(base, 0, "m", previous(base, model="other"), POLICY, NOW) == Diagnosis("model_changed", 35, 0)
    assert diagnose(base, 0, "m", None, POLICY, NOW) == Diagnosis("previous_request_not_found")


def test_the_policys_automatic_breakpoint_counts_as_written() -> None:
    plain = chain(("system", "s", 20, None), ("user", "q", 10, None))
    automatic = CachePolicy(min_prefix_tokens=10, automatic_mode="lastUserMessage", automatic_ttl="5m")
    assert diagnose(plain, 0, "m", previous(plain), POLICY, NOW) == Diagnosis(None, 0, 30)  # nothing was written
    assert diagnose(plain, 0, "m", previous(plain), automatic, NOW) == Diagnosis("unavailable", 30, 30)

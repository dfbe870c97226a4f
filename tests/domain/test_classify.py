"""docs/design.md#classification: candidates, read, writes, creation segments, liveness, expiry sliding and episodes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptcache.proxy.domain.classify import NO_CACHE, ChainBlock, Classification, Read, Write, candidates, classify
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import reconcile
from promptcache.proxy.storage.memory import MemoryIndex, merge_write

from support.builders import T0, h, make_chain

MIN = timedelta(minutes=1)
HOUR = timedelta(hours=1)
NO_MIN = CachePolicy.from_spec({"minPrefixTokens": 0})


def live(block: int | str, tokens: int, tier: str = "5m", expires: Any = None) -> IndexEntry:
    return IndexEntry(h(block), tokens, tier, T0 - 10 * MIN, expires or T0 + MIN)


def index_of(*entries: IndexEntry) -> dict[bytes, IndexEntry]:
    return {e.prefix_hash: e for e in entries}


def long_chain(n: int, breakpoints: dict[int, str]) -> list[ChainBlock]:
    """``n`` blocks of 100 tokens each (cumulative 100, 200, …) with the given breakpoints."""
    return make_chain([(100 * (i + 1), breakpoints.get(i)) for i in range(n)])


# --- candidates and lookback ----------------------------------------------------------------


def test_candidates_are_the_breakpoint_and_the_lookback_window() -> None:
    chain = long_chain(40, {30: "5m"})
    assert candidates(chain, NO_MIN) == [h(i) for i in range(11, 31)]
    assert candidates(long_chain(40, {5: "5m"}), NO_MIN) == [h(i) for i in range(6)]
    small = CachePolicy.from_spec({"minPrefixTokens": 0, "lookbackBlocks": 3})
    assert candidates(chain, small) == [h(28), h(29), h(30)]


def test_candidates_are_deduplicated_and_in_chain_order() -> None:
    chain = long_chain(40, {25: "1h", 30: "5m"})
    assert candidates(chain, NO_MIN) == [h(i) for i in range(6, 31)]


def test_no_breakpoint_no_candidates_no_cache() -> None:
    chain = long_chain(5, {})
    assert candidates(chain, NO_MIN) == []
    result = classify(chain, index_of(live(2, 300)), NO_MIN, T0)
    assert result == Classification(None, (), {"5m": 0, "1h": 0, "24h": 0})
    assert result == NO_CACHE


def test_hit_exactly_lookback_minus_one_blocks_back() -> None:
    chain = long_chain(40, {30: "5m"})
    result = classify(chain, index_of(live(11, 1200)), NO_MIN, T0)
    assert result.read == Read(11, h(11), 1200, "5m", T0 + 5 * MIN)
    assert result.writes == (Write(30, h(30), 3100, "5m", T0 + 5 * MIN),)
    assert result.creation == {"5m": 1900, "1h": 0, "24h": 0}


def test_one_block_further_back_misses() -> None:
    chain = long_chain(40, {30: "5m"})
    result = classify(chain, index_of(live(10, 1100)), NO_MIN, T0)
    assert result.read is None
    assert result.writes == (Write(30, h(30), 3100, "5m", T0 + 5 * MIN),)
    assert result.creation == {"5m": 3100, "1h": 0, "24h": 0}


def test_custom_lookback_boundary() -> None:
    policy = CachePolicy.from_spec({"minPrefixTokens": 0, "lookbackBlocks": 3})
    chain = long_chain(10, {8: "5m"})
    assert classify(chain, index_of(live(6, 700)), policy, T0).read_tokens == 700
    assert classify(chain, index_of(live(5, 600)), policy, T0).read is None


def test_deepest_live_hit_wins() -> None:
    chain = long_chain(30, {25: "5m"})
    found = index_of(live(12, 1300), live(20, 2100), live(23, 2400, expires=T0 - MIN))
    result = classify(chain, found, NO_MIN, T0)
    assert result.read is not None
    assert (result.read.block, result.read.tokens) == (20, 2100)
    assert result.creation == {"5m": 2600 - 2100, "1h": 0, "24h": 0}


def test_entries_outside_the_chain_or_window_are_ignored_and_iterables_work() -> None:
    chain = long_chain(30, {25: "5m"})
    stranger = IndexEntry(h("elsewhere"), 999, "1h", T0, T0 + HOUR)
    result = classify(chain, [stranger, live(3, 400), live(8, 900)], NO_MIN, T0)
    assert result.read is not None
    assert result.read.block == 8


def test_read_tokens_are_the_stored_count() -> None:
    chain = long_chain(10, {8: "5m"})
    result = classify(chain, index_of(live(4, 480)), NO_MIN, T0)
    assert result.read_tokens == 480
    assert result.creation["5m"] == 900 - 480


# --- writes and creation segments ------------------------------------------------------------


# Block:       0      1      2       3      4      5
# Cumulative:  1000   1500   2000    3500   5000   5200
# Marker:      -      -      1h      -      5m     -
SEGMENTS = make_chain([(1000, None), (1500, None), (2000, "1h"), (3500, None), (5000, "5m"), (5200, None)])


def test_several_breakpoints_write_several_entries_with_per_tier_segments() -> None:
    result = classify(SEGMENTS, index_of(live(1, 1500, "1h")), NO_MIN, T0)
    assert result.read == Read(1, h(1), 1500, "1h", T0 + HOUR)
    assert result.writes == (
        Write(2, h(2), 2000, "1h", T0 + HOUR),
        Write(4, h(4), 5000, "5m", T0 + 5 * MIN),
    )
    assert result.creation == {"5m": 3000, "1h": 500, "24h": 0}
    assert (result.read_tokens, result.creation_tokens) == (1500, 3500)
    split = reconcile(5200, 0, result)
    assert (split.read, split.creation_tokens, split.uncached) == (1500, 3500, 200)


def test_cold_request_creates_from_zero() -> None:
    result = classify(SEGMENTS, {}, NO_MIN, T0)
    assert result.read is None
    assert [w.block for w in result.writes] == [2, 4]
    assert result.creation == {"5m": 3000, "1h": 2000, "24h": 0}


def test_read_at_a_breakpoint_writes_only_deeper_ones() -> None:
    result = classify(SEGMENTS, index_of(live(2, 2000, "1h")), NO_MIN, T0)
    assert result.read is not None and result.read.block == 2
    assert result.writes == (Write(4, h(4), 5000, "5m", T0 + 5 * MIN),)
    assert result.creation == {"5m": 3000, "1h": 0, "24h": 0}


def test_read_at_the_deepest_breakpoint_writes_nothing() -> None:
    result = classify(SEGMENTS, index_of(live(4, 5000), live(2, 2000, "1h")), NO_MIN, T0)
    assert result.read is not None and result.read.block == 4
    assert result.writes == ()
    assert result.creation == {"5m": 0, "1h": 0, "24h": 0}


def test_same_tier_breakpoints_add_up() -> None:
    chain = make_chain([(3000, "24h"), (4000, "5m"), (4500, "5m"), (7000, "5m")])
    result = classify(chain, {}, NO_MIN, T0)
    assert result.creation == {"5m": 4000, "1h": 0, "24h": 3000}
    assert [w.expires_at for w in result.writes] == [T0 + 24 * HOUR] + [T0 + 5 * MIN] * 3


# --- minPrefixTokens -------------------------------------------------------------------------


def test_short_breakpoint_is_neither_looked_up_nor_written() -> None:
    policy = CachePolicy.from_spec({})  # minPrefixTokens 1024
    chain = make_chain([(500, None), (800, "5m"), (900, None)])
    assert candidates(chain, policy) == []
    result = classify(chain, index_of(live(1, 800)), policy, T0)
    assert result == Classification(None, (), {"5m": 0, "1h": 0, "24h": 0})


def test_short_breakpoint_segment_folds_into_the_next_one() -> None:
    policy = CachePolicy.from_spec({"lookbackBlocks": 1})
    chain = make_chain([(700, "1h"), (1100, None), (2500, "5m")])
    assert candidates(chain, policy) == [h(2)]
    result = classify(chain, {}, policy, T0)
    assert result.writes == (Write(2, h(2), 2500, "5m", T0 + 5 * MIN),)
    assert result.creation == {"5m": 2500, "1h": 0, "24h": 0}


def test_min_prefix_tokens_boundary_is_inclusive() -> None:
    policy = CachePolicy.from_spec({"minPrefixTokens": 1024})
    assert [w.block for w in classify(make_chain([(1024, "5m")]), {}, policy, T0).writes] == [0]
    assert classify(make_chain([(1023, "5m")]), {}, policy, T0).writes == ()


# --- liveness, sliding, episodes -------------------------------------------------------------


def test_liveness_is_strict() -> None:
    chain = long_chain(3, {2: "5m"})
    at_expiry = IndexEntry(h(2), 300, "5m", T0 - 5 * MIN, T0)
    assert not at_expiry.live(T0)
    assert classify(chain, index_of(at_expiry), NO_MIN, T0).read is None
    just_before = IndexEntry(h(2), 300, "5m", T0 - 5 * MIN, T0 + timedelta(microseconds=1))
    assert classify(chain, index_of(just_before), NO_MIN, T0).read_tokens == 300


def test_read_slides_by_the_entrys_own_tier() -> None:
    # A 1h entry read through a 5m breakpoint gets now + 1h …
    chain = long_chain(4, {3: "5m"})
    result = classify(chain, index_of(live(3, 400, "1h")), NO_MIN, T0)
    assert result.read == Read(3, h(3), 400, "1h", T0 + HOUR)
    # … and a 5m entry read under a 1h breakpoint gets now + 5m.
    chain = long_chain(6, {5: "1h"})
    result = classify(chain, index_of(live(2, 300, "5m")), NO_MIN, T0)
    assert result.read == Read(2, h(2), 300, "5m", T0 + 5 * MIN)


def _request(index: MemoryIndex, scope: Scope, chain: list[ChainBlock], now: Any) -> Classification:
    result = classify(chain, index.lookup(scope, candidates(chain, NO_MIN)), NO_MIN, now)
    index.apply(scope, result, now)
    return result


def test_memory_index_episode_lifecycle() -> None:
    index = MemoryIndex()
    scope = Scope("alice", "m", "tok")
    chain = long_chain(3, {2: "5m"})

    first = _request(index, scope, chain, T0)
    assert first.read is None
    assert index.entry(scope, h(2)) == IndexEntry(h(2), 300, "5m", T0, T0 + 5 * MIN)

    second = _request(index, scope, chain, T0 + 2 * MIN)
    assert second.read_tokens == 300 and second.writes == ()
    assert index.entry(scope, h(2)) == IndexEntry(h(2), 300, "5m", T0, T0 + 7 * MIN)

    # Exactly one TTL after the last read: a miss, and the re-write starts a new episode.
    third = _request(index, scope, chain, T0 + 7 * MIN)
    assert third.read is None and [w.block for w in third.writes] == [2]
    assert index.entry(scope, h(2)) == IndexEntry(h(2), 300, "5m", T0 + 7 * MIN, T0 + 12 * MIN)


def test_memory_index_read_of_a_longer_tier_entry_slides_by_its_tier() -> None:
    index = MemoryIndex()
    scope = Scope("alice", "m", "tok")
    _request(index, scope, long_chain(3, {2: "1h"}), T0)
    _request(index, scope, long_chain(5, {4: "5m"}), T0 + 30 * MIN)
    assert index.entry(scope, h(2)) == IndexEntry(h(2), 300, "1h", T0, T0 + 90 * MIN)
    assert index.entry(scope, h(4)) == IndexEntry(h(4), 500, "5m", T0 + 30 * MIN, T0 + 35 * MIN)


def test_merge_write_episode_rules() -> None:
    write = Write(2, h(2), 300, "5m", T0 + 5 * MIN)
    assert merge_write(None, write, T0) == IndexEntry(h(2), 300, "5m", T0, T0 + 5 * MIN)
    expired = IndexEntry(h(2), 300, "5m", T0 - HOUR, T0)
    assert merge_write(expired, write, T0) == IndexEntry(h(2), 300, "5m", T0, T0 + 5 * MIN)
    running = IndexEntry(h(2), 300, "5m", T0 - 3 * MIN, T0 + 2 * MIN)
    assert merge_write(running, write, T0) == IndexEntry(h(2), 300, "5m", T0 - 3 * MIN, T0 + 5 * MIN)
    # A live entry that outlives the write is kept as it is.
    long_lived = IndexEntry(h(2), 300, "1h", T0 - 3 * MIN, T0 + 57 * MIN)
    assert merge_write(long_lived, write, T0) is long_lived


def test_apply_keeps_created_at_of_live_entries_and_resets_expired_ones() -> None:
    index = MemoryIndex()
    scope = Scope("bob", "m", "tok")
    index.apply(scope, Classification(None, (Write(0, h(0), 100, "5m", T0 + 5 * MIN),)), T0)
    later = T0 + 4 * MIN
    index.apply(scope, Classification(None, (Write(0, h(0), 100, "1h", later + HOUR),)), later)
    assert index.entry(scope, h(0)) == IndexEntry(h(0), 100, "1h", T0, later + HOUR)
    much_later = later + 2 * HOUR
    index.apply(scope, Classification(None, (Write(0, h(0), 100, "5m", much_later + 5 * MIN),)), much_later)
    assert index.entry(scope, h(0)) == IndexEntry(h(0), 100, "5m", much_later, much_later + 5 * MIN)


def test_memory_index_scopes_are_separate() -> None:
    index = MemoryIndex()
    chain = long_chain(3, {2: "5m"})
    _request(index, Scope("alice", "m", "tok"), chain, T0)
    for other in (Scope("bob", "m", "tok"), Scope("alice", "m2", "tok"), Scope("alice", "m", "tok2")):
        assert index.lookup(other, [h(2)]) == {}
        assert _request(index, other, chain, T0 + MIN).read is None


# --- properties ------------------------------------------------------------------------------

_tier = st.sampled_from([None, None, None, "5m", "1h", "24h"])


@st.composite
def chains(draw: Any, tag: str = "") -> list[ChainBlock]:
    increments = draw(st.lists(st.integers(0, 3000), min_size=1, max_size=30))
    total, spec = 0, []
    for inc in increments:
        total += inc
        spec.append((total, draw(_tier)))
    return make_chain(spec, tag)


_policy = st.builds(
    lambda lookback, minimum: CachePolicy.from_spec({"lookbackBlocks": lookback, "minPrefixTokens": minimum}),
    st.integers(1, 25),
    st.integers(0, 4096),
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains(), policy=_policy, data=st.data())
def test_property_read_plus_creation_plus_uncached_is_prompt(
    chain: list[ChainBlock], policy: CachePolicy, data: Any
) -> None:
    entries = []
    for block in chain:
        if data.draw(st.booleans()):
            offset = timedelta(seconds=data.draw(st.integers(-600, 600)))
            entries.append(
                IndexEntry(
                    block.hash, block.tokens, data.draw(st.sampled_from(["5m", "1h"])), T0 - HOUR, T0 + offset
                )
            )
    result = classify(chain, entries, policy, T0)
    prompt = chain[-1].tokens + data.draw(st.integers(0, 5000))
    split = reconcile(prompt, data.draw(st.integers(0, 1000)), result)

    assert split.cache_valid
    assert split.read + split.creation_tokens + split.uncached == prompt
    assert (split.read, dict(split.creation)) == (result.read_tokens, dict(result.creation))
    assert split.uncached >= 0 and all(v >= 0 for v in split.creation.values())
    # Writes are eligible breakpoints deeper than the read, in order, and the creation segments tile
    # the chain from the read to the last write.
    floor = result.read.block if result.read else -1
    assert [w.block for w in result.writes] == [
        i
        for i, b in enumerate(chain)
        if b.tier is not None and b.tokens >= policy.min_prefix_tokens and i > floor
    ]
    if result.writes:
        assert result.creation_tokens == result.writes[-1].tokens - result.read_tokens
    else:
        assert result.creation_tokens == 0
    if result.read is not None:
        assert result.read.hash in candidates(chain, policy)
        assert next(e for e in entries if e.prefix_hash == result.read.hash).live(T0)


_PRINCIPALS = ["alice", "bob", "carol"]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from(_PRINCIPALS),
            st.sampled_from(["m1", "m2"]),
            st.integers(0, 3),  # which conversation
            st.integers(1, 8),  # how many of its blocks
            st.integers(0, 400),  # seconds since the previous request
        ),
        min_size=1,
        max_size=40,
    )
)
def test_property_no_entry_is_ever_matched_across_scopes(
    requests: list[tuple[str, str, int, int, int]],
) -> None:
    # Every principal sends prefixes of the same few conversations, so a scope leak would show up as a read.
    conversations = [
        make_chain([(400 * (i + 1), "5m" if i % 2 else None) for i in range(8)], tag=f"c{c}-")
        for c in range(4)
    ]
    policy = CachePolicy.from_spec({"minPrefixTokens": 0, "lookbackBlocks": 4})
    index = MemoryIndex()
    written: dict[Scope, set[bytes]] = {}
    now = T0
    for principal, model, conv, length, gap in requests:
        now += timedelta(seconds=gap)
        scope = Scope(principal, model, "tok")
        chain = conversations[conv][:length]
        found = index.lookup(scope, candidates(chain, policy))
        result = classify(chain, found, policy, now)
        if result.read is not None:
            assert result.read.hash in written.get(scope, set())
            assert found[result.read.hash] == index.entry(scope, result.read.hash)
        index.apply(scope, result, now)
        written.setdefault(scope, set()).update(w.hash for w in result.writes)

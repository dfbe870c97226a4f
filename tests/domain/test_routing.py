"""Replica routing's choices (docs/design.md#replica-routing): the ring, affinity, bounded load and the fallbacks."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from promptcache.proxy.routing import Router, routing_key

URLS = ("http://a:8080/v1", "http://b:8080/v1", "http://c:8080/v1")


def keys(n: int) -> list[bytes]:
    return [routing_key(i.to_bytes(16, "big"), "tenant", None, None) for i in range(n)]


def test_the_ring_spreads_keys_evenly() -> None:
    router = Router(URLS)
    owners = Counter(router.owner(k).url for k in keys(30_000))
    assert set(owners) == set(URLS)
    assert all(abs(n / 30_000 - 1 / 3) < 0.06 for n in owners.values()), owners


def test_scaling_moves_only_the_keys_of_the_replica_that_left_or_came() -> None:
    router = Router(URLS)
    before = {k: router.owner(k).url for k in keys(5000)}
    router.update(URLS[:2])
    after = {k: router.owner(k).url for k in keys(5000)}
    assert all(after[k] == owner for k, owner in before.items() if owner != URLS[2])
    assert set(after.values()) == set(URLS[:2])
    router.update(URLS)
    assert {k: router.owner(k).url for k in keys(5000)} == before


def test_a_read_goes_to_its_entrys_replica_and_a_write_to_its_owner() -> None:
    router = Router(URLS)
    route = router.choose(URLS[1], None)
    assert (route.replica.url, route.decision, route.fallback) == (URLS[1], "read", None)
    key = keys(1)[0]
    route = router.choose(None, key)
    assert (route.replica, route.decision, route.fallback) == (router.owner(key), "write", None)
    router.replicas[URLS[0]].in_flight = router.replicas[URLS[1]].in_flight = 1
    route = router.choose(None, None)
    assert (route.replica.url, route.decision, route.fallback) == (URLS[2], "least_loaded", None)


def test_the_principal_cache_key_and_salt_join_the_ring_key() -> None:
    first = (7).to_bytes(16, "big")
    keyed = {routing_key(first, "t", None, None), routing_key(first, "u", None, None),
             routing_key(first, "t", "conv-1", None), routing_key(first, "t", None, "conv-1")}
    assert len(keyed) == 4
    assert routing_key(first, "t", "conv-1", "s") == routing_key(first, "t", "conv-1", "s")
    router = Router(URLS)
    assert len({router.owner(routing_key(first, "t", f"conv-{i}", None)).url for i in range(50)}) == 3
    assert len({router.owner(routing_key(first, f"tenant-{i}", None, None)).url for i in range(50)}) == 3


def test_an_entry_on_a_replica_that_is_gone_is_cold_for_routing() -> None:
    router = Router(URLS)
    router.update(URLS[1:])
    route = router.choose(URLS[0], None)
    assert route.decision == "least_loaded" and route.fallback == "unready" and route.replica.url in URLS[1:]


def test_a_failing_replica_is_passed_over_until_its_time_is_up() -> None:
    router = Router(URLS, failing_seconds=60)
    router.failed(router.replicas[URLS[0]])
    for _ in range(30):
        route = router.choose(URLS[0], None)
        assert route.fallback == "failing" and route.replica.url != URLS[0]
        assert router.choose(None, None).replica.url != URLS[0]
    router.replicas[URLS[0]].failing_until = 0.0
    assert router.choose(URLS[0], None).decision == "read"
    router.failed(router.replicas[URLS[1]])
    router.answered(router.replicas[URLS[1]])
    assert router.choose(URLS[1], None).decision == "read"


def test_replicas_that_failed_this_request_are_excluded() -> None:
    router = Router(URLS)
    tried = [router.replicas[URLS[0]], router.replicas[URLS[1]]]
    route = router.choose(URLS[0], None, exclude=tried)
    assert (route.replica.url, route.fallback) == (URLS[2], "failing")
    assert router.choose(None, keys(1)[0], exclude=list(router.replicas.values())).replica.url in URLS


def test_when_every_replica_is_failing_one_is_still_tried() -> None:
    router = Router(URLS, failing_seconds=60)
    for replica in router.replicas.values():
        router.failed(replica)
    assert router.choose(None, None).replica.url in URLS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.sampled_from([1.0, 1.25, 2.0])), max_size=120))
def test_no_replica_takes_a_request_above_its_bound(steps: list[tuple[bool, int, float]]) -> None:
    """Placements (a read of one replica's entry, or a write on the ring) and completions in any order: a replica
    takes a request only while it then holds at most ceil(c x in flight / replicas), c the imbalance bound."""
    router = Router(URLS)
    placed: list[str] = []
    for place, which, bound in steps:
        router.max_imbalance = bound
        if place or not placed:
            preferred = URLS[which % 3] if which % 2 else None
            route = router.choose(preferred, keys(which + 1)[which])
            route.replica.in_flight += 1
            placed.append(route.replica.url)
            total = sum(r.in_flight for r in router.replicas.values())
            assert route.replica.in_flight <= max(1, math.ceil(bound * total / 3))
        else:
            router.replicas[placed.pop(which % len(placed))].in_flight -= 1


def test_round_robin_and_random_ignore_the_index() -> None:
    router = Router(URLS, mode="roundRobin")
    assert [router.choose(URLS[0], None).replica.url for _ in range(6)] == [*URLS, *URLS]
    router.mode = "random"
    routes = [router.choose(URLS[0], keys(1)[0]) for _ in range(300)]
    assert {r.decision for r in routes} == {"random"} and len({r.replica.url for r in routes}) == 3


def test_one_replica_is_no_choice() -> None:
    router = Router(URLS[:1])
    assert not router.waits
    route = router.choose(URLS[0], None)
    assert (route.replica.url, route.decision) == (URLS[0], "single")
    assert Router(URLS).waits and not Router(URLS, mode="random").waits


def test_an_update_keeps_the_counts_of_replicas_that_stay() -> None:
    router = Router(URLS)
    router.replicas[URLS[0]].in_flight = 3
    stays = router.replicas[URLS[0]]
    router.update([URLS[0], "http://d:8080/v1"])
    assert router.replicas[URLS[0]] is stays and stays.in_flight == 3
    assert list(router.replicas) == [URLS[0], "http://d:8080/v1"]

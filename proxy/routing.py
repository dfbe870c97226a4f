"""docs/design.md#replica-routing: which of a model's upstream replicas a request goes to.

The prefix index already knows which prefix a request reads, for which tenant, until when; each entry also
remembers the replica that last computed it. Affinity sends a read to that replica, and a request that only
writes to the owner of its first written breakpoint on a consistent-hash ring (the principal, ``prompt_cache_key``
and ``cache_salt`` join the key), so a conversation's next turn finds its KV cache where its last one left it.
Load is bounded: no replica takes a request while it has more than ``max_imbalance`` times the average in flight;
an overloaded, failing or vanished preferred replica gives way to the least-loaded healthy one, counted by reason.
Routing is a hint for the engine's KV cache, never the bill: the bill follows the index whichever replica answers.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["affinity", "roundRobin", "random"]
MODES: tuple[Mode, ...] = ("affinity", "roundRobin", "random")
Fallback = Literal["unready", "failing", "overloaded"]
POINTS_PER_REPLICA = 64
"""Virtual points per replica on the ring: with a few replicas, keys split within a few % of evenly."""
FAILING_SECONDS = 5.0
"""How long a replica that refused a connection is passed over before it is tried again."""


def ring_point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def routing_key(first_write: bytes, principal: str, cache_key: str | None, salt: str | None) -> bytes:
    """The ring key of a request that writes: its first written breakpoint's hash and its principal, with the
    client's ``prompt_cache_key`` and the forwarded ``cache_salt`` when present (the engine keys its cache on the
    salt). The principal joins because entries are per tenant: without it every tenant sharing a system prompt
    would start on one replica, and its later turns follow their entries there."""
    parts = [first_write]
    for extra in (principal, cache_key, salt):
        parts.append(b"" if extra is None else extra.encode("utf-8", "surrogatepass"))
    return b"\x1f".join(parts)


@dataclass(eq=False)
class Replica:
    url: str
    in_flight: int = 0
    failing_until: float = 0.0

    def healthy(self, now: float) -> bool:
        return now >= self.failing_until


@dataclass(frozen=True)
class Route:
    replica: Replica
    decision: str
    """``read`` (the entry's replica), ``write`` (the ring's owner), ``least_loaded``, ``round_robin``,
    ``random``, or ``single`` (one replica, nothing to choose)."""
    fallback: Fallback | None = None
    """Why the preferred replica was passed over, when it was."""


@dataclass(eq=False)
class Router:
    """One model's replicas and their in-flight counts, in one proxy process (asyncio: no locks needed)."""

    urls: Sequence[str]
    mode: Mode = "affinity"
    max_imbalance: float = 1.25
    failing_seconds: float = FAILING_SECONDS
    replicas: dict[str, Replica] = field(init=False, default_factory=dict)
    _ring: list[tuple[int, str]] = field(init=False, default_factory=list)
    _turn: itertools.count[int] = field(init=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.update(self.urls)

    def update(self, urls: Iterable[str]) -> None:
        """Follow a new replica set; replicas that stay keep their counts and state."""
        wanted = list(dict.fromkeys(urls))
        if tuple(wanted) == tuple(self.urls) and self._ring:
            return  # every reload and tariff refresh re-applies the config: no ring to rebuild
        self.replicas = {url: self.replicas.get(url) or Replica(url) for url in wanted}
        self.urls = tuple(wanted)
        self._ring = sorted((ring_point(f"{url}#{i}".encode()), url)
                            for url in wanted for i in range(POINTS_PER_REPLICA))

    def owner(self, key: bytes) -> Replica:
        """The replica whose ring point follows ``key``'s."""
        i = bisect.bisect(self._ring, (ring_point(key), "")) % len(self._ring)
        return self.replicas[self._ring[i][1]]

    def choose(self, preferred: str | None, key: bytes | None, *, exclude: Sequence[Replica] = ()) -> Route:
        """Where a request goes. ``preferred`` is the replica of the entry it reads (None: it reads nothing),
        ``key`` its :func:`routing_key` when it writes; ``exclude`` holds replicas that already failed it."""
        now = time.monotonic()
        candidates = [r for r in self.replicas.values() if r not in exclude]
        if not candidates:
            candidates = list(self.replicas.values())
        healthy = [r for r in candidates if r.healthy(now)] or candidates
        if len(self.replicas) == 1:
            return Route(healthy[0], "single")
        if self.mode == "random":
            return Route(random.choice(healthy), "random")
        if self.mode == "roundRobin":
            return Route(healthy[next(self._turn) % len(healthy)], "round_robin")
        target: Replica | None = None
        decision = "least_loaded"
        if preferred is not None:
            target, decision = self.replicas.get(preferred), "read"
            if target is None:
                return self._least_loaded(healthy, "unready")
        elif key is not None:
            target, decision = self.owner(key), "write"
        if target is None:
            return self._least_loaded(healthy, None)
        if target in exclude or not target.healthy(now):
            return self._least_loaded(healthy, "failing")
        if target.in_flight + 1 > self.capacity(len(healthy)):
            return self._least_loaded(healthy, "overloaded")
        return Route(target, decision)

    @property
    def waits(self) -> bool:
        """Whether a request waits for its lookup before it is sent: only affinity, and only with a choice."""
        return self.mode == "affinity" and len(self.replicas) > 1

    def capacity(self, replicas: int) -> int:
        """The most requests one replica may have in flight, counting the one being placed."""
        total = sum(r.in_flight for r in self.replicas.values()) + 1
        return max(1, math.ceil(self.max_imbalance * total / max(replicas, 1)))

    def _least_loaded(self, healthy: Sequence[Replica], fallback: Fallback | None) -> Route:
        fewest = min(r.in_flight for r in healthy)
        return Route(random.choice([r for r in healthy if r.in_flight == fewest]), "least_loaded", fallback)

    def failed(self, replica: Replica) -> None:
        """The replica refused or dropped a connection: pass it over for a while."""
        replica.failing_until = time.monotonic() + self.failing_seconds

    def answered(self, replica: Replica) -> None:
        replica.failing_until = 0.0

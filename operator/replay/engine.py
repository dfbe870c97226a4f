"""Replay (docs/design.md#replay): what recorded traffic would have cost under a proposed policy.

Requests go in (ts, id) order through the proxy's own classification (``classify``), against an
in-memory index per scope, with the proposed tiers, multipliers, limits and automatic placement,
and are priced by the proxy's pricing formula, computed exactly in integers. Only per-cluster sums
and the live index entries are kept, so memory does not grow with the log; the bootstrap reweights
those clusters.
"""

from __future__ import annotations

import builtins
import gc
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from fractions import Fraction
from typing import Any

import numpy as np

from promptcache.operator.replay.bootstrap import Totals, resample
from promptcache.operator.replay.misses import (
    BELOW_MINIMUM,
    HORIZON,
    REASONS,
    REJECTED,
    UNMARKED,
    Memory,
    Recorded,
    Starts,
    forget,
    from_history,
    new_starts,
)
from promptcache.operator.replay.proposal import UNITS, Proposal
from promptcache.proxy.domain.classify import classify_marked
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.domain.markers import automatic_target, out_of_order, place_automatic
from promptcache.proxy.domain.pricing import Rates, Tariff, reconcile
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.memory import MemoryIndex
from promptcache.proxy.storage.requestlog import LoggedRequest

FEW_CLUSTERS = 30
MISS_COLUMNS = 2 * len(REASONS)
# Columns of the per-cluster sums the bootstrap resamples (simulate() writes them by number).
BASELINE, PROJECTED, LIST, PROMPT, READ, HITS, REQUESTS = range(7)
COLUMNS = 7


class ReplayError(ValueError):
    """The input or the proposal cannot be replayed; the message says why."""


@dataclass
class _Totals:
    baseline: Decimal = Decimal(0)
    projected: Decimal = Decimal(0)
    list: Decimal = Decimal(0)
    prompt: int = 0
    read: int = 0
    hits: int = 0
    requests: int = 0
    creation_cost: dict[str, Decimal] = field(default_factory=lambda: {t: Decimal(0) for t in TIERS})
    misses: builtins.list[int] = field(default_factory=lambda: [0] * MISS_COLUMNS)
    """Per reason, requests that read nothing: recorded (the first len(REASONS)), then projected."""

    def add(self, other: _Totals) -> None:
        self.baseline += other.baseline
        self.projected += other.projected
        self.list += other.list
        self.prompt += other.prompt
        self.read += other.read
        self.hits += other.hits
        self.requests += other.requests
        for tier in TIERS:
            self.creation_cost[tier] += other.creation_cost[tier]
        self.misses = [a + b for a, b in zip(self.misses, other.misses, strict=True)]


@dataclass
class Simulation:
    overall: _Totals = field(default_factory=_Totals)
    per_model: dict[str, _Totals] = field(default_factory=dict)
    clusters: dict[str, list[float]] = field(default_factory=dict)
    skipped_status: int = 0
    without_chain: int = 0
    over_limit: int = 0
    order_violations: int = 0
    duplicates: int = 0
    """Identical copies of a request dropped by ``--dedupe`` (counted by the reader, not the engine)."""

    @property
    def read(self) -> int:
        """Every request the log gave, simulated or skipped."""
        return self.overall.requests + self.skipped_status + self.without_chain


def _cluster(request: LoggedRequest, unit: str) -> str:
    if unit == "principal":
        return request.principal
    if unit == "day":
        return request.ts.date().isoformat()
    return request.id


class _Index(MemoryIndex):
    """The memory index as replay drives it.

    ``classify`` gets a scope's entries whole, not a lookup of its candidates: it reads only the
    candidates, so the result is the same without building the lookup. Entries that expired before
    ``now`` are swept from time to time: an expired entry and no entry classify and merge alike, and
    the log only moves forward, so memory follows the live cache rather than the length of the log.
    A swept entry leaves its bare expiry behind for :data:`~.misses.HORIZON`, to explain misses.
    """

    def __init__(self) -> None:
        super().__init__()
        self._expired: dict[Scope, dict[bytes, datetime]] = {}

    def entries(self, scope: Scope) -> dict[bytes, IndexEntry]:
        entries = self._scopes.get(scope)
        if entries is None:
            entries = self._scopes[scope] = {}
        return entries

    def memory(self, scope: Scope) -> Memory:
        """The expiry of a prefix hash's entry, live or swept (the entry, when there is one, decides)."""
        entries, expired = self._scopes.get(scope, {}), self._expired.get(scope, {})

        def memory(prefix_hash: bytes) -> list[datetime]:
            entry = entries.get(prefix_hash)
            if entry is not None:
                return [entry.expires_at]
            expires = expired.get(prefix_hash)
            return [] if expires is None else [expires]

        return memory

    def sweep(self, now: datetime) -> None:
        gone = now - HORIZON
        for scope, entries in self._scopes.items():
            expired = self._expired.setdefault(scope, {})
            for h, e in [(h, e) for h, e in entries.items() if not e.live(now)]:
                expired[h] = e.expires_at
                del entries[h]
            for h in [h for h, expires in expired.items() if expires < gone]:
                del expired[h]


SWEEP_EVERY = 100_000
"""Requests between two sweeps of expired index entries."""

GroupKey = tuple[str, Decimal, Decimal]
"""A model at the prices its requests were billed at: one tariff under the proposal."""
# A cell's columns: one cluster's requests of one group, summed exactly (PROMPT to REQUESTS as in a cluster's row).
_BASELINE, _PROJECTED, _LIST, _RECORDED_LIST = BASELINE, PROJECTED, LIST, COLUMNS
PRECISION = 80
"""Digits of a Decimal sum; one that would need more is an error, never rounded (see :func:`exact`)."""


@contextmanager
def exact() -> Iterator[None]:
    """Decimal arithmetic that raises rather than rounds: money is summed exactly or not at all, so sums do not
    depend on their order (a shard's sums add up to a single run's)."""
    try:
        with localcontext(Context(prec=PRECISION, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])):
            yield
    except Inexact:
        raise ReplayError(f"a cost sum needs more than {PRECISION} digits; replay sums money exactly or not at "
                          "all") from None


@dataclass
class Partial:
    """Exact sums of part of a log: what a shard of scopes gives, and what shards add up to.

    Money stays exact (recorded costs as Decimal, projected ones as integer numerators over their
    group's scale) and floats are made once, in :func:`finish`; so the sums, and the result, do not
    depend on the order requests were added in, or on how the scopes were split between processes.
    """

    cells: dict[tuple[str, GroupKey], list[Any]] = field(default_factory=dict)
    """Per (cluster, group): baseline, projected and list numerators, prompt, read, hits, requests, recorded list."""
    creation: dict[GroupKey, dict[str, int]] = field(default_factory=dict)
    """Per group, each tier's cache write cost numerator."""
    misses: dict[GroupKey, list[int]] = field(default_factory=dict)
    """Per group, requests that read nothing by reason: recorded, then projected (see :mod:`.misses`)."""
    skipped_status: int = 0
    without_chain: int = 0
    over_limit: int = 0
    order_violations: int = 0

    def add(self, other: Partial) -> None:
        for key, cell in other.cells.items():
            mine = self.cells.get(key)
            if mine is None:
                self.cells[key] = list(cell)
            else:
                for column, value in enumerate(cell):
                    mine[column] += value
        for group, written in other.creation.items():
            creation = self.creation.setdefault(group, dict.fromkeys(TIERS, 0))
            for tier, value in written.items():
                creation[tier] += value
        for group, counts in other.misses.items():
            mine_counts = self.misses.setdefault(group, [0] * MISS_COLUMNS)
            for column, value in enumerate(counts):
                mine_counts[column] += value
        self.skipped_status += other.skipped_status
        self.without_chain += other.without_chain
        self.over_limit += other.over_limit
        self.order_violations += other.order_violations


def _rates(group: GroupKey, proposal: Proposal) -> Rates:
    model, recorded_in, recorded_out = group
    inp, out = proposal.price_overrides.get(model, (recorded_in, recorded_out))
    try:
        return Tariff.for_policy(model, inp, out, proposal.policy).rates
    except ValueError as exc:
        raise ReplayError(str(exc)) from None


def simulate(requests: Iterable[LoggedRequest], proposal: Proposal, unit: str = "principal",
             progress: Callable[[int], None] | None = None) -> Simulation:
    """Run the log through the proposal. The log must be in (ts, id) order, as exports are."""
    return finish(accumulate(requests, proposal, unit, progress), proposal)


def accumulate(requests: Iterable[LoggedRequest], proposal: Proposal, unit: str = "principal",
               progress: Callable[[int], None] | None = None) -> Partial:
    """The exact sums of ``requests`` (in (ts, id) order, at least within each scope) under the proposal."""
    with exact(), uncollected():
        return _accumulate(requests, proposal, unit, progress)


@contextmanager
def uncollected() -> Iterator[None]:
    """The cyclic garbage collector paused while requests are read and simulated.

    Neither the reader nor the engine makes reference cycles (reference counting frees everything), but
    the collector still walks the live index entries every few thousand allocations: about 7% of a run
    (bench/replay.py). Memory stays as flat without it; any cycle made meanwhile is collected after.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _accumulate(requests: Iterable[LoggedRequest], proposal: Proposal, unit: str,
                progress: Callable[[int], None] | None) -> Partial:
    if unit not in UNITS:
        raise ReplayError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    policy = proposal.policy
    index = _Index()
    partial = Partial()
    cells = partial.cells
    groups: dict[GroupKey, tuple[Rates, dict[str, int], list[int]]] = {}
    # Each scope with its entries, its chains' starts and its recorded cache, by its names: building a Scope
    # costs more than finding it.
    scopes: dict[tuple[str, str, str], tuple[Scope, dict[bytes, IndexEntry], Starts, Recorded]] = {}
    projected_reasons = len(REASONS)
    # Per request, only markers can change: a recorded tier maps (once per proposal, not per block)
    # and automatic placement may add one. A chain whose markers all stay is classified as recorded.
    projected_tier: dict[str | None, str | None] = {tier: proposal.tiers([tier])[0] for tier in TIERS}
    automatic = policy.automatic_ttl is not None and policy.automatic_mode != "off"
    max_breakpoints = policy.max_breakpoints
    by_principal = unit == "principal"
    previous: tuple[Any, str] | None = None
    for n, request in enumerate(requests, 1):
        key = (request.ts, request.id)
        if previous is not None and key < previous:
            raise ReplayError(f"request {request.id} is out of (ts, id) order")
        previous = key
        if n % 10_000 == 0:
            if progress is not None:
                progress(n)
            if n % SWEEP_EVERY == 0:
                index.sweep(request.ts)
                for _, _, starts, recorded_cache in scopes.values():
                    forget(request.ts, starts, recorded_cache.touched, recorded_cache.starts)
        if not 200 <= request.status < 300:
            partial.skipped_status += 1
            continue
        recorded = request.chain
        if not recorded:
            partial.without_chain += 1
            continue
        marked = recorded_marked = [i for i, b in enumerate(recorded) if b.tier is not None]
        # Whether every marker stays as recorded.
        kept = len(marked) <= max_breakpoints
        breakpoints: list[tuple[int, str]] = []
        for i in marked if kept else ():
            tier = projected_tier.get(recorded[i].tier)
            if tier is None or tier != recorded[i].tier:
                kept = False
                break
            breakpoints.append((i, tier))
        target = automatic_target(recorded, policy.automatic_mode) if automatic else None
        if not kept or (target is not None and recorded[target].tier is None):
            # A marker maps or drops, or one is placed (place_automatic leaves a marked target alone): only
            # marked positions and the automatic target can differ from the recording.
            tiers = [b.tier for b in recorded]
            for i in marked:
                tier = tiers[i]
                tiers[i] = projected_tier.get(tier) or proposal.tiers([tier])[0]
            if len(marked) > max_breakpoints:
                partial.over_limit += 1
                for i in marked[max_breakpoints:]:
                    tiers[i] = None
                marked = marked[:max_breakpoints]
            place_automatic(tiers, target, policy)
            if target is not None and tiers[target] is not None and target not in marked:
                marked = sorted([*marked, target])
            breakpoints = [(i, tier) for i in marked if (tier := tiers[i]) is not None]
        rejected = len(recorded_marked) > max_breakpoints
        if len(breakpoints) > 1 and out_of_order([tier for _, tier in breakpoints]) is not None:
            partial.order_violations += 1
            rejected = True
        names = (request.principal, request.model, request.tokenizer_version)
        known = scopes.get(names)
        if known is None:
            scope = Scope(*names)
            known = scopes[names] = (scope, index.entries(scope), new_starts(), Recorded())
        scope, entries, starts, recorded_cache = known
        ts = request.ts
        result = classify_marked(recorded, breakpoints, entries, policy, ts)
        split = reconcile(request.prompt_tokens, request.completion_tokens, result)
        recorded_miss = recorded_cache.reason(recorded, recorded_marked, request.read_tokens,
                                              sum(request.creation_tokens.values()), ts)
        projected_miss: int | None = None
        if split.read == 0:
            if rejected:
                projected_miss = REJECTED
            elif not breakpoints:
                projected_miss = UNMARKED
            elif result.read is None and not result.writes:  # classify writes every breakpoint it may cache
                projected_miss = BELOW_MINIMUM
            else:
                projected_miss = from_history(recorded, index.memory(scope), starts, ts)
        if split.cache_valid:
            index.apply(scope, result, ts)
            for write in result.writes:
                starts[write.tier][recorded[0].hash] = ts

        group_key = (request.model, request.input_per_mtok, request.output_per_mtok)
        group = groups.get(group_key)
        if group is None:
            group = groups[group_key] = (_rates(group_key, proposal), dict.fromkeys(TIERS, 0), [0] * MISS_COLUMNS)
            partial.creation[group_key] = group[1]
            partial.misses[group_key] = group[2]
        rates, creation, missed = group
        if recorded_miss is not None:
            missed[recorded_miss] += 1
        if projected_miss is not None:
            missed[projected_reasons + projected_miss] += 1
        cluster = request.principal if by_principal else _cluster(request, unit)
        cell = cells.get((cluster, group_key))
        if cell is None:
            cell = cells[cluster, group_key] = [Decimal(0), 0, 0, 0, 0, 0, 0, Decimal(0)]
        read = split.read
        # The proxy's bill (pricing.cost) as its exact numerator over rates.scale.
        cell[0] += request.billed_cost  # _BASELINE
        cell[1] += rates.cost(split, creation)  # _PROJECTED
        cell[2] += rates.list_cost(split)  # _LIST
        cell[3] += split.prompt  # PROMPT
        cell[4] += read  # READ
        cell[5] += read > 0  # HITS
        cell[6] += 1  # REQUESTS
        cell[7] += request.list_cost  # _RECORDED_LIST
    return partial


def finish(partial: Partial, proposal: Proposal) -> Simulation:
    """The simulation's totals and per-cluster sums (floats, for the bootstrap) from exact sums.

    Each float is the correctly rounded value of an exact sum, whichever way the sum was split.
    """
    sim = Simulation(skipped_status=partial.skipped_status, without_chain=partial.without_chain,
                     over_limit=partial.over_limit, order_violations=partial.order_violations)
    rates = {group: _rates(group, proposal) for group in partial.creation}
    projected: dict[GroupKey, int] = dict.fromkeys(rates, 0)
    by_cluster: dict[str, list[tuple[list[Any], int]]] = {}
    with exact():
        for (cluster, group), cell in partial.cells.items():
            by_cluster.setdefault(cluster, []).append((cell, rates[group].scale))
            projected[group] += cell[_PROJECTED]
            totals = sim.per_model.get(group[0])
            if totals is None:
                totals = sim.per_model[group[0]] = _Totals()
            totals.baseline += cell[_BASELINE]
            totals.list += cell[_RECORDED_LIST]
            totals.prompt += cell[PROMPT]
            totals.read += cell[READ]
            totals.hits += cell[HITS]
            totals.requests += cell[REQUESTS]
        sim.clusters = {cluster: _row(cells) for cluster, cells in by_cluster.items()}
        for group, group_rates in rates.items():
            totals = sim.per_model[group[0]]
            counts = partial.misses.get(group, [0] * MISS_COLUMNS)
            totals.misses = [a + b for a, b in zip(totals.misses, counts, strict=True)]
            totals.projected += group_rates.decimal(projected[group])
            for tier, written in partial.creation[group].items():
                totals.creation_cost[tier] += group_rates.decimal(written)
        for totals in sim.per_model.values():
            sim.overall.add(totals)
    return sim


def _row(cells: list[tuple[list[Any], int]]) -> list[float]:
    """A cluster's row of floats from its cells (one per group it has requests in)."""
    if len(cells) == 1:
        (cell, scale), = cells
        return [float(cell[_BASELINE]), cell[_PROJECTED] / scale, cell[_LIST] / scale,
                *map(float, cell[PROMPT:REQUESTS + 1])]
    row = [float(sum(cell[_BASELINE] for cell, _ in cells)),
           float(sum(Fraction(cell[_PROJECTED], scale) for cell, scale in cells)),
           float(sum(Fraction(cell[_LIST], scale) for cell, scale in cells))]
    return row + [float(sum(cell[column] for cell, _ in cells)) for column in (PROMPT, READ, HITS, REQUESTS)]


def _ratio(a: Decimal | int, b: Decimal | int, places: str) -> str:
    if not b:
        return "0"
    return str((Decimal(a) / Decimal(b)).quantize(Decimal(places)))


def _money(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.00000001")).normalize(), "f") if value else "0"


def _summary(t: _Totals) -> dict[str, Any]:
    savings = t.baseline - t.projected
    return {
        "requests": t.requests,
        "baseline_cost": _money(t.baseline),
        "projected_cost": _money(t.projected),
        "list_cost": _money(t.list),
        "savings": _money(savings),
        "savings_pct": _ratio(100 * savings, t.baseline, "0.0001"),
        "read_token_ratio": _ratio(t.read, t.prompt, "0.000001"),
        "hit_rate": _ratio(t.hits, t.requests, "0.000001"),
        "creation_cost": {tier: _money(v) for tier, v in t.creation_cost.items()},
        "misses": {"recorded": dict(zip(REASONS, t.misses[:len(REASONS)], strict=True)),
                   "projected": dict(zip(REASONS, t.misses[len(REASONS):], strict=True))},
    }


STATISTICS = {
    "projected_cost": lambda x: x[:, PROJECTED],
    "savings": lambda x: x[:, BASELINE] - x[:, PROJECTED],
    "savings_pct": lambda x: 100.0 * (x[:, BASELINE] - x[:, PROJECTED]) / x[:, BASELINE],
    "hit_rate": lambda x: x[:, HITS] / x[:, REQUESTS],
    "read_token_ratio": lambda x: x[:, READ] / x[:, PROMPT],
}
_PRECISION = {"projected_cost": "0.00000001", "savings": "0.00000001", "savings_pct": "0.0001",
              "hit_rate": "0.000001", "read_token_ratio": "0.000001"}


def _bound(value: float, places: str, rounding: str) -> str:
    """An interval end, rounded outwards: the resamples sum floats, so a degenerate interval's float
    can sit a hair off the exact point, and nearest rounding could then leave the point outside."""
    if not np.isfinite(value):
        return "NaN"
    return format(Decimal(repr(value)).quantize(Decimal(places), rounding=rounding).normalize() + 0, "f")


@dataclass(frozen=True)
class Report:
    result: dict[str, Any]
    savings_replicates: Any
    """The bootstrap distribution of savings, for plotting."""


def report(sim: Simulation, proposal: Proposal, *, seed: int = 0, iterations: int = 2000, unit: str = "principal",
           confidence: float = 0.95) -> Report:
    """The §9 result: summary, intervals, per-model figures, caveats, params and digest."""
    if sim.overall.requests == 0:
        raise ReplayError("no 2xx requests with prefix chains in the selected window")
    clusters: Totals = np.array([sim.clusters[k] for k in sorted(sim.clusters)], dtype=np.float64)
    boot = resample(clusters, STATISTICS, iterations, confidence, seed)
    caveats = []
    if len(sim.clusters) < FEW_CLUSTERS:
        caveats.append(f"only {len(sim.clusters)} {unit} clusters: the intervals are rough")
    if sim.without_chain:
        caveats.append(f"{sim.without_chain} requests had no prefix chain and were left out")
    if sim.duplicates:
        caveats.append(f"{sim.duplicates} identical copies of requests were dropped (--dedupe)")
    if sim.skipped_status:
        caveats.append(f"{sim.skipped_status} non-2xx requests were skipped")
    if sim.over_limit:
        caveats.append(f"{sim.over_limit} requests had more markers than maxBreakpoints (the proxy would reject "
                       "them); their extra markers were dropped")
    if sim.order_violations:
        caveats.append(f"{sim.order_violations} requests have a longer TTL after a shorter one under the proposal "
                       "(the proxy would reject them)")
    if proposal.policy.ignore_prefixes:
        caveats.append("ignorePrefixes cannot be re-applied to recorded chains; the recording's own applies")
    result: dict[str, Any] = {
        "summary": _summary(sim.overall),
        "intervals": {name: [_bound(lo, _PRECISION[name], ROUND_FLOOR), _bound(hi, _PRECISION[name], ROUND_CEILING)]
                      for name, (lo, hi) in boot.intervals.items()},
        "per_model": [{"model": model, **_summary(t)} for model, t in sorted(sim.per_model.items())],
        "caveats": caveats,
        "params": {
            "policy": dict(proposal.spec),
            "tier_override": dict(proposal.tier_override),
            "pricing_overrides": {m: {"inputPerMTok": str(i), "outputPerMTok": str(o)}
                                  for m, (i, o) in sorted(proposal.price_overrides.items())},
            "seed": seed, "iterations": iterations, "unit": unit, "confidence": confidence,
        },
    }
    result["digest"] = hashlib.sha256(canonical(result).encode()).hexdigest()
    return Report(result, boot.replicates["savings"])


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

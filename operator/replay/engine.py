"""Replay (SPEC §9): what recorded traffic would have cost under a proposed policy.

Requests go in (ts, id) order through the proxy's own classification (``classify``), against an
in-memory index per scope, with the proposed tiers, multipliers, limits and automatic placement,
and are priced by the proxy's pricing formula, computed exactly in integers. Only per-cluster sums
and the live index entries are kept, so memory does not grow with the log; the bootstrap reweights
those clusters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, overload

import numpy as np

from promptcache.operator.replay.bootstrap import Totals, resample
from promptcache.proxy.domain.classify import ChainBlock, classify_marked
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.domain.markers import automatic_target, place_automatic
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Tariff, reconcile
from promptcache.proxy.domain.tiers import TIER_DURATIONS, TIERS
from promptcache.proxy.storage.memory import MemoryIndex
from promptcache.proxy.storage.requestlog import LoggedRequest

UNITS = ("principal", "day", "request")
FEW_CLUSTERS = 30
# Columns of the per-cluster sums the bootstrap resamples (simulate() writes them by number).
BASELINE, PROJECTED, LIST, PROMPT, READ, HITS, REQUESTS = range(7)
COLUMNS = 7


class ReplayError(ValueError):
    """The input or the proposal cannot be replayed; the message says why."""


@dataclass(frozen=True)
class Proposal:
    policy: CachePolicy
    spec: Mapping[str, Any] = field(default_factory=dict)
    """The policy as given (camelCase), echoed in the result's params."""
    tier_override: Mapping[str, str] = field(default_factory=dict)
    price_overrides: Mapping[str, tuple[Decimal, Decimal]] = field(default_factory=dict)

    def tiers(self, recorded: Iterable[str | None]) -> list[str | None]:
        """Recorded tiers mapped by the override, then onto an enabled tier (else the default)."""
        out: list[str | None] = []
        for tier in recorded:
            if tier is not None:
                tier = self.tier_override.get(tier, tier)
                if tier not in self.policy.enabled_ttls:
                    tier = self.policy.default_ttl
            out.append(tier)
        return out


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


@dataclass
class Simulation:
    overall: _Totals = field(default_factory=_Totals)
    per_model: dict[str, _Totals] = field(default_factory=dict)
    clusters: dict[str, list[float]] = field(default_factory=dict)
    skipped_status: int = 0
    without_chain: int = 0
    over_limit: int = 0
    order_violations: int = 0


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
    """

    def entries(self, scope: Scope) -> dict[bytes, IndexEntry]:
        entries = self._scopes.get(scope)
        if entries is None:
            entries = self._scopes[scope] = {}
        return entries

    def sweep(self, now: datetime) -> None:
        for entries in self._scopes.values():
            for h in [h for h, e in entries.items() if not e.live(now)]:
                del entries[h]


SWEEP_EVERY = 100_000
"""Requests between two sweeps of expired index entries."""


def _coefficient(*factors: Decimal) -> tuple[int, int]:
    """The exact product of ``factors`` as (integer, exponent of ten)."""
    value, exponent = 1, 0
    for factor in factors:
        sign, digits, exp = factor.as_tuple()
        if not isinstance(exp, int):
            raise ReplayError(f"prices and multipliers must be finite, got {factor}")
        value *= (-1) ** sign * int("".join(map(str, digits)))
        exponent += exp
    return value, exponent


@dataclass(frozen=True)
class _Prices:
    """A tariff as integers over one power of ten, so a request's cost is an exact integer.

    ``pricing.cost`` is ``(uncached·in + read·in·readMult + Σ creation_t·in·writeMult_t + completion·out)
    / 10⁶``: with each coefficient an integer over ``10**k``, the cost is ``numerator / scale`` with
    ``scale = 10**(k + 6)``, exactly. Numerators sum exactly, and ``numerator / scale`` is the correctly
    rounded float, the same float as ``float(cost(...))``; ``pricing.list_cost`` likewise.
    """

    exponent: int
    scale: int
    input: int
    read: int
    write: Mapping[str, int]
    output: int

    @classmethod
    def of(cls, tariff: Tariff) -> _Prices:
        inp = tariff.input_per_mtok
        terms = {"input": _coefficient(inp), "read": _coefficient(inp, tariff.read_multiplier),
                 "output": _coefficient(tariff.output_per_mtok),
                 **{tier: _coefficient(inp, tariff.write_multipliers[tier]) for tier in TIERS}}
        k = max(0, *(-exp for _, exp in terms.values()))
        scaled = {name: value * 10 ** (exp + k) for name, (value, exp) in terms.items()}
        return cls(k + 6, 10 ** (k + 6), scaled["input"], scaled["read"], {t: scaled[t] for t in TIERS},
                   scaled["output"])

    def decimal(self, numerator: int) -> Decimal:
        return Decimal(f"{numerator}E-{self.exponent}")


class _Group:
    """Requests of one model at one set of prices: their exact projected and creation cost numerators."""

    __slots__ = ("creation", "prices", "projected", "totals")

    def __init__(self, prices: _Prices, totals: _Totals) -> None:
        self.prices = prices
        self.totals = totals
        self.projected = 0
        self.creation = dict.fromkeys(TIERS, 0)


class _Roles(Sequence[str]):
    """A chain's roles, read on demand: automatic placement looks at a few, from the end."""

    __slots__ = ("_chain",)

    def __init__(self, chain: Sequence[ChainBlock]) -> None:
        self._chain = chain

    def __len__(self) -> int:
        return len(self._chain)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[str]: ...

    def __getitem__(self, i: int | slice) -> str | Sequence[str]:
        if isinstance(i, slice):
            return [b.role for b in self._chain[i]]
        return self._chain[i].role


def simulate(requests: Iterable[LoggedRequest], proposal: Proposal, unit: str = "principal",
             progress: Callable[[int], None] | None = None) -> Simulation:
    """Run the log through the proposal. The log must be in (ts, id) order, as exports are."""
    if unit not in UNITS:
        raise ReplayError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    policy = proposal.policy
    index = _Index()
    sim = Simulation()
    groups: dict[tuple[str, Decimal, Decimal], _Group] = {}
    # Per request, only markers can change: a recorded tier maps (once per proposal, not per block)
    # and automatic placement may add one. A chain whose markers all stay is classified as recorded.
    projected_tier: dict[str | None, str | None] = {tier: proposal.tiers([tier])[0] for tier in TIERS}
    automatic = policy.automatic_ttl is not None and policy.automatic_mode != "off"
    max_breakpoints = policy.max_breakpoints
    clusters = sim.clusters
    by_principal = unit == "principal"
    previous: tuple[Any, str] | None = None
    for n, request in enumerate(requests, 1):
        key = (request.ts, request.id)
        if previous is not None and key < previous:
            raise ReplayError(f"request {request.id} is out of (ts, id) order; replay needs a sorted log "
                              "(as `promptcache log export` writes it)")
        previous = key
        if n % 10_000 == 0:
            if progress is not None:
                progress(n)
            if n % SWEEP_EVERY == 0:
                index.sweep(request.ts)
        if not 200 <= request.status < 300:
            sim.skipped_status += 1
            continue
        recorded = request.chain
        if not recorded:
            sim.without_chain += 1
            continue
        marked = [i for i, b in enumerate(recorded) if b.tier is not None]
        # Whether every marker stays as recorded, and (if so) whether a longer TTL follows a shorter one.
        kept = len(marked) <= max_breakpoints
        longest = None
        disordered = False
        breakpoints: list[tuple[int, str]] = []
        for i in marked if kept else ():
            tier = projected_tier.get(recorded[i].tier)
            if tier is None or tier != recorded[i].tier:
                kept = False
                break
            breakpoints.append((i, tier))
            length = TIER_DURATIONS[tier]
            disordered = disordered or (longest is not None and length > longest)
            longest = length
        target = automatic_target(_Roles(recorded), policy.automatic_mode) if automatic else None
        if kept and (target is None or recorded[target].tier is not None):
            # Nothing to map, drop or place (place_automatic leaves a marked target alone).
            if disordered:
                sim.order_violations += 1
        else:
            # Only marked positions and the automatic target can differ from the recording.
            tiers = [b.tier for b in recorded]
            for i in marked:
                tier = tiers[i]
                tiers[i] = projected_tier.get(tier) or proposal.tiers([tier])[0]
            if len(marked) > max_breakpoints:
                sim.over_limit += 1
                for i in marked[max_breakpoints:]:
                    tiers[i] = None
                marked = marked[:max_breakpoints]
            place_automatic(tiers, target, policy)
            if target is not None and tiers[target] is not None and target not in marked:
                marked = sorted([*marked, target])
            breakpoints = [(i, tier) for i in marked if (tier := tiers[i]) is not None]
            if len(breakpoints) > 1 and _out_of_order([tier for _, tier in breakpoints]):
                sim.order_violations += 1
        scope = Scope(request.principal, request.model, request.tokenizer_version)
        result = classify_marked(recorded, breakpoints, index.entries(scope), policy, request.ts)
        split = reconcile(request.prompt_tokens, request.completion_tokens, result)
        if split.cache_valid:
            index.apply(scope, result, request.ts)

        model = request.model
        group = groups.get((model, request.input_per_mtok, request.output_per_mtok))
        if group is None:
            inp, out = proposal.price_overrides.get(model, (request.input_per_mtok, request.output_per_mtok))
            totals = sim.per_model.get(model)
            if totals is None:
                totals = sim.per_model[model] = _Totals()
            group = groups[model, request.input_per_mtok, request.output_per_mtok] = _Group(
                _Prices.of(Tariff.for_policy(model, inp, out, policy)), totals)
        prices = group.prices
        prompt, read, completion = split.prompt, split.read, split.completion
        # pricing.cost(split, tariff) and pricing.list_cost(split, tariff), times prices.scale, exactly.
        uncached = prompt - read
        numerator = read * prices.read + completion * prices.output
        for tier, tokens in split.creation.items():
            if tokens:
                written = tokens * prices.write[tier]
                numerator += written
                group.creation[tier] += written
                uncached -= tokens
        numerator += uncached * prices.input
        group.projected += numerator
        hit = read > 0
        totals = group.totals
        totals.baseline += request.billed_cost
        totals.list += request.list_cost
        totals.prompt += prompt
        totals.read += read
        totals.hits += hit
        totals.requests += 1

        cluster = request.principal if by_principal else _cluster(request, unit)
        row = clusters.get(cluster)
        if row is None:
            row = clusters[cluster] = [0.0] * COLUMNS
        scale = prices.scale
        row[0] += float(request.billed_cost)  # BASELINE
        row[1] += numerator / scale  # PROJECTED
        row[2] += (prompt * prices.input + completion * prices.output) / scale  # LIST
        row[3] += prompt  # PROMPT
        row[4] += read  # READ
        row[5] += hit  # HITS
        row[6] += 1  # REQUESTS

    for group in groups.values():
        group.totals.projected += group.prices.decimal(group.projected)
        for tier, written in group.creation.items():
            group.totals.creation_cost[tier] += group.prices.decimal(written)
    overall = sim.overall
    for totals in sim.per_model.values():
        overall.baseline += totals.baseline
        overall.projected += totals.projected
        overall.list += totals.list
        overall.prompt += totals.prompt
        overall.read += totals.read
        overall.hits += totals.hits
        overall.requests += totals.requests
        for tier in TIERS:
            overall.creation_cost[tier] += totals.creation_cost[tier]
    return sim


def _out_of_order(tiers: list[str | None]) -> bool:
    """Whether a marker has a longer TTL than one before it."""
    longest = None
    for tier in tiers:
        if tier is not None:
            length = TIER_DURATIONS[tier]
            if longest is not None and length > longest:
                return True
            longest = length
    return False


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

"""The replay engine as it was before it was made fast, kept as the reference the fast one must agree with.

Verbatim but for one change of meaning, which the fast engine shares: each cluster's sums are kept
exact (Decimal and Fraction) and made floats once at the end, where they were float sums in log order.
Exact sums are what let a log split into shards of scopes add up to the same result as one run.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from fractions import Fraction
from typing import Any

from promptcache.operator.replay.engine import (
    SWEEP_EVERY,
    ReplayError,
    Simulation,
    _cluster,
    _Index,
    _Totals,
)
from promptcache.operator.replay.proposal import UNITS, Proposal
from promptcache.proxy.domain.classify import classify_marked
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.domain.markers import automatic_target, out_of_order, place_automatic
from promptcache.proxy.domain.pricing import Rates, Tariff, reconcile
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import LoggedRequest


class _Group:
    """Requests of one model at one set of prices: their exact projected and creation cost numerators."""

    __slots__ = ("creation", "projected", "rates", "totals")

    def __init__(self, rates: Rates, totals: _Totals) -> None:
        self.rates = rates
        self.totals = totals
        self.projected = 0
        self.creation = dict.fromkeys(TIERS, 0)


def simulate(requests: Iterable[LoggedRequest], proposal: Proposal, unit: str = "principal") -> Simulation:
    """The engine as it was before it was made fast (see the module docstring for its one change)."""
    if unit not in UNITS:
        raise ReplayError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    policy = proposal.policy
    index = _Index()
    sim = Simulation()
    groups: dict[tuple[str, Decimal, Decimal], _Group] = {}
    # Each scope with its entries, by its names: building a Scope costs more than finding it.
    scopes: dict[tuple[str, str, str], tuple[Scope, dict[bytes, IndexEntry]]] = {}
    # Per request, only markers can change: a recorded tier maps (once per proposal, not per block)
    # and automatic placement may add one. A chain whose markers all stay is classified as recorded.
    projected_tier: dict[str | None, str | None] = {tier: proposal.tiers([tier])[0] for tier in TIERS}
    automatic = policy.automatic_ttl is not None and policy.automatic_mode != "off"
    max_breakpoints = policy.max_breakpoints
    exact_rows: dict[str, list[Any]] = {}
    by_principal = unit == "principal"
    previous: tuple[Any, str] | None = None
    for n, request in enumerate(requests, 1):
        key = (request.ts, request.id)
        if previous is not None and key < previous:
            raise ReplayError(f"request {request.id} is out of (ts, id) order; replay needs a sorted log "
                              "(as `promptcache log export` writes it)")
        previous = key
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
                sim.over_limit += 1
                for i in marked[max_breakpoints:]:
                    tiers[i] = None
                marked = marked[:max_breakpoints]
            place_automatic(tiers, target, policy)
            if target is not None and tiers[target] is not None and target not in marked:
                marked = sorted([*marked, target])
            breakpoints = [(i, tier) for i in marked if (tier := tiers[i]) is not None]
        if len(breakpoints) > 1 and out_of_order([tier for _, tier in breakpoints]) is not None:
            sim.order_violations += 1
        names = (request.principal, request.model, request.tokenizer_version)
        known = scopes.get(names)
        if known is None:
            scope = Scope(*names)
            known = scopes[names] = (scope, index.entries(scope))
        scope, entries = known
        result = classify_marked(recorded, breakpoints, entries, policy, request.ts)
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
            try:
                rates = Tariff.for_policy(model, inp, out, policy).rates
            except ValueError as exc:
                raise ReplayError(str(exc)) from None
            group = groups[model, request.input_per_mtok, request.output_per_mtok] = _Group(rates, totals)
        rates = group.rates
        # The proxy's bill (pricing.cost) as its exact numerator over rates.scale.
        numerator = rates.cost(split, group.creation)
        group.projected += numerator
        prompt, read = split.prompt, split.read
        hit = read > 0
        totals = group.totals
        totals.baseline += request.billed_cost
        totals.list += request.list_cost
        totals.prompt += prompt
        totals.read += read
        totals.hits += hit
        totals.requests += 1

        cluster = request.principal if by_principal else _cluster(request, unit)
        row = exact_rows.get(cluster)
        if row is None:
            row = exact_rows[cluster] = [Decimal(0), Fraction(0), Fraction(0), 0, 0, 0, 0]
        scale = rates.scale
        row[0] += request.billed_cost  # BASELINE
        row[1] += Fraction(numerator, scale)  # PROJECTED
        row[2] += Fraction(rates.list_cost(split), scale)  # LIST
        row[3] += prompt  # PROMPT
        row[4] += read  # READ
        row[5] += hit  # HITS
        row[6] += 1  # REQUESTS

    sim.clusters = {cluster: [float(value) for value in row] for cluster, row in exact_rows.items()}
    for group in groups.values():
        group.totals.projected += group.rates.decimal(group.projected)
        for tier, written in group.creation.items():
            group.totals.creation_cost[tier] += group.rates.decimal(written)
    for totals in sim.per_model.values():
        sim.overall.add(totals)
    return sim

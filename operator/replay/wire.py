"""A shard's exact sums (:class:`~.engine.Partial`) as bytes, for a PlanReplay's shard pod to hand to the operator
through Postgres (docs/design.md#sharded-planreplay).

JSON, because its integers have no size limit (a projected cost's numerator may outgrow 64 bits) and Decimals
travel as their exact strings; typed by msgspec, so a body that is not one is an error, not a wrong sum; and
compressed, because cluster names repeat little but digits compress well.
"""

from __future__ import annotations

import zlib
from decimal import Decimal
from typing import Annotated

import msgspec

from promptcache.operator.replay.engine import MISS_COLUMNS, GroupKey, Partial
from promptcache.proxy.domain.tiers import Tier

_Index = Annotated[int, msgspec.Meta(ge=0)]
_Cell = tuple[_Index, _Index, Decimal, int, int, int, int, int, int, Decimal]
"""Cluster number, group number, then the cell's columns in :class:`Partial` order."""


class _Sums(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    clusters: list[str]
    groups: list[tuple[str, Decimal, Decimal]]
    creation: list[dict[Tier, int]]
    """Per group (in ``groups`` order), each tier's write cost numerator."""
    misses: list[Annotated[list[_Index], msgspec.Meta(min_length=MISS_COLUMNS, max_length=MISS_COLUMNS)]]
    """Per group, the requests that read nothing by reason (recorded, then projected)."""
    cells: list[_Cell]
    counters: tuple[int, int, int, int]
    """skipped_status, without_chain, over_limit, order_violations."""


_decoder = msgspec.json.Decoder(_Sums)


class WireError(ValueError):
    """Bytes that are not a shard's sums."""


def encode(partial: Partial) -> bytes:
    clusters: dict[str, int] = {}
    groups: dict[GroupKey, int] = {group: n for n, group in enumerate(partial.creation)}
    cells: list[_Cell] = []
    for (cluster, group), cell in partial.cells.items():
        number = clusters.setdefault(cluster, len(clusters))
        cells.append((number, groups[group], *cell))
    body = _Sums(list(clusters), list(groups), [dict(partial.creation[group]) for group in groups],  # type: ignore[misc]
                 [partial.misses.get(group, [0] * MISS_COLUMNS) for group in groups], cells,
                 (partial.skipped_status, partial.without_chain, partial.over_limit, partial.order_violations))
    return zlib.compress(msgspec.json.encode(body), 1)


def decode(data: bytes) -> Partial:
    try:
        body = _decoder.decode(zlib.decompress(data))
    except (zlib.error, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WireError(f"not a replay shard's sums: {exc}") from None
    groups: list[GroupKey] = [(model, inp, out) for model, inp, out in body.groups]
    if len(body.creation) != len(groups) or len(body.misses) != len(groups) or \
            any(c[0] >= len(body.clusters) or c[1] >= len(groups) for c in body.cells):
        raise WireError("not a replay shard's sums: a cell names a cluster or group it does not list")
    partial = Partial(creation={group: {str(tier): n for tier, n in written.items()}
                                for group, written in zip(groups, body.creation, strict=True)},
                      misses=dict(zip(groups, body.misses, strict=True)))
    partial.cells = {(body.clusters[c[0]], groups[c[1]]): list(c[2:]) for c in body.cells}
    partial.skipped_status, partial.without_chain, partial.over_limit, partial.order_violations = body.counters
    return partial

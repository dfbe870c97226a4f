"""Cluster bootstrap intervals (docs/design.md#replay): resample clusters, recompute ratios of sums.

Every statistic is a function of column totals, so the point estimate (the full sample's totals)
and each replicate (a multinomial reweighting of the clusters) are the same computation and agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Totals = npt.NDArray[np.float64]
Statistic = Callable[[Totals], npt.NDArray[np.float64]]
"""Maps totals (rows x columns) to one value per row."""

CHUNK = 250


@dataclass(frozen=True)
class Bootstrap:
    intervals: Mapping[str, tuple[float, float]]
    replicates: Mapping[str, npt.NDArray[np.float64]]


def resample(clusters: Totals, statistics: Mapping[str, Statistic], iterations: int, confidence: float,
             seed: int) -> Bootstrap:
    """Percentile intervals of ``statistics`` over ``iterations`` cluster resamples.

    ``clusters`` holds one row of column sums per cluster. Drawing K clusters with replacement is a
    multinomial count per cluster, so each replicate's totals are ``counts @ clusters``.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    k = clusters.shape[0]
    probabilities = np.full(k, 1.0 / k)
    values: dict[str, list[npt.NDArray[np.float64]]] = {name: [] for name in statistics}
    done = 0
    while done < iterations:
        size = min(CHUNK, iterations - done)
        counts = rng.multinomial(k, probabilities, size=size).astype(np.float64)
        totals = counts @ clusters
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, statistic in statistics.items():
                values[name].append(statistic(totals))
        done += size
    tail = 100.0 * (1.0 - confidence) / 2.0
    replicates = {name: np.concatenate(parts) for name, parts in values.items()}
    intervals = {}
    for name, replicate in replicates.items():
        finite = replicate[np.isfinite(replicate)]
        if finite.size == 0:
            intervals[name] = (float("nan"), float("nan"))
            continue
        lo, hi = np.percentile(finite, [tail, 100.0 - tail])
        intervals[name] = (float(lo), float(hi))
    return Bootstrap(intervals, replicates)

"""docs/design.md#replay: the cluster bootstrap's intervals are calibrated, reproducible, and agree with the point
estimate.

Calibration (issue item 3): 400 synthetic datasets of 200 clusters are drawn from a population whose ratios
are known; the 95% interval of ``resample`` (500 resamples) with the engine's own ``STATISTICS`` must cover
the truth in 90% to 98% of them (it does in 92% to 94%). ``bench/replay.py`` runs the same check with more
datasets and the full 2000 resamples.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import pytest

from promptcache.operator.replay.bootstrap import CHUNK, Statistic, resample
from promptcache.operator.replay.engine import BASELINE, COLUMNS, HITS, PROJECTED, PROMPT, READ, REQUESTS, STATISTICS

HIT, SAVE, READ_SHARE = 0.6, 0.35, 0.7
TRUTH = {"hit_rate": HIT, "savings_pct": 100 * SAVE, "read_token_ratio": READ_SHARE}


def population_sample(rng: np.random.Generator, clusters: int) -> npt.NDArray[np.float64]:
    """Per-cluster sums from a population with known ratios of sums.

    Cluster sizes are skewed (lognormal, like principals' traffic); each cluster's hit probability, savings
    share and read share vary around the population's (beta, independent of size and spend), so the
    population's ratio of expected sums is exactly the beta mean: HIT, SAVE and READ_SHARE.
    """
    sizes = np.maximum(1, np.round(rng.lognormal(4.0, 1.0, clusters)))
    rows = np.zeros((clusters, COLUMNS))
    rows[:, REQUESTS] = sizes
    rows[:, HITS] = rng.binomial(sizes.astype(np.int64), rng.beta(6 * HIT, 6 * (1 - HIT), clusters))
    rows[:, BASELINE] = sizes * rng.lognormal(-3.0, 0.5, clusters)
    rows[:, PROJECTED] = rows[:, BASELINE] * (1 - rng.beta(8 * SAVE, 8 * (1 - SAVE), clusters))
    rows[:, PROMPT] = sizes * rng.lognormal(9.0, 0.4, clusters)
    rows[:, READ] = rows[:, PROMPT] * rng.beta(10 * READ_SHARE, 10 * (1 - READ_SHARE), clusters)
    return rows


def test_95_percent_intervals_cover_the_truth_90_to_98_percent_of_the_time() -> None:
    rng = np.random.Generator(np.random.PCG64(2025))
    statistics = {name: STATISTICS[name] for name in TRUTH}
    datasets = 400
    covered = dict.fromkeys(TRUTH, 0)
    for seed in range(datasets):
        boot = resample(population_sample(rng, 200), statistics, 500, 0.95, seed)
        for name, truth in TRUTH.items():
            lo, hi = boot.intervals[name]
            covered[name] += lo <= truth <= hi
    coverage = {name: hits / datasets for name, hits in covered.items()}
    assert all(0.90 <= share <= 0.98 for share in coverage.values()), coverage


def test_the_interval_holds_the_point_estimate_and_narrows_with_more_clusters() -> None:
    rng = np.random.Generator(np.random.PCG64(7))
    widths = []
    for clusters in (30, 300, 3000):
        rows = population_sample(rng, clusters)
        totals = rows.sum(axis=0, keepdims=True)
        boot = resample(rows, STATISTICS, 1000, 0.95, 1)
        statistics: Mapping[str, Statistic] = STATISTICS
        for name, statistic in statistics.items():
            lo, hi = boot.intervals[name]
            assert lo <= float(statistic(totals)[0]) <= hi, name
        widths.append(boot.intervals["savings_pct"][1] - boot.intervals["savings_pct"][0])
    assert widths[0] > widths[1] > widths[2]


def test_same_seed_same_replicates_whatever_the_chunking() -> None:
    rows = population_sample(np.random.Generator(np.random.PCG64(3)), 50)
    iterations = 2 * CHUNK + 17  # not a whole number of chunks
    first = resample(rows, STATISTICS, iterations, 0.9, 42)
    second = resample(rows, STATISTICS, iterations, 0.9, 42)
    other = resample(rows, STATISTICS, iterations, 0.9, 43)
    for name in STATISTICS:
        assert first.replicates[name].shape == (iterations,)
        assert np.array_equal(first.replicates[name], second.replicates[name])
        assert first.intervals[name] == second.intervals[name]
        assert not np.array_equal(first.replicates[name], other.replicates[name])


def test_one_cluster_gives_a_degenerate_interval_and_undefined_ratios_give_nan() -> None:
    rows = np.zeros((1, COLUMNS))
    rows[0, [BASELINE, PROJECTED, REQUESTS, HITS]] = [2.0, 1.5, 4, 1]
    boot = resample(rows, STATISTICS, 300, 0.95, 0)
    assert boot.intervals["savings"] == (0.5, 0.5)
    assert boot.intervals["savings_pct"] == pytest.approx((25.0, 25.0))
    assert boot.intervals["hit_rate"] == (0.25, 0.25)
    lo, hi = boot.intervals["read_token_ratio"]  # no prompt tokens: 0/0 in every replicate
    assert np.isnan(lo) and np.isnan(hi)

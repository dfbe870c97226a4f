"""docs/design.md#parallel-replay: a replay split by principal across processes, merged into one result.

Scopes are (principal, model, tokenizer), so a shard of principals holds whole scopes, and scopes do not
see each other: each shard reads every file, keeps its principals' lines (the others are skipped
unparsed), orders them, simulates them and returns its exact sums (:class:`~.engine.Partial`). The sums
add up to what one process would have summed, so ``--workers N`` gives the bytes ``--workers 1`` does.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from promptcache.operator.replay.engine import Partial, Simulation, accumulate, finish
from promptcache.operator.replay.ordering import Ids, Unsorted, check_unique, merged, sort, unique
from promptcache.operator.replay.proposal import Proposal
from promptcache.operator.replay.sources import Meter, Selection, entries

Progress = Callable[[float, str], None]
"""Told the share of the work done (0 to 1) and what is being done."""


@dataclass(frozen=True)
class Run:
    """One replay of files: everything a shard needs, picklable for its process."""

    selection: Selection
    proposal: Proposal
    unit: str
    dedupe: bool
    memory: int
    """Bytes of requests all shards together may hold in memory while sorting."""
    workdir: str
    """Where standard input's copy and sorted runs go."""


@dataclass
class ShardResult:
    partial: Partial
    ids: Ids


def run_shard(run: Run, shard: int, shards: int, progress: Progress | None = None) -> ShardResult:
    """Shard ``shard`` of ``shards``: its requests merged in order (sorted first if a file is not)."""
    selection = replace(run.selection, shard=shard, shards=shards)
    sources = selection.sources
    total = max(1, sum(source.size for source in sources))
    meters = [Meter() for _ in sources]

    def reading(label: str, share: float) -> Callable[[int], None] | None:
        """Progress while reading the files: the bytes read, as ``share`` of the work."""
        if progress is None:
            return None
        report = progress
        return lambda _: report(share * sum(m.done for m in meters) / total, label)

    try:
        ids = Ids()
        streams = [entries(selection, i, meters[i]) for i in range(len(sources))]
        partial = accumulate(unique(merged(streams), sources, run.dedupe, ids), run.proposal, run.unit,
                             reading("replaying", 1.0))
    except Unsorted:
        meters = [Meter() for _ in sources]
        ids = Ids()
        streams = [entries(selection, i, meters[i]) for i in range(len(sources))]
        ordered, count = sort(streams, run.memory // shards, run.workdir, reading("sorting", 0.5))

        def replaying(n: int) -> None:
            if progress is not None:
                progress(0.5 + 0.5 * n / max(count, 1), "replaying sorted")

        partial = accumulate(unique(ordered, sources, run.dedupe, ids), run.proposal, run.unit, replaying)
    return ShardResult(partial, ids)


def simulate(run: Run, workers: int = 1, progress: Progress | None = None) -> Simulation:
    """The run's simulation, by ``workers`` processes (1: in this one)."""
    results = [run_shard(run, 0, 1, progress)] if workers == 1 else _in_processes(run, workers, progress)
    check_unique([result.ids for result in results], run.selection.sources)
    total = Partial()
    for result in results:
        total.add(result.partial)
    sim = finish(total, run.proposal)
    sim.duplicates = sum(result.ids.dropped for result in results)
    return sim


_forked: tuple[Run, Any] | None = None
"""The run and the shared array of each shard's share done (ctypes doubles), set before the shards' processes
fork: they inherit it rather than unpickle it (a policy holds read-only mappings, which do not pickle)."""


def _shard_in_process(shard: int, shards: int) -> ShardResult:
    assert _forked is not None, "shards run in forked processes"
    run, done = _forked

    def tell(share: float, label: str) -> None:
        done[shard] = share

    return run_shard(run, shard, shards, tell)


def _in_processes(run: Run, workers: int, progress: Progress | None) -> list[ShardResult]:
    """Each shard in a forked process; the first failing shard's error (by shard number) is raised."""
    global _forked
    context = multiprocessing.get_context("fork")
    done = context.Array("d", workers, lock=False)
    _forked = (run, done)
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures: Sequence[Future[ShardResult]] = [pool.submit(_shard_in_process, shard, workers)
                                                      for shard in range(workers)]
            while not all(future.done() for future in futures):
                if progress is not None:
                    progress(min(done), "replaying")
                time.sleep(0.2)
            return [future.result() for future in futures]
    finally:
        _forked = None

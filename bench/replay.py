"""Replay benchmark (issues 6 and 15): reader, engine, end to end with 1 and 2 workers, 10M streamed, calibration.

The log is agents in conversations: each principal works through conversations one after another; a
conversation starts from the principal's tool definitions and system prompt (a 1h breakpoint), and every
turn appends the assistant's reply and a user message or tool result, so chains grow (8 to about 55
blocks, about 30 on average) with a 5m breakpoint on the last block and one on the previous turn's end.
Gaps between turns are mostly seconds (tool loops), sometimes minutes (a person reading: some 5m entries
expire), and hours between conversations (some 1h entries expire). The recorded billing is the client's
own cache model (reads the previous turn while it is live), so the baseline is what a proxy billed.

Figures, each beside its peer from the same run:

- reader: ``read_jsonl`` over a JSONL sample, in us/line, beside a bare ``orjson.loads`` loop over the same
  lines (the floor for any JSON reader in Python) and the ratio;
- engine: ``simulate`` on in-memory requests (generated lazily and clocked out in batches of 100), in
  us/request, beside the pre-optimisation engine the tests keep as their reference (tests/replay/reference.py)
  on the first ``--reference-requests`` of the same log, and the ratio. Two proposals: ``standard`` (markers
  kept, automatic caching of the last user message) and ``5m-as-1h`` (a tier override: every marker changes);
- end to end: ``promptcache replay --log FILE`` on a file of ``--requests`` lines, with ``--workers 1`` and
  ``2``: seconds from start to result JSON, the peak RSS of its process tree (psutil, every 50 ms) and whether
  the outputs are the same bytes;
- ``--streamed N`` (e.g. 10000000): N requests generated and streamed through the engine, never held: seconds
  and the peak RSS, which stays flat as N grows;
- calibration: synthetic per-cluster sums whose population ratios are known go through the bootstrap
  (``promptcache.operator.replay.bootstrap.resample`` with the engine's ``STATISTICS``); the coverage is the share
  of datasets whose 95% interval holds the truth (target 90% to 98%).

Run with ``.venv/bin/python -P bench/replay.py [--requests N] [--streamed N] [--iterations B] [--datasets D]
[--proposals P] [--profile]``; it exits 1 if the calibration misses 90% to 98% or the workers' outputs differ.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import heapq
import io
import itertools
import json
import os
import pstats
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import psutil

from promptcache.operator.replay.bootstrap import resample
from promptcache.operator.replay.engine import (
    BASELINE,
    COLUMNS,
    HITS,
    PROJECTED,
    PROMPT,
    READ,
    REQUESTS,
    STATISTICS,
    report,
    simulate,
)
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.storage.requestlog import LoggedRequest, read_jsonl, to_json_line

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replay import reference

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
T0 = datetime(2025, 3, 1, tzinfo=UTC)
# (model, input $/MTok, output $/MTok, tokenizer): principals are spread over the models.
MODELS = (
    ("claude-sonnet", Decimal(3), Decimal(15), "anthropic@2025-01"),
    ("claude-haiku", Decimal("0.8"), Decimal(4), "anthropic@2025-01"),
    ("gpt-4o", Decimal("2.5"), Decimal(10), "o200k_base@1"),
)
RECORDED_WRITE = {"5m": Decimal("1.25"), "1h": Decimal(2), "24h": Decimal("2.5")}
RECORDED_READ = Decimal("0.1")
ZERO_CREATION = {"5m": 0, "1h": 0, "24h": 0}


@dataclass
class _Agent:
    """One principal: its current conversation and what its client believes is cached."""

    principal: str
    model: tuple[str, Decimal, Decimal, str, int, int]
    prefix: list[ChainBlock]
    """Tool definitions and the system prompt (marked 1h), shared by the principal's conversations."""
    plain: list[ChainBlock] = field(default_factory=list)
    """The conversation so far, unmarked after the system prompt."""
    previous: ChainBlock | None = None
    """The previous turn's last block, marked 5m (it stays marked for one more turn)."""
    previous_at: int = 0
    turns_left: int = 0
    expiry: dict[bytes, datetime] = field(default_factory=dict)
    """The client's cache: breakpoint hash -> expiry."""


def synthetic_log(requests: int, principals: int = 2000, seed: int = 1) -> Iterator[LoggedRequest]:
    """``requests`` requests in (ts, id) order from ``principals`` agents (see the module docstring)."""
    rng = random.Random(seed)
    rand, choice = rng.random, rng.choice

    def randint(low: int, high: int) -> int:  # random.randint's range, at a fraction of its cost
        return low + int(rand() * (high - low + 1))
    counter = iter(range(1, 1 << 62))
    agents = []
    queue: list[tuple[float, int]] = []
    for p in range(principals):
        tools = ChainBlock(next(counter).to_bytes(16, "big"), randint(800, 3000), "tool_definition", None)
        system = ChainBlock(next(counter).to_bytes(16, "big"), tools.tokens + randint(500, 2000), "system", "1h")
        name, inp, out, tokenizer = MODELS[p % len(MODELS)]
        # Integer prices in tenths of a dollar per MTok: a cost is an integer count of 1e-9 dollars.
        agents.append(_Agent(f"principal-{p:05d}", (name, inp, out, tokenizer, int(inp * 10), int(out * 10)),
                             [tools, system]))
        heapq.heappush(queue, (rng.uniform(0, 3600), p))
    lifetimes = {"5m": timedelta(minutes=5), "1h": timedelta(hours=1)}
    write = {tier: int(m * 100) for tier, m in RECORDED_WRITE.items()}
    read_multiplier = int(RECORDED_READ * 100)
    for n in range(requests):
        at, p = heapq.heappop(queue)
        agent = agents[p]
        ts = T0 + timedelta(seconds=at)
        if agent.turns_left == 0:
            agent.plain = list(agent.prefix)
            agent.previous = None
            agent.turns_left = randint(10, 34)
        # The turn: the previous reply (unless first), then a user message or a few tool results.
        plain = agent.plain
        tokens = plain[-1].tokens
        if agent.previous is not None:
            tokens += randint(50, 800)
            plain.append(ChainBlock(next(counter).to_bytes(16, "big"), tokens, "assistant", None))
        for _ in range((1, 2, 2, 3)[int(rand() * 4)]):
            tokens += randint(30, 600)
            plain.append(ChainBlock(next(counter).to_bytes(16, "big"), tokens, "user", None))
        last = plain[-1]
        marked = ChainBlock(last.hash, last.tokens, last.role, "5m")
        chain = plain.copy()
        chain[-1] = marked
        breakpoints = [plain[1], marked]  # shallowest first
        if agent.previous is not None:
            chain[agent.previous_at] = agent.previous
            breakpoints.insert(1, agent.previous)
        recorded = tuple(chain)
        # The client's own cache: the deepest live breakpoint is read (and slides), later ones are written.
        expiry = agent.expiry
        read = 0
        for b in reversed(breakpoints):
            if expiry.get(b.hash, T0) > ts:
                read = b.tokens
                expiry[b.hash] = ts + lifetimes[b.tier or "5m"]
                break
        creation = dict(ZERO_CREATION)
        boundary = read
        for b in breakpoints:
            if b.tokens > boundary and b.tokens >= 1024:
                creation[b.tier or "5m"] += b.tokens - boundary
                boundary = b.tokens
                expiry[b.hash] = ts + lifetimes[b.tier or "5m"]
        prompt = tokens + 12
        completion = randint(20, 900)
        name, inp, out, tokenizer, inp10, out10 = agent.model
        uncached = prompt - read - creation["5m"] - creation["1h"]
        billed = ((uncached * 100 + read * read_multiplier + creation["5m"] * write["5m"]
                   + creation["1h"] * write["1h"]) * inp10 + completion * out10 * 100)
        status = 200 if rand() > 0.004 else choice((429, 500, 529))
        yield LoggedRequest(
            id=f"req-{n:08d}", ts=ts, principal=agent.principal, model=name, tokenizer_version=tokenizer,
            api="anthropic", status=status, prompt_tokens=prompt, completion_tokens=completion, read_tokens=read,
            creation_tokens=creation, input_per_mtok=inp, output_per_mtok=out,
            billed_cost=Decimal(billed).scaleb(-9).normalize(),
            list_cost=Decimal((prompt * inp10 + completion * out10) * 100).scaleb(-9).normalize(), chain=recorded,
        )
        agent.previous, agent.previous_at = marked, len(plain) - 1
        agent.turns_left -= 1
        if len(plain) > 60:
            agent.turns_left = 0
        if agent.turns_left == 0:
            agent.expiry = {h: e for h, e in expiry.items() if e > ts}
            gap = rng.expovariate(1 / 5400)  # between conversations: 1.5 h on average
        elif rand() < 0.12:
            gap = rng.uniform(60, 900)  # a person reading: past 5 minutes, the 5m entries expire
        else:
            gap = rng.expovariate(1 / 12) + 1  # the agent's tool loop
        heapq.heappush(queue, (at + gap, p))


# --- calibration ---------------------------------------------------------------------------------


HIT, SAVE, READ_SHARE = 0.6, 0.35, 0.7
TRUTH = {"hit_rate": HIT, "savings_pct": 100 * SAVE, "read_token_ratio": READ_SHARE}


def population_sample(rng: np.random.Generator, clusters: int) -> npt.NDArray[np.float64]:
    """Per-cluster sums from a population with known ratios of sums (as in tests/replay/test_bootstrap.py).

    Cluster sizes are skewed (lognormal); each cluster's hit probability, savings share and read share
    vary around the population's (beta, independent of size and spend), so the population's ratio of
    expected sums is exactly the beta mean.
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


def coverage(datasets: int, iterations: int, clusters: int = 200, seed: int = 7) -> dict[str, float]:
    """Share of ``datasets`` whose ``resample`` interval (95%) holds the known truth, per statistic."""
    rng = np.random.Generator(np.random.PCG64(seed))
    statistics = {name: STATISTICS[name] for name in TRUTH}
    covered = dict.fromkeys(TRUTH, 0)
    for d in range(datasets):
        boot = resample(population_sample(rng, clusters), statistics, iterations, 0.95, seed + d)
        for name, truth in TRUTH.items():
            lo, hi = boot.intervals[name]
            covered[name] += lo <= truth <= hi
    return {name: hits / datasets for name, hits in covered.items()}


# --- the bench -----------------------------------------------------------------------------------


def peak_mib() -> float:
    """Peak resident set of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clocked:
    """Feeds the generator's requests in batches and adds up the time spent producing them, to take it out of
    the engine's time (per batch: clocking every request would cost more than some of what it measures)."""

    BATCH = 100

    def __init__(self, requests: Iterator[LoggedRequest]) -> None:
        self.requests = requests
        self.seconds = 0.0
        self.cpu = 0.0
        self.count = 0
        self.blocks = 0

    def __iter__(self) -> Iterator[LoggedRequest]:
        while True:
            start, start_cpu = time.perf_counter(), time.process_time()
            batch = list(itertools.islice(self.requests, self.BATCH))
            self.seconds += time.perf_counter() - start
            self.cpu += time.process_time() - start_cpu
            if not batch:
                return
            self.count += len(batch)
            self.blocks += sum(len(r.chain) for r in batch)
            yield from batch


PROPOSALS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    # Markers kept as recorded (the common case): the standard policy, automatic caching of the last user message.
    "standard": ({"enabledTtls": ["5m", "1h"], "automatic": {"mode": "lastUserMessage"}}, {}),
    # Every marker changes: "treat 5m markers as 1h" (examples/full/planreplay.yaml), chains rebuilt per request.
    "5m-as-1h": ({"enabledTtls": ["5m", "1h"], "defaultTtl": "1h"}, {"5m": "1h"}),
}


def run(name: str, args: argparse.Namespace) -> float:
    """One proposal over the whole log; prints the figures and returns the engine's wall time."""
    spec, override = PROPOSALS[name]
    proposal = Proposal(CachePolicy.from_spec(spec), spec, override)
    source = Clocked(synthetic_log(args.requests, args.principals))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
    start, start_cpu = time.perf_counter(), time.process_time()
    sim = simulate(source, proposal, "principal")
    simulated, simulated_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if args.profile:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())
    start, start_cpu = time.perf_counter(), time.process_time()
    result = report(sim, proposal, seed=1, iterations=args.iterations, unit="principal").result
    reported, reported_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    engine, engine_cpu = simulated - source.seconds + reported, simulated_cpu - source.cpu + reported_cpu
    summary = result["summary"]
    reference_source = Clocked(itertools.islice(synthetic_log(args.requests, args.principals),
                                                args.reference_requests))
    start = time.perf_counter()
    reference.simulate(reference_source, proposal, "principal")
    reference_us = 1e6 * (time.perf_counter() - start - reference_source.seconds) / reference_source.count
    print(f"proposal {name!r}: {spec}, tier override {override}")
    print(f"  requests: {source.count:,}, {source.blocks / source.count:.1f} blocks per request on average")
    print(f"  generating the requests (inside the run):  {source.seconds:6.2f} s wall  {source.cpu:6.2f} s CPU")
    per_request = 1e6 * (simulated - source.seconds) / source.count
    print(f"  simulate, generation excluded:              {simulated - source.seconds:6.2f} s wall "
          f"{simulated_cpu - source.cpu:6.2f} s CPU  ({per_request:.1f} us/request)")
    print(f"  reference engine on the first {reference_source.count:,}: {reference_us:.1f} us/request: the engine "
          f"is {reference_us / per_request:.2f}x as fast")
    print(f"  report ({args.iterations} resamples of {len(sim.clusters):,} clusters): {reported:6.2f} s wall "
          f"{reported_cpu:6.2f} s CPU")
    print(f"  ENGINE (simulate + report):                 {engine:6.2f} s wall  {engine_cpu:6.2f} s CPU")
    print(f"  peak memory so far: {peak_mib():.0f} MiB (resource.getrusage ru_maxrss: the whole process, "
          "generator included)")
    print(f"  result: {summary['requests']:,} simulated, savings {summary['savings_pct']}% "
          f"{result['intervals']['savings_pct']}, hit rate {summary['hit_rate']}, caveats {result['caveats']}")
    return engine


def reader(args: argparse.Namespace, folder: Path) -> None:
    """read_jsonl beside a bare orjson.loads loop over the same lines (best of three each)."""
    path = folder / "sample.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for r in synthetic_log(args.sample, args.principals):
            fh.write(to_json_line(r) + "\n")
    lines = path.read_bytes().splitlines(keepends=True)
    ours = bare = float("inf")
    count = 0
    for _ in range(3):
        start = time.perf_counter()
        count = sum(1 for _ in read_jsonl(path))
        ours = min(ours, (time.perf_counter() - start) / count)
        start = time.perf_counter()
        for line in lines:
            orjson.loads(line)
        bare = min(bare, (time.perf_counter() - start) / len(lines))
    print(f"reader: read_jsonl {1e6 * ours:.1f} us/line over {count:,} lines ({path.stat().st_size / count:,.0f} "
          f"bytes each), a bare orjson.loads loop {1e6 * bare:.1f} us/line: {ours / bare:.2f}x the floor "
          "(goal <= 15 us/line)")


def end_to_end(args: argparse.Namespace, folder: Path) -> bool:
    """``promptcache replay`` on a file of --requests lines with 1 and 2 workers; True if the outputs agree."""
    path, policy = folder / "log.jsonl", folder / "policy.json"
    policy.write_text(json.dumps(PROPOSALS["standard"][0]), encoding="utf-8")
    start = time.perf_counter()
    with path.open("w", encoding="utf-8") as fh:
        for r in synthetic_log(args.requests, args.principals):
            fh.write(to_json_line(r) + "\n")
    print(f"end to end: {args.requests:,} lines, {path.stat().st_size / 2**30:.2f} GiB written in "
          f"{time.perf_counter() - start:.0f} s (not timed below)")
    outputs = []
    for workers in args.workers.split(","):
        with tempfile.TemporaryFile() as out:
            start = time.perf_counter()
            child = subprocess.Popen([PROMPTCACHE, "replay", "--log", str(path), "--policy", str(policy), "--workers",
                                      workers, "--iterations", str(args.iterations), "--output", "json"], stdout=out)
            peak = tree_peak_rss(child)
            seconds = time.perf_counter() - start
            if child.returncode != 0:
                raise SystemExit(f"promptcache replay --workers {workers} exited {child.returncode}")
            out.seek(0)
            outputs.append(out.read())
        print(f"  --workers {workers}: {seconds:6.2f} s from JSON Lines to result JSON, {args.requests / seconds:,.0f} "
              f"requests/s; peak RSS of its process tree {peak / 2**20:.0f} MiB")
    same = all(output == outputs[0] for output in outputs)
    print(f"  outputs byte-identical across worker counts: {same} (digest {json.loads(outputs[0])['digest'][:16]}...)")
    return same


def tree_peak_rss(child: subprocess.Popen[bytes]) -> int:
    """The child's peak resident set summed over it and its processes (sampled every 50 ms) once it exits."""
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            peak = max(peak, sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]))
        time.sleep(0.05)
    return peak


def streamed(args: argparse.Namespace) -> None:
    """--streamed requests generated and run through the engine, never held: time and peak RSS."""
    spec, override = PROPOSALS["standard"]
    proposal = Proposal(CachePolicy.from_spec(spec), spec, override)
    source = Clocked(synthetic_log(args.streamed, args.principals))
    start = time.perf_counter()
    sim = simulate(source, proposal, "principal")
    report(sim, proposal, seed=1, iterations=args.iterations, unit="principal")
    seconds = time.perf_counter() - start
    print(f"streamed: {source.count:,} requests generated and replayed in {seconds:.0f} s ({source.seconds:.0f} s of "
          f"it generating; engine {1e6 * (seconds - source.seconds) / source.count:.1f} us/request); peak RSS of this "
          f"process {peak_mib():.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--reference-requests", type=int, default=100_000)
    parser.add_argument("--principals", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--datasets", type=int, default=1000, help="calibration datasets")
    parser.add_argument("--sample", type=int, default=100_000, help="requests in the reader's JSONL sample")
    parser.add_argument("--workers", default="1,2", help="worker counts for the end-to-end runs")
    parser.add_argument("--streamed", type=int, default=0, help="also stream this many requests (e.g. 10000000)")
    parser.add_argument("--proposals", default=",".join(PROPOSALS), help=f"comma-separated, of {', '.join(PROPOSALS)}")
    parser.add_argument("--profile", action="store_true", help="cProfile the simulation, print the top 25")
    args = parser.parse_args()

    print(f"Replay on {args.requests:,} synthetic requests from {args.principals:,} principals; load average "
          f"{os.getloadavg()[0]:.2f} before.")
    print(f"peak memory before the runs: {peak_mib():.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        reader(args, Path(tmp))
    for name in args.proposals.split(","):
        run(name, args)
    with tempfile.TemporaryDirectory() as tmp:
        same = end_to_end(args, Path(tmp))
    if args.streamed:
        streamed(args)

    start = time.perf_counter()
    shares = coverage(args.datasets, args.iterations)
    print(f"calibration: {args.datasets} synthetic datasets of 200 clusters x {args.iterations} resamples, 95% "
          f"intervals ({time.perf_counter() - start:.1f} s)")
    for name, share in shares.items():
        print(f"  {name}: the interval covers the truth in {100 * share:.1f}% of datasets (target 90% to 98%)")
    ok = all(0.90 <= s <= 0.98 for s in shares.values())
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())

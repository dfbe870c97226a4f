"""``promptcache replay``: what a log would have cost under a proposed policy (docs/design.md#replay).

Reads requests from JSON Lines files (any order, gzip or plain, ``-`` for standard input; sorted here,
by several processes with ``--workers``) or streams them from Postgres, filters them by model and time
window, runs them through the replay engine and prints the result: the canonical result JSON
(``--output json``, the default when standard output is not a terminal) or a readable summary
(``table``). ``--plot`` draws the result (:mod:`.plot`; needs matplotlib, the ``plot`` extra).
Every bad input exits 2 with one line on standard error.

The engine and numpy are imported when the command runs, so other subcommands do not load them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from promptcache.operator.cli import options
from promptcache.operator.cli.figures import pct, usd
from promptcache.proxy.domain.tiers import TIERS

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.operator.replay.engine import Report, Simulation
    from promptcache.operator.replay.proposal import Proposal
    from promptcache.proxy.domain.policy import CachePolicy

_PRICE = re.compile(r"[0-9]+(\.[0-9]+)?")


def register(commands: Commands) -> None:
    p = commands.add_parser("replay", help="project what logged requests would cost under a proposed policy "
                                                  "(docs/design.md#replay)")
    source = p.add_argument_group("input (one of)")
    source.add_argument("--log", metavar="FILE", action="append",
                        help="JSON Lines request log (docs/design.md#request-log), plain or gzip, in any order; "
                             "repeatable (the files are merged), - for standard input")
    options.add_database(source, help="Postgres DSN to read the request log from")
    options.add_models(p)
    options.add_window(p)
    p.add_argument("--policy", metavar="FILE",
                   help="the proposed CachePolicy YAML (resource, config with `cache:`, or bare keys)")
    p.add_argument("--tier-override", action="append", default=[], metavar="FROM=TO",
                   help="project recorded FROM markers as TO, e.g. 5m=1h (repeatable)")
    p.add_argument("--price-override", action="append", default=[], metavar="MODEL=IN:OUT",
                   help="project MODEL at IN/OUT USD per million prompt/completion tokens, e.g. "
                        "gpt-4o=2.5:10 (repeatable; default: the prices each request was billed at)")
    p.add_argument("--seed", default="0", help="bootstrap seed (default 0): same input and seed, same bytes")
    p.add_argument("--iterations", default="2000", help="bootstrap resamples (default 2000)")
    p.add_argument("--unit", default="principal", help="what the bootstrap resamples: principal (default), day "
                                                       "or request")
    p.add_argument("--confidence", default="0.95", help="interval level, between 0 and 1 (default 0.95)")
    p.add_argument("--output", help="json (the canonical result) or table; default: table on a terminal, else json")
    p.add_argument("--dedupe", action="store_true",
                   help="drop identical copies of a request (overlapping exports); a repeated id that differs is "
                        "still an error")
    p.add_argument("--workers", default="1", help="processes to replay --log files with, each taking a share of "
                                                  "the principals (default 1; the result is the same)")
    p.add_argument("--sort-memory", default="512MiB", metavar="SIZE",
                   help="memory for sorting files that are not in (ts, id) order, all workers together, before "
                        "sorted runs spill to temporary files (default 512MiB; KiB, MiB, GiB or bytes)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the result to a PNG: the savings' bootstrap distribution "
                                                      "and break-even, each model's baseline and projected cost, "
                                                      "and the misses by reason (needs matplotlib: the `plot` "
                                                      "extra)")
    p.set_defaults(func=cmd_replay)


# --- options --------------------------------------------------------------------------------------


def _integer(args: argparse.Namespace, name: str, minimum: int) -> int:
    text: str = getattr(args, name)
    try:
        value = int(text)
    except ValueError:
        options.fail(f"invalid --{name}: {text!r} is not an integer")
    if value < minimum:
        options.fail(f"invalid --{name}: must be at least {minimum}, got {value}")
    return value


_SIZE = re.compile(r"([0-9]{1,15})\s*(|B|KiB|MiB|GiB|KB|MB|GB)")
_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
MIN_SORT_MEMORY = 2**20


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        options.fail(f"invalid --sort-memory: {text!r} is not a size such as 512MiB, 2GiB or 1000000")
    value = int(match[1]) * _UNITS[match[2]]
    if value < MIN_SORT_MEMORY:
        options.fail(f"invalid --sort-memory: must be at least 1MiB, got {text}")
    return value


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        options.fail(f"invalid --confidence: {text!r} is not a number")
    if not 0 < value < 1:
        options.fail(f"invalid --confidence: must be between 0 and 1 (exclusive), got {text}")
    return value


# --- the proposal: the flags spell the PlanReplay spec's fields, replay.proposal parses them ------------


def tier_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["5m=1h", ...]``, the spec's ``tierOverride``; one line on stderr and exit 2 for anything else."""
    from promptcache.operator.errors import SpecError
    from promptcache.operator.replay import proposal

    out: dict[str, str] = {}
    for item in items:
        recorded, sep, projected = (part.strip() for part in item.partition("="))
        invalid = (f"invalid --tier-override {item!r}: expected FROM=TO with tiers from {', '.join(TIERS)}, "
                   "e.g. 5m=1h")
        if not sep:
            options.fail(invalid)
        try:
            proposal.tier_override({recorded: projected})
        except SpecError:
            options.fail(invalid)
        if recorded in out:
            options.fail(f"invalid --tier-override {item!r}: {recorded} is already mapped to {out[recorded]}")
        out[recorded] = projected
    return out


def price_overrides(items: Sequence[str], models: Sequence[str] | None) -> dict[str, tuple[Decimal, Decimal]]:
    """``["MODEL=IN:OUT", ...]``, the spec's ``pricingOverrides``; one line on stderr and exit 2 otherwise.

    Prices are plain decimals (``2.5``, not ``25e-1``); without ``--models``, any model may be overridden.
    """
    from promptcache.operator.replay import proposal

    out: dict[str, dict[str, str]] = {}
    for item in items:
        model, sep, prices = item.rpartition("=")
        inp, colon, outp = prices.partition(":")
        model = model.strip()
        if not sep or not model or not colon or not _PRICE.fullmatch(inp) or not _PRICE.fullmatch(outp):
            options.fail(f"invalid --price-override {item!r}: expected MODEL=IN:OUT with decimal USD per million "
                         "tokens, e.g. gpt-4o=2.5:10")
        if model in out:
            options.fail(f"invalid --price-override {item!r}: {model} already has a price override")
        if models is not None and model not in models:
            options.fail(f"invalid --price-override {item!r}: {model} is not one of --models {','.join(models)}")
        out[model] = {"inputPerMTok": inp, "outputPerMTok": outp}
    return proposal.price_overrides(out, models)


def load_proposal_policy(path: str) -> tuple[CachePolicy, dict[str, Any]]:
    """The CachePolicy in ``path`` (a resource, a config with ``cache:``, or bare keys) and its keys as given."""
    import yaml

    from promptcache.operator.errors import SpecError
    from promptcache.operator.replay import proposal
    from promptcache.proxy.domain.nesting import TooDeep, load_yaml

    where = f"invalid policy file {path}"
    try:
        spec = load_yaml(options.read_input(path))
    except (yaml.YAMLError, TooDeep) as exc:
        options.fail(f"{where}: {' '.join(str(exc).split())}")
    if isinstance(spec, Mapping) and spec.get("kind") == "CachePolicy":
        spec = spec.get("spec")
    elif isinstance(spec, Mapping) and "cache" in spec:
        spec = spec["cache"]
    try:
        return proposal.policy(spec, where)
    except SpecError as exc:
        options.fail(str(exc))


# --- input ----------------------------------------------------------------------------------------


def _simulate(args: argparse.Namespace, proposal: Proposal, since: datetime | None, until: datetime | None,
              models: Sequence[str] | None, progress: _Progress) -> Simulation:
    """The log through the engine, from the ``--log`` files or from Postgres."""
    import tempfile

    import asyncpg

    from promptcache.operator.replay import rows, shards, sources
    from promptcache.operator.replay.engine import simulate

    if args.log is not None:
        with tempfile.TemporaryDirectory(prefix="promptcache-replay-") as workdir:
            selection = sources.Selection(sources.prepare(args.log, workdir), since, until,
                                          None if models is None else frozenset(models))
            progress.total = sum(source.size for source in selection.sources)
            run = shards.Run(selection, proposal, args.unit, args.dedupe, args.sort_memory, workdir)
            return shards.simulate(run, args.workers, progress.share)
    dsn = options.database(args)

    async def from_database() -> Simulation:
        try:
            conn = await asyncpg.connect(dsn)
        except ValueError as exc:  # a DSN asyncpg cannot parse (e.g. a port that is not a number)
            raise rows.LogError(f"invalid database URL: {exc}") from None
        try:
            return await rows.from_postgres(conn, since, until, models,
                                            lambda requests: simulate(requests, proposal, args.unit, progress.count))
        finally:
            await conn.close()

    try:
        return asyncio.run(from_database())
    except options.database_errors() as exc:
        raise rows.LogError(options.database_error(exc)) from None


# --- output ---------------------------------------------------------------------------------------


class _Progress:
    """A progress line on standard error, only when it is a terminal: share done, rate and time left for files
    (their total size is known), a count and rate for Postgres."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.start = time.monotonic()
        self.shown = False
        self.total = 0
        """Bytes of input, when known."""

    def share(self, done: float, label: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        width = 24
        bar = "#" * int(width * done) + "." * (width - int(width * done))
        rate = done * self.total / max(elapsed, 1e-9) / 2**20
        eta = f"{elapsed * (1 - done) / done:,.0f} s left" if done > 0.01 else "estimating"
        self._write(f"{label}: [{bar}] {100 * done:5.1f}% of {self.total / 2**20:,.0f} MiB, {rate:,.1f} MiB/s, {eta}")

    def count(self, done: int) -> None:
        if self.enabled:
            rate = done / max(time.monotonic() - self.start, 1e-9)
            self._write(f"replaying: {done:,} requests ({rate:,.0f}/s)")

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(text)

    def _write(self, text: str) -> None:
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _interval(bounds: Sequence[str], show: Callable[[str], str]) -> str:
    lo, hi = bounds
    return "n/a" if "NaN" in (lo, hi) else f"[{show(lo)}, {show(hi)}]"


def _ratio(text: str) -> str:
    return pct(text, 100)


def render_table(result: Mapping[str, Any]) -> str:
    """The result for a person: summary with intervals, misses by reason, per-model rows, caveats, digest."""
    from promptcache.operator.replay.misses import REASONS

    s, iv, params = result["summary"], result["intervals"], result["params"]
    level = f"{Decimal(repr(params['confidence'])) * 100:f}".rstrip("0").rstrip(".")
    lines = [
        f"Replay of {s['requests']:,} requests: {params['iterations']:,} bootstrap resamples by {params['unit']}, "
        f"seed {params['seed']}, {level}% intervals",
        "",
        f"  {'':<18} {'value':>18}   {level}% interval",
        f"  {'baseline (billed)':<18} {usd(s['baseline_cost']):>18}",
        f"  {'list price':<18} {usd(s['list_cost']):>18}",
        f"  {'projected':<18} {usd(s['projected_cost']):>18}   {_interval(iv['projected_cost'], usd)}",
        f"  {'savings':<18} {usd(s['savings']):>18}   {_interval(iv['savings'], usd)}",
        f"  {'savings %':<18} {pct(s['savings_pct']):>18}   {_interval(iv['savings_pct'], pct)}",
        f"  {'hit rate':<18} {_ratio(s['hit_rate']):>18}   {_interval(iv['hit_rate'], _ratio)}",
        f"  {'read token ratio':<18} {_ratio(s['read_token_ratio']):>18}   {_interval(iv['read_token_ratio'], _ratio)}",
        "  cache writes       " + ", ".join(f"{tier} {usd(v)}" for tier, v in s["creation_cost"].items()),
        "  read nothing       " + (", ".join(
            f"{reason.replace('_', ' ')} {s['misses']['recorded'][reason]:,} → {s['misses']['projected'][reason]:,}"
            for reason in REASONS if s["misses"]["recorded"][reason] or s["misses"]["projected"][reason])
            or "none") + "  (recorded → projected)",
        "",
    ]
    header = ("model", "requests", "baseline", "projected", "savings", "savings %", "hit rate", "read ratio")
    rows = [header] + [
        (m["model"], f"{m['requests']:,}", usd(m["baseline_cost"]), usd(m["projected_cost"]), usd(m["savings"]),
         pct(m["savings_pct"]), _ratio(m["hit_rate"]), _ratio(m["read_token_ratio"]))
        for m in result["per_model"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))]
        lines.append("  " + "  ".join(cells))
    lines.append("")
    lines.append("Caveats:" if result["caveats"] else "Caveats: none")
    lines.extend(f"  - {caveat}" for caveat in result["caveats"])
    lines.append(f"Digest: sha256:{result['digest']}")
    return "\n".join(lines) + "\n"


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        options.fail("--plot needs matplotlib, which is not installed: pip install 'promptcache[plot]'")


def plot(report: Report, policy: str, path: str) -> None:
    from promptcache.operator.cli import plot as picture

    name = "the policy from standard input" if policy == "-" else f"the policy in {policy}"
    try:
        picture.save(report, name, path)
    except OSError as exc:
        options.fail(f"cannot write {path}: {exc}")


# --- the command ----------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from promptcache.operator.replay.engine import ReplayError, canonical, report
    from promptcache.operator.replay.proposal import UNITS, Proposal
    from promptcache.operator.replay.rows import LogError

    if args.log is not None and args.database is not None:
        options.fail("pass one of --log and --database, not both")
    if args.log is None and not args.database and not os.environ.get(options.DATABASE_ENV):
        options.fail(f"no input: pass --log FILE or --database URL (or set {options.DATABASE_ENV})")
    if args.policy is None:
        options.fail("no policy: pass --policy FILE (a CachePolicy YAML)")
    if args.unit not in UNITS:
        options.fail(f"invalid --unit {args.unit!r}: must be one of {', '.join(UNITS)}")
    output = args.output or ("table" if sys.stdout.isatty() else "json")
    if output not in ("json", "table"):
        options.fail(f"invalid --output {output!r}: must be json or table")
    if args.log is not None and "-" in args.log and args.policy == "-":
        options.fail("--log and --policy cannot both be standard input")
    args.workers = _integer(args, "workers", 1)
    args.sort_memory = _size(args.sort_memory)
    if args.log is None and (args.workers > 1 or args.dedupe):
        options.fail("--workers and --dedupe are for --log files (Postgres has one row per id, in order)")
    seed = _integer(args, "seed", 0)
    iterations = _integer(args, "iterations", 1)
    confidence = _confidence(args.confidence)
    since, until = options.window(args)
    models = options.models(args)
    tiers = tier_overrides(args.tier_override)
    prices = price_overrides(args.price_override, models)
    if args.plot is not None:
        _check_matplotlib()
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            options.fail(f"cannot write {args.plot}: no directory {folder}")
    policy, spec = load_proposal_policy(args.policy)
    proposal = Proposal(policy, spec, tiers, prices)

    progress = _Progress()
    try:
        try:
            sim = _simulate(args, proposal, since, until, models, progress)
            if sim.read == 0:
                raise ReplayError("no logged requests in the selected window" + _describe(args))
            progress.note(f"bootstrapping: {iterations:,} resamples of {len(sim.clusters):,} clusters")
            result = report(sim, proposal, seed=seed, iterations=iterations, unit=args.unit, confidence=confidence)
        finally:
            progress.clear()
    except (LogError, ReplayError) as exc:
        options.fail(str(exc))
    if args.plot is not None:
        plot(result, args.policy, args.plot)
    options.write_output(canonical(result.result) + "\n" if output == "json" else render_table(result.result))
    return 0


def _describe(args: argparse.Namespace) -> str:
    """The selection, for an empty-window message."""
    parts = [f"{flag} {value}" for flag, value in (("--models", args.models), ("--since", args.since),
                                                   ("--until", args.until)) if value is not None]
    return f" ({', '.join(parts)})" if parts else ""

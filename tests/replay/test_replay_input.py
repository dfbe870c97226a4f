"""docs/design.md#replay-input: files in any order and any split give the sorted single file's result, byte for byte.

Logs are shuffled and dealt into several files (plain and gzip, one through standard input), sorted in
memory or through spilled runs, read by one process or several, and must give the digest of the
sorted single file under every policy here; the fast engine must give the reference engine's result (but for
the miss reasons, which came after it).
Repeated ids, unreadable and truncated files and over-deep lines are one line naming file and line.
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from replay import reference
from replay.test_replay import SYNTHETIC_OVERRIDE, SYNTHETIC_POLICY, proposal, synthetic_log

from promptcache.operator.replay import shards, sources
from promptcache.operator.replay.engine import canonical, report, simulate
from promptcache.proxy.storage.requestlog import LoggedRequest, to_json_line

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
POLICIES: list[tuple[dict[str, Any], dict[str, str]]] = [
    (SYNTHETIC_POLICY, SYNTHETIC_OVERRIDE),
    ({"enabledTtls": ["5m", "1h"], "automatic": {"mode": "lastUserMessage"}}, {}),
    ({"enabledTtls": ["5m", "1h"], "defaultTtl": "1h"}, {"5m": "1h"}),
    ({"maxBreakpoints": 1, "minPrefixTokens": 1024}, {}),
]
LOG = synthetic_log(principals=60, seed=5)
UNITS = ("principal", "day", "request")


def digest(requests: Sequence[LoggedRequest], policy: int, unit: str) -> str:
    p = proposal(*POLICIES[policy])
    return str(report(simulate(requests, p, unit), p, seed=4, iterations=300, unit=unit).result["digest"])


def lines(requests: Sequence[LoggedRequest]) -> bytes:
    return "".join(to_json_line(r) + "\n" for r in requests).encode()


def deal(requests: Sequence[LoggedRequest], files: int, rng: random.Random) -> list[list[LoggedRequest]]:
    """The requests shuffled and dealt at random into ``files`` files (some may be empty)."""
    shuffled = list(requests)
    rng.shuffle(shuffled)
    parts: list[list[LoggedRequest]] = [[] for _ in range(files)]
    for request in shuffled:
        parts[rng.randrange(files)].append(request)
    return parts


def write(folder: Path, parts: Sequence[Sequence[LoggedRequest]], compressed: Sequence[bool]) -> list[str]:
    paths = []
    for n, (part, gz) in enumerate(zip(parts, compressed, strict=True)):
        path = folder / f"part-{n}.jsonl{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(lines(part)) if gz else lines(part))
        paths.append(str(path))
    return paths


def shard_digest(paths: Sequence[str], policy: int, unit: str, memory: int, dedupe: bool = False) -> str:
    p = proposal(*POLICIES[policy])
    with tempfile.TemporaryDirectory() as workdir:
        run = shards.Run(sources.Selection(sources.prepare(paths, workdir)), p, unit, dedupe, memory, workdir)
        sim = shards.simulate(run)
    return str(report(sim, p, seed=4, iterations=300, unit=unit).result["digest"])


EXPECTED = {(policy, unit): digest(LOG, policy, unit) for policy in range(len(POLICIES)) for unit in UNITS}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), files=st.integers(1, 4), policy=st.integers(0, len(POLICIES) - 1),
       unit=st.sampled_from(UNITS), memory=st.sampled_from([32 * 1024, 2**30]), gz=st.lists(st.booleans(), min_size=4),
       presorted=st.booleans())
def test_any_order_and_split_into_files_gives_the_sorted_files_result(
        seed: int, files: int, policy: int, unit: str, memory: int, gz: list[bool], presorted: bool) -> None:
    """Files each sorted are merged as read; others are sorted, where 32 KiB of memory spills a run every 30-odd
    requests and 1 GiB holds them all."""
    rng = random.Random(seed)
    parts = deal(LOG, files, rng)
    if presorted:
        parts = [sorted(part, key=lambda r: (r.ts, r.id)) for part in parts]
    with tempfile.TemporaryDirectory() as folder:
        paths = write(Path(folder), parts, gz[:files])
        assert shard_digest(paths, policy, unit, memory) == EXPECTED[policy, unit]


@pytest.mark.parametrize("policy", range(len(POLICIES)))
@pytest.mark.parametrize("unit", UNITS)
def test_the_fast_engine_gives_the_reference_engines_digest(policy: int, unit: str) -> None:
    p = proposal(*POLICIES[policy])
    for seed in (1, 2, 3):
        log = synthetic_log(principals=50, seed=seed)
        fast = report(simulate(log, p, unit), p, seed=seed, iterations=300, unit=unit).result
        slow = report(reference.simulate(log, p, unit), p, seed=seed, iterations=300, unit=unit).result
        assert canonical(without_misses(fast)) == canonical(without_misses(slow))
        assert sum(fast["summary"]["misses"]["projected"].values()) == round(
            fast["summary"]["requests"] * (1 - float(fast["summary"]["hit_rate"]))), "every miss has one reason"


def without_misses(result: dict[str, Any]) -> dict[str, Any]:
    """The result but for its miss reasons (the reference engine predates them) and the digest covering them."""
    def strip(summary: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in summary.items() if k != "misses"}

    return {**{k: v for k, v in result.items() if k != "digest"}, "summary": strip(result["summary"]),
            "per_model": [strip(m) for m in result["per_model"]]}


# --- the command: several processes, standard input, gzip, spilled runs ------------------------------


def replay(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PROMPTCACHE, "replay", *args], input=stdin, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    path.write_text(json.dumps(SYNTHETIC_POLICY), encoding="utf-8")
    return path


def options(policy_file: Path, *extra: str) -> list[str]:
    return ["--policy", str(policy_file), "--tier-override", "5m=1h", "--seed", "3", "--iterations", "300",
            "--output", "json", *extra]


def test_workers_stdin_and_gzip_give_the_sorted_files_bytes(tmp_path: Path, policy_file: Path) -> None:
    whole = tmp_path / "sorted.jsonl"
    whole.write_bytes(lines(LOG))
    expected = replay("--log", str(whole), *options(policy_file))
    assert (expected.returncode, expected.stderr) == (0, b"")
    parts = deal(LOG, 3, random.Random(9))
    first, second = write(tmp_path, parts[:2], [False, True])
    for workers in ("1", "2", "3"):
        split = replay("--log", first, "--log", "-", "--log", second, "--workers", workers,
                       *options(policy_file), stdin=lines(parts[2]))
        assert (split.returncode, split.stderr, split.stdout) == (0, b"", expected.stdout), workers


def test_a_log_bigger_than_the_sort_memory_is_sorted_through_runs(tmp_path: Path, policy_file: Path) -> None:
    log = synthetic_log(principals=900, seed=8)
    whole = tmp_path / "sorted.jsonl"
    whole.write_bytes(lines(log))
    shuffled = list(log)
    random.Random(1).shuffle(shuffled)
    scrambled = tmp_path / "shuffled.jsonl"
    scrambled.write_bytes(lines(shuffled))
    assert len(lines(log)) > 3 * 2**20  # over three runs of 1 MiB
    expected = replay("--log", str(whole), *options(policy_file))
    for workers in ("1", "2"):
        result = replay("--log", str(scrambled), "--sort-memory", "1MiB", "--workers", workers, *options(policy_file))
        assert (result.returncode, result.stderr, result.stdout) == (0, b"", expected.stdout)


# --- repeated ids -------------------------------------------------------------------------------------


def fail(*args: str, stdin: bytes | None = None) -> str:
    result = replay(*args, stdin=stdin)
    assert (result.returncode, result.stdout) == (2, b""), result.stderr
    message = result.stderr.decode()
    assert message.count("\n") == 1 and message.endswith("\n") and "Traceback" not in message, message
    return message[:-1]


def test_identical_copies_are_an_error_unless_deduped(tmp_path: Path, policy_file: Path) -> None:
    whole = tmp_path / "all.jsonl"
    whole.write_bytes(lines(LOG))
    overlap = tmp_path / "overlap.jsonl.gz"
    overlap.write_bytes(gzip.compress(lines(LOG[10:25])))
    assert fail("--log", str(whole), "--log", str(overlap), *options(policy_file)) == (
        f"id {LOG[10].id!r} appears twice: {whole} line 11 and {overlap} line 1 (identical copies: pass --dedupe "
        "to drop them)")
    expected = json.loads(replay("--log", str(whole), *options(policy_file)).stdout)
    for workers in ("1", "2"):
        deduped = replay("--log", str(overlap), "--log", str(whole), "--dedupe", "--workers", workers,
                         *options(policy_file))
        assert deduped.returncode == 0, deduped.stderr
        result = json.loads(deduped.stdout)
        assert result["caveats"] == [*expected["caveats"], "15 identical copies of requests were dropped (--dedupe)"]
        assert {k: v for k, v in result.items() if k not in ("caveats", "digest")} == \
            {k: v for k, v in expected.items() if k not in ("caveats", "digest")}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("change", ["ts", "principal", "completion_tokens"])
def test_a_repeated_id_that_differs_is_an_error_even_deduped(tmp_path: Path, policy_file: Path, change: str,
                                                             workers: str) -> None:
    whole = tmp_path / "all.jsonl"
    whole.write_bytes(lines(LOG))
    original = LOG[30]
    value = {"ts": LOG[-1].ts, "principal": "someone-else", "completion_tokens": original.completion_tokens + 1}
    other = tmp_path / "other.jsonl"
    other.write_bytes(lines([msgspec.structs.replace(LOG[40], id="fresh"),
                             msgspec.structs.replace(original, **{change: value[change]})]))
    message = fail("--log", str(whole), "--log", str(other), "--dedupe", "--workers", workers, *options(policy_file))
    assert message == (f"id {original.id!r} appears twice with different contents: {whole} line 31 and {other} "
                       "line 2")


# --- bad files ----------------------------------------------------------------------------------------


def test_bad_files_give_one_line_naming_file_and_line(tmp_path: Path, policy_file: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(lines(LOG))
    others = [msgspec.structs.replace(r, id=f"other-{r.id}") for r in LOG[:40]]
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(gzip.compress(lines(others))[:-200])
    deep = tmp_path / "deep.jsonl"
    deep.write_bytes(lines(others[:2]) + b"[" * 200 + b"]" * 200 + b"\n")
    not_gzip = tmp_path / "bad.jsonl.gz"
    not_gzip.write_bytes(b"\x1f\x8b" + b"junk" * 10)
    for workers in ("1", "2"):
        common = ["--log", str(good), "--workers", workers, *options(policy_file)]
        assert fail("--log", str(tmp_path), *common) == f"cannot read {tmp_path}: [Errno 21] Is a directory: " \
            f"'{tmp_path}'"
        assert fail("--log", str(tmp_path / "missing.jsonl"), *common).startswith(
            f"cannot read {tmp_path / 'missing.jsonl'}: [Errno 2] No such file or directory")
        message = fail("--log", str(truncated), *common)
        assert message.startswith(f"{truncated}: line ") and message.endswith(
            ": truncated gzip data (the file ends before its end-of-stream marker)")
        assert fail("--log", str(deep), *common) == f"{deep}: line 3: nested more than 128 levels deep"
        assert fail("--log", str(not_gzip), *common).startswith(f"{not_gzip}: line 1: bad gzip data (")
        assert fail("--log", "-", *common, stdin=b"{}\n") == "standard input: line 1: id: missing"
    assert fail("--log", "-", "--log", "-", *options(policy_file), stdin=b"") == \
        "standard input can be given once (--log -)"


@pytest.mark.parametrize(("flags", "message"), [
    (["--workers", "0"], "invalid --workers: must be at least 1, got 0"),
    (["--workers", "two"], "invalid --workers: 'two' is not an integer"),
    (["--sort-memory", "12 parsecs"], "invalid --sort-memory: '12 parsecs' is not a size such as 512MiB, 2GiB or "
                                      "1000000"),
    (["--sort-memory", "1KiB"], "invalid --sort-memory: must be at least 1MiB, got 1KiB"),
    (["--sort-memory", "9" * 40], f"invalid --sort-memory: {'9' * 40!r} is not a size such as 512MiB"),
])
def test_bad_flags(tmp_path: Path, policy_file: Path, flags: list[str], message: str) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(lines(LOG[:5]))
    assert fail("--log", str(log), *flags, *options(policy_file)).startswith(message)


def test_workers_and_dedupe_are_for_files(policy_file: Path) -> None:
    assert fail("--database", "postgresql://postgres@127.0.0.1:1/postgres", "--workers", "2",
                *options(policy_file)) == ("--workers and --dedupe are for --log files (Postgres has one row per id, "
                                           "in order)")

"""docs/design.md#replay: ``promptcache replay``, run as the installed console script.

A log of agents in growing conversations (two models, a non-2xx request, a request without a chain) is
written as JSON Lines and imported into a fresh database; the command must give the engine's own result
from either source (byte for byte), draw its plot, and turn every bad input into one line and exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import asyncpg
import msgspec
import pytest

from promptcache.operator.cli import main
from promptcache.operator.replay.engine import canonical, report, simulate
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.storage.requestlog import LoggedRequest, import_rows, read_jsonl, to_json_line
from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
MODELS = {"model-a": (Decimal(3), Decimal(15)), "model-b": (Decimal("0.5"), Decimal("1.5"))}
POLICY_YAML = """\
apiVersion: promptcache.io/v1alpha1
kind: CachePolicy
metadata: {name: proposed}
spec:
  enabledTtls: ["5m", "1h"]
  readMultiplier: "0.1"
  minPrefixTokens: 1024
  automatic: {mode: lastUserMessage}
  redis: {maxMemory: 256mb}
"""
POLICY_DOC = {"enabledTtls": ["5m", "1h"], "readMultiplier": "0.1", "minPrefixTokens": 1024,
               "automatic": {"mode": "lastUserMessage"}}


def hh(*parts: object) -> bytes:
    return hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:16]


def conversation_log(principals: int = 8, turns: int = 12) -> list[LoggedRequest]:
    """Each principal's conversation grows by a question and an answer a turn; every 5th turn waits 10 minutes
    (its 5m entries expire). Billed at list price (as if nothing had been cached), so caching saves."""
    requests = []
    for p in range(principals):
        model = "model-a" if p % 2 == 0 else "model-b"
        inp, out = MODELS[model]
        chain = [ChainBlock(hh(p, "tools"), 1200, "tool_definition", None), ChainBlock(hh(p, "system"), 2100, "system",
                                                                                     "1h")]
        at = T0 + timedelta(seconds=7 * p)
        for t in range(turns):
            at += timedelta(minutes=10 if t % 5 == 4 else 2)
            chain.append(ChainBlock(hh(p, t, "q"), chain[-1].tokens + 300 + 10 * t, "user", None))
            marked = [*chain[:-1], ChainBlock(chain[-1].hash, chain[-1].tokens, "user", "5m")]
            prompt, completion = chain[-1].tokens + 9, 120
            status = 529 if (p, t) == (1, 3) else 200
            requests.append(LoggedRequest(
                id=f"r{p:02d}-{t:03d}", ts=at, principal=f"agent-{p}", model=model,
                tokenizer_version="tok@1", api="anthropic", status=status, prompt_tokens=prompt,
                completion_tokens=completion, read_tokens=0, creation_tokens={"5m": 0, "1h": 0, "24h": 0},
                input_per_mtok=inp, output_per_mtok=out, billed_cost=(prompt * inp + completion * out) / 1_000_000,
                list_cost=(prompt * inp + completion * out) / 1_000_000,
                chain=() if (p, t) == (2, 0) else tuple(marked),
            ))
            chain.append(ChainBlock(hh(p, t, "a"), chain[-1].tokens + 250, "assistant", None))
    return sorted(requests, key=lambda r: (r.ts, r.id))


REQUESTS = conversation_log()


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, "replay", *args], input=stdin, capture_output=True, text=True, timeout=120,
                          env=env)


def without_digest(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "digest"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("replay")
    log, policy = folder / "log.jsonl", folder / "policy.yaml"
    log.write_text("".join(to_json_line(r) + "\n" for r in REQUESTS), encoding="utf-8")
    policy.write_text(POLICY_YAML, encoding="utf-8")
    return {"log": log, "policy": policy, "folder": folder}


@pytest.fixture(scope="module")
async def database() -> AsyncIterator[str]:
    async with scratch_database("promptcache_replay") as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            assert await import_rows(conn, REQUESTS) == len(REQUESTS)
        finally:
            await conn.close()
        yield dsn


def common(files: dict[str, Path], *extra: str) -> list[str]:
    return ["--policy", str(files["policy"]), "--seed", "11", "--iterations", "400", "--unit", "principal", *extra]


def replayed(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    document: dict[str, Any] = json.loads(result.stdout)
    assert result.stdout == canonical(document) + "\n"
    return document


# --- output -------------------------------------------------------------------------------------------


def test_json_output_is_the_engines_result_with_its_digest(files: dict[str, Path]) -> None:
    result = replayed(run("--log", str(files["log"]), *common(files), "--output", "json"))
    assert result["digest"] == hashlib.sha256(canonical(without_digest(result)).encode()).hexdigest()

    proposal = Proposal(CachePolicy.from_spec(POLICY_DOC), POLICY_DOC)
    expected = report(simulate(read_jsonl(files["log"]), proposal, "principal"), proposal, seed=11, iterations=400,
                      unit="principal").result
    assert result == expected
    assert result["summary"]["requests"] == len(REQUESTS) - 2
    assert result["caveats"] == [
        "only 8 principal clusters: the intervals are rough",
        "1 requests had no prefix chain and were left out",
        "1 non-2xx requests were skipped",
    ]
    assert result["params"] == {"policy": POLICY_DOC, "tier_override": {}, "pricing_overrides": {}, "seed": 11,
                                "iterations": 400, "unit": "principal", "confidence": 0.95}
    assert [m["model"] for m in result["per_model"]] == ["model-a", "model-b"]
    assert Decimal(result["summary"]["savings"]) > 0
    lo, hi = (Decimal(x) for x in result["intervals"]["savings"])
    assert lo <= Decimal(result["summary"]["savings"]) <= hi


def test_json_is_the_default_off_a_terminal_and_is_reproducible(files: dict[str, Path]) -> None:
    first = run("--log", str(files["log"]), *common(files))
    second = run("--log", "-", *common(files), stdin=files["log"].read_text(encoding="utf-8"))
    assert replayed(first) == replayed(second)
    assert first.stdout == second.stdout


def test_table_output(files: dict[str, Path]) -> None:
    document = replayed(run("--log", str(files["log"]), *common(files)))
    result = run("--log", str(files["log"]), *common(files), "--output", "table")
    assert (result.returncode, result.stderr) == (0, "")
    text = result.stdout
    summary = document["summary"]
    assert text.startswith(f"Replay of {summary['requests']} requests: 400 bootstrap resamples by principal, "
                           "seed 11, 95% intervals\n")
    for label in ("baseline (billed)", "list price", "projected", "savings", "savings %", "hit rate",
                  "read token ratio", "cache writes"):
        assert f"\n  {label} " in text
    savings_line = next(line for line in text.splitlines() if line.startswith("  savings  "))
    assert savings_line.count("$") == 3  # the value and both bounds
    assert f"{Decimal(summary['savings_pct']).quantize(Decimal('0.01'))}%" in text
    model_rows = [line.split() for line in text.splitlines() if line.startswith("  model-")]
    assert [(row[0], row[1]) for row in model_rows] == [
        (m["model"], str(m["requests"])) for m in document["per_model"]
    ]
    assert "Caveats:\n  - only 8 principal clusters: the intervals are rough\n" in text
    assert text.endswith(f"Digest: sha256:{document['digest']}\n")


def test_table_is_the_default_on_a_terminal(files: dict[str, Path]) -> None:
    leader, follower = pty.openpty()
    try:
        process = subprocess.run([PROMPTCACHE, "replay", "--log", str(files["log"]), *common(files)],
                                 stdout=follower, stderr=subprocess.PIPE, timeout=120)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
    assert process.returncode == 0 and process.stderr == b""
    assert output.startswith(b"Replay of ")


def test_plot_draws_the_bootstrap_distribution(files: dict[str, Path], tmp_path: Path) -> None:
    png = tmp_path / "savings.png"
    result = run("--log", str(files["log"]), *common(files), "--output", "json", "--plot", str(png))
    replayed(result)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # axes, bars, lines and a legend, not an empty canvas


def test_the_picture_names_the_policy_and_the_baseline_and_has_break_even_models_and_misses() -> None:
    import numpy as np
    from matplotlib.patches import Rectangle
    from replay.test_replay import SYNTHETIC_OVERRIDE, SYNTHETIC_POLICY, proposal, synthetic_log

    from promptcache.operator.cli import plot
    from promptcache.operator.replay.engine import report, simulate
    from promptcache.operator.replay.misses import REASONS

    log = [msgspec.structs.replace(r, model="small" if n % 3 else "large")
           for n, r in enumerate(synthetic_log(principals=40, seed=3))]
    p = proposal(SYNTHETIC_POLICY, SYNTHETIC_OVERRIDE)
    replayed_ = report(simulate(log, p), p, seed=1, iterations=300)
    fig = plot.figure(replayed_, "the policy in proposal.yaml")
    title = fig.get_suptitle()
    assert title.startswith("Projected savings of the policy in proposal.yaml against the recorded bills (the "
                            "baseline)\n")
    assert "minPrefixTokens 256" in title and "tier 5m→1h" in title
    savings, models, misses = fig.axes
    lines = {str(line.get_label()).split(" ")[0]: list(np.asarray(line.get_xdata())) for line in savings.get_lines()}
    point = float(replayed_.result["summary"]["savings"])
    assert (lines["break-even:"], lines["point"]) == ([0, 0], [point, point])
    per_model = {m["model"]: m for m in replayed_.result["per_model"]}
    assert [t.get_text().split("\n")[0] for t in models.get_yticklabels()] == sorted(per_model)
    widths = [cast(Rectangle, bar).get_width() for bar in models.patches]
    assert widths == [float(per_model[m][k]) for k in ("baseline_cost", "projected_cost") for m in sorted(per_model)]
    counts = replayed_.result["summary"]["misses"]
    assert [t.get_text() for t in misses.get_yticklabels()] == [r.replace("_", " ") for r in REASONS]
    widths = [cast(Rectangle, bar).get_width() for bar in misses.patches]
    assert widths == [counts[side][r] for side in ("recorded", "projected") for r in REASONS]
    assert sum(counts["projected"].values()) > 0


def test_plot_without_matplotlib_says_so(files: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "site" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    result = run("--log", str(files["log"]), *common(files), "--plot", str(tmp_path / "x.png"), env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("--plot needs matplotlib, which is not installed: pip install 'promptcache[plot]'\n")
    assert not (tmp_path / "x.png").exists()


def test_progress_goes_to_stderr_only_on_a_terminal(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = tmp_path / "big.jsonl"
    log.write_text("".join(to_json_line(r) + "\n" for r in conversation_log(principals=840)), encoding="utf-8")
    assert main(["replay", "--log", str(log), *common(files, "--iterations", "100")]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["replay", "--log", str(log), *common(files, "--iterations", "100")]) == 0
    shown = capsys.readouterr()
    assert shown.out == quiet.out
    assert re.search(r"\r\x1b\[Kreplaying: \[#+\.*\] +\d+\.\d% of \d+ MiB, [\d.,]+ MiB/s, \d+ s left", shown.err)
    assert "bootstrapping: 100 resamples of 840 clusters" in shown.err
    assert shown.err.endswith("\r\x1b[K")


# --- overrides and filters ----------------------------------------------------------------------------


def test_overrides_change_the_projection_and_are_echoed(files: dict[str, Path]) -> None:
    base = replayed(run("--log", str(files["log"]), *common(files)))
    longer = replayed(run("--log", str(files["log"]), *common(files), "--tier-override", "5m=1h"))
    assert longer["params"]["tier_override"] == {"5m": "1h"}
    assert Decimal(longer["summary"]["creation_cost"]["5m"]) == 0 < Decimal(longer["summary"]["creation_cost"]["1h"])
    assert longer["summary"]["projected_cost"] != base["summary"]["projected_cost"]

    cheaper = replayed(run("--log", str(files["log"]), *common(files), "--price-override", "model-b=0.25:0.75"))
    assert cheaper["params"]["pricing_overrides"] == {"model-b": {"inputPerMTok": "0.25", "outputPerMTok": "0.75"}}
    a, b = cheaper["per_model"]
    assert a == base["per_model"][0]
    assert Decimal(b["projected_cost"]) * 2 == Decimal(base["per_model"][1]["projected_cost"])


@pytest.mark.parametrize("options", [
    ["--models", "model-b"],
    ["--since", "2025-03-01T09:30:00Z", "--until", "2025-03-01T10:00:00+00:00"],
    ["--models", "model-a,model-b", "--since", "2025-03-01T09:20:00Z"],
])
def test_filters_select_the_same_requests_from_a_file_and_from_postgres(files: dict[str, Path], database: str,
                                                                         options: list[str]) -> None:
    from_file = replayed(run("--log", str(files["log"]), *common(files), *options))
    from_db = replayed(run("--database", database, *common(files), *options))
    assert from_file == from_db

    given = dict(zip(options[::2], options[1::2], strict=True))
    since, until = given.get("--since"), given.get("--until")
    models = given.get("--models", ",".join(MODELS)).split(",")

    def selected(r: LoggedRequest) -> bool:
        return (r.model in models and (since is None or r.ts >= datetime.fromisoformat(since))
                and (until is None or r.ts < datetime.fromisoformat(until)) and r.status == 200 and bool(r.chain))

    assert from_file["summary"]["requests"] == sum(map(selected, REQUESTS)) > 0


def test_postgres_input_from_the_environment(files: dict[str, Path], database: str) -> None:
    from_file = replayed(run("--log", str(files["log"]), *common(files)))
    from_env = replayed(run(*common(files), env={**os.environ, "PROMPTCACHE_DATABASE_URL": database}))
    assert from_env == from_file


# --- bad input: one line on stderr, exit 2 ------------------------------------------------------------


def bad_files(folder: Path) -> Iterator[tuple[str, str]]:
    """Files the bad-input cases name (written once)."""
    lines = [to_json_line(r) for r in REQUESTS[:5]]
    yield "malformed.jsonl", "\n".join([*lines[:2], lines[2].replace('"status":200', '"status":"ok"'), *lines[3:]])
    yield "not-json.jsonl", "{\n"
    yield "deep.jsonl", "\n".join([lines[0], "[" * 100_000 + "]" * 100_000])
    yield "deep-policy.yaml", "enabledTtls: " + "[" * 5_000 + "]" * 5_000 + "\n"
    yield "empty.jsonl", ""
    yield "unknown-key.yaml", "enabledTtls: [5m]\nmaxBreakpoint: 3\n"
    yield "not-yaml.yaml", "enabledTtls: [5m\n"
    yield "bad-default.yaml", "cache:\n  enabledTtls: [1h]\n  defaultTtl: 5m\n"


BAD = [
    (["--log", "{folder}/missing.jsonl"], "cannot read {folder}/missing.jsonl: [Errno 2] No such file or directory"),
    (["--log", "{folder}/malformed.jsonl"],
     '{folder}/malformed.jsonl: line 3: status: must be an HTTP status (an integer from 100 to 599), got "ok"'),
    (["--log", "{folder}/not-json.jsonl"], "{folder}/not-json.jsonl: line 1: not valid JSON"),
    (["--log", "{folder}/deep.jsonl"], "{folder}/deep.jsonl: line 2: nested more than 128 levels deep"),
    (["--policy", "{folder}/deep-policy.yaml"],
     "invalid policy file {folder}/deep-policy.yaml: nested more than 128 levels deep"),
    (["--log", "{folder}/empty.jsonl"], "no logged requests in the selected window"),
    (["--models", "model-c"], "no logged requests in the selected window (--models model-c)"),
    (["--since", "2025-03-02T00:00:00Z"], "no logged requests in the selected window (--since 2025-03-02T00:00:00Z)"),
    (["--policy", "{folder}/unknown-key.yaml"], "invalid policy file {folder}/unknown-key.yaml: unknown cache policy "
                                                "keys ['maxBreakpoint']"),
    (["--policy", "{folder}/not-yaml.yaml"], "invalid policy file {folder}/not-yaml.yaml: while parsing"),
    (["--policy", "{folder}/bad-default.yaml"], "invalid policy file {folder}/bad-default.yaml: defaultTtl '5m' is "
                                                "not one of enabledTtls ['1h']"),
    (["--policy", "{folder}/missing.yaml"], "cannot read {folder}/missing.yaml: [Errno 2]"),
    (["--tier-override", "5m"], "invalid --tier-override '5m': expected FROM=TO with tiers from 5m, 1h, 24h"),
    (["--tier-override", "5m=2h"], "invalid --tier-override '5m=2h': expected FROM=TO"),
    (["--tier-override", "5m=1h", "--tier-override", "5m=24h"], "invalid --tier-override '5m=24h': 5m is already "
                                                                 "mapped to 1h"),
    (["--price-override", "model-a=3"], "invalid --price-override 'model-a=3': expected MODEL=IN:OUT"),
    (["--price-override", "model-a=3:1e2"], "invalid --price-override 'model-a=3:1e2': expected MODEL=IN:OUT"),
    (["--price-override", "=3:15"], "invalid --price-override '=3:15': expected MODEL=IN:OUT"),
    (["--models", "model-a", "--price-override", "model-b=1:2"],
     "invalid --price-override 'model-b=1:2': model-b is not one of --models model-a"),
    (["--since", "yesterday"], "invalid --since: 'yesterday' is not an RFC 3339 timestamp"),
    (["--until", "2025-03-01T10:00:00"], "invalid --until: '2025-03-01T10:00:00' is not an RFC 3339 timestamp"),
    (["--since", "2025-03-01T10:00:00Z", "--until", "2025-03-01T10:00:00Z"],
     "--since 2025-03-01T10:00:00Z is not before --until 2025-03-01T10:00:00Z"),
    (["--models", " , "], "--models ' , ' names no model"),
    (["--unit", "week"], "invalid --unit 'week': must be one of principal, day, request"),
    (["--seed", "x"], "invalid --seed: 'x' is not an integer"),
    (["--seed", "-1"], "invalid --seed: must be at least 0, got -1"),
    (["--iterations", "0"], "invalid --iterations: must be at least 1, got 0"),
    (["--confidence", "95"], "invalid --confidence: must be between 0 and 1 (exclusive), got 95"),
    (["--output", "yaml"], "invalid --output 'yaml': must be json or table"),
    (["--plot", "{folder}/no/such/dir/x.png"], "cannot write {folder}/no/such/dir/x.png: no directory"),
    (["--database", "postgresql://postgres@127.0.0.1:1/postgres"], "pass one of --log and --database, not both"),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_exits_2_with_one_line(files: dict[str, Path], options: list[str], message: str) -> None:
    folder = files["folder"]
    for name, text in bad_files(folder):
        (folder / name).write_text(text, encoding="utf-8")
    options = [o.replace("{folder}", str(folder)) for o in options]
    if "--log" not in options:
        options = ["--log", str(files["log"]), *options]
    if "--policy" not in options:
        options = [*options, "--policy", str(files["policy"])]
    result = run(*options)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert "Traceback" not in result.stderr
    assert message.replace("{folder}", str(folder)) in result.stderr


@pytest.mark.parametrize(("options", "message"), [
    ([], "no input: pass --log FILE or --database URL (or set PROMPTCACHE_DATABASE_URL)"),
    (["--database", "postgresql://postgres@127.0.0.1:1/postgres"], "database error: "),
    (["--database", "postgresql://127.0.0.1:notaport/db"], "invalid database URL: "),
    (["--log", "-", "--policy", "-"], "--log and --policy cannot both be standard input"),
    (["--log", "LOG"], "no policy: pass --policy FILE (a CachePolicy YAML)"),
])
def test_bad_sources_exit_2_with_one_line(files: dict[str, Path], options: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMPTCACHE_DATABASE_URL"}
    options = [str(files["log"]) if o == "LOG" else o for o in options]
    if "--log" not in options or "-" in options:
        options = [*options, *(["--policy", str(files["policy"])] if "--policy" not in options else [])]
    result = run(*options, env=env, stdin="")
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(message)

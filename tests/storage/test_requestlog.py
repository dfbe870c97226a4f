"""docs/design.md#request-log: the request log's JSON Lines export and import, through the installed ``promptcache``.

Rows are logged the real way (lookup → classify → reconcile → ``Ledger.commit``), exported
by the CLI, checked against hand-written JSON, imported into a second fresh database and exported
again, which must give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from promptcache.operator.cli import main
from promptcache.proxy.domain.classify import ChainBlock, candidates, classify
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.policy import DEFAULT_WRITE_MULTIPLIERS, CachePolicy
from promptcache.proxy.domain.pricing import Tariff, reconcile
from promptcache.proxy.storage.index import PrefixIndex
from promptcache.proxy.storage.ledger import Ledger, RequestRecord
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.requestlog import LogFormatError, LoggedRequest, parse_json_line, to_json_line
from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POLICY = CachePolicy()
TARIFF_A = Tariff("model-a", Decimal("3"), Decimal("15"), DEFAULT_WRITE_MULTIPLIERS, Decimal("0.1"))
TARIFF_B = Tariff("model-b", Decimal("0.5"), Decimal("1.5"), DEFAULT_WRITE_MULTIPLIERS, Decimal("0.1"))
ALICE = Scope("alice", "model-a", "cl100k_base@test")
BOB = Scope("bob", "model-b", "cl100k_base@test")


def hh(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def block(name: str, tokens: int, role: str, tier: str | None) -> ChainBlock:
    return ChainBlock(hh(name), tokens, role, tier)


SYSTEM = [block("tools", 1200, "tool_definition", None), block("system", 2100, "system", "1h")]
FIRST = [*SYSTEM, block("question", 3000, "user", "5m")]
SECOND = [*FIRST, block("answer", 3400, "assistant", None), block("follow-up", 4000, "user", "5m")]
UNMARKED = [block("b-system", 1500, "system", None), block("b-question", 1800, "user", None)]

# (id, ts, scope, chain, prompt tokens, status): two ids share a ts, logged in reverse id order.
REQUESTS: list[tuple[str, datetime, Scope, list[ChainBlock], int, int]] = [
    ("req-1", T0, ALICE, FIRST, 3010, 200),
    ("req-2", T0 + timedelta(minutes=2, milliseconds=250), ALICE, SECOND, 4010, 200),
    ("req-3", T0 + timedelta(minutes=3), BOB, UNMARKED, 1805, 503),
    ("req-5", T0 + timedelta(hours=1), BOB, UNMARKED, 1805, 200),
    ("req-4", T0 + timedelta(hours=1), ALICE, FIRST, 3010, 200),
]
EXPORT_ORDER = ["req-1", "req-2", "req-3", "req-4", "req-5"]
ENGINE_CACHED = {"req-2": 2999}
"""The upstream's own cache count, where it reported one (the others leave the key out)."""

# req-1 against an empty index: writes the 1h breakpoint (2100 tokens) and the 5m one (900 more);
# 10 prompt tokens of template overhead are uncached. Billed: (10·3 + 2100·3·2.0 + 900·3·1.25
# + 100·15) / 10⁶ = 17505 / 10⁶; list: (3010·3 + 100·15) / 10⁶ = 10530 / 10⁶.
FIRST_LINE: dict[str, Any] = {
    "id": "req-1",
    "ts": "2025-03-01T12:00:00Z",
    "principal": "alice",
    "model": "model-a",
    "tokenizer_version": "cl100k_base@test",
    "api": "openai",
    "status": 200,
    "prompt_tokens": 3010,
    "completion_tokens": 100,
    "read_tokens": 0,
    "creation_tokens": {"5m": 900, "1h": 2100, "24h": 0},
    "input_per_mtok": "3",
    "output_per_mtok": "15",
    "billed_cost": "0.017505",
    "list_cost": "0.01053",
    "chain": [
        {"h": hh("tools")[:16].hex(), "t": 1200, "r": "tool_definition", "m": None},
        {"h": hh("system")[:16].hex(), "t": 2100, "r": "system", "m": "1h"},
        {"h": hh("question")[:16].hex(), "t": 3000, "r": "user", "m": "5m"},
    ],
}
DOCUMENTED_KEYS = [
    "id", "ts", "principal", "model", "tokenizer_version", "api", "status", "prompt_tokens", "completion_tokens",
    "read_tokens", "creation_tokens", "input_per_mtok", "output_per_mtok", "billed_cost", "list_cost", "chain",
]  # fmt: skip


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, *args], input=stdin, capture_output=True, text=True, timeout=60)


async def commit(
    pg: Database,
    request_id: str,
    now: datetime,
    scope: Scope,
    chain: Sequence[ChainBlock],
    prompt: int,
    status: int,
) -> None:
    """What the proxy does for a finished request: look up, classify, reconcile with usage, commit."""
    found = await PrefixIndex(pg).lookup(scope, candidates(chain, POLICY))
    classification = classify(chain, found, POLICY, now)
    record = RequestRecord(
        request_id=request_id,
        started_at=now,
        scope=scope,
        api="openai",
        status=status,
        split=reconcile(prompt, 100, classification),
        tariff=TARIFF_A if scope is ALICE else TARIFF_B,
        chain=chain,
        classification=classification,
        latency_ms=42.0,
        engine_cached_tokens=ENGINE_CACHED.get(request_id),
    )
    assert await Ledger(pg).commit(record) is True


@pytest.fixture(scope="module")
async def source_dsn() -> AsyncIterator[str]:
    """A database of its own holding exactly :data:`REQUESTS`, so exports are fully predictable."""
    async with scratch_database("promptcache_log") as dsn:
        await migrate(dsn)
        pg = await Database.connect(dsn)
        try:
            for request in REQUESTS:
                await commit(pg, *request)
        finally:
            await pg.close()
        yield dsn


@pytest.fixture
async def target_dsn() -> AsyncIterator[str]:
    async with scratch_database("promptcache_log_import") as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture(scope="module")
async def malformed_dsn() -> AsyncIterator[str]:
    """Where malformed files are imported: it must stay empty."""
    async with scratch_database("promptcache_log_malformed") as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture(scope="module")
def exported(source_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    result = run("log", "export", "--database", source_dsn, "--output", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "exported 5 requests\n"
    return path


# --- export, import, round trip -----------------------------------------------------------------


def test_export_writes_the_documented_json_lines(exported: Path) -> None:
    lines = exported.read_text(encoding="utf-8").splitlines()
    documents = [json.loads(line) for line in lines]
    assert [d["id"] for d in documents] == EXPORT_ORDER
    assert documents[0] == FIRST_LINE
    assert all(list(d) == DOCUMENTED_KEYS + (["engine_cached_tokens"] if d["id"] in ENGINE_CACHED else [])
               for d in documents)
    assert [d.get("engine_cached_tokens") for d in documents] == [None, 2999, None, None, None]
    assert lines[0] == json.dumps(FIRST_LINE, separators=(",", ":"))

    second, failed, unmarked = documents[1], documents[2], documents[4]
    assert second["ts"] == "2025-03-01T12:02:00.250000Z"
    assert second["read_tokens"] == 3000 and [b["m"] for b in second["chain"]] == [None, "1h", "5m", None, "5m"]
    # A failed request is logged, not billed; a chain without markers keeps its null tiers.
    assert (failed["status"], failed["billed_cost"], failed["list_cost"]) == (503, "0", "0.0010525")
    assert [(b["t"], b["r"], b["m"]) for b in unmarked["chain"]] == [(1500, "system", None), (1800, "user", None)]


def test_import_into_a_fresh_database_exports_the_same_bytes(exported: Path, target_dsn: str, tmp_path: Path) -> None:
    result = run("log", "import", "--database", target_dsn, str(exported))
    assert (result.returncode, result.stdout, result.stderr) == (0, "imported 5 of 5 requests (0 already logged)\n", "")

    again = run("log", "export", "--database", target_dsn)
    assert again.returncode == 0, again.stderr
    assert again.stdout.encode() == exported.read_bytes()

    # Importing again adds nothing: the request id is the key.
    result = run("log", "import", "--database", target_dsn, "-", stdin=exported.read_text(encoding="utf-8"))
    assert (result.returncode, result.stdout) == (0, "imported 0 of 5 requests (5 already logged)\n")


@pytest.mark.parametrize(
    ("options", "ids"),
    [
        (["--since", "2025-03-01T12:02:00.25Z"], ["req-2", "req-3", "req-4", "req-5"]),
        (["--until", "2025-03-01T12:03:00Z"], ["req-1", "req-2"]),
        (["--since", "2025-03-01T13:02:00.250001+01:00", "--until", "2025-03-01T13:00:00Z"], ["req-3"]),
        (["--models", "model-b"], ["req-3", "req-5"]),
        (["--models", "model-a, model-c", "--since", "2025-03-01T12:01:00Z"], ["req-2", "req-4"]),
        (["--models", "model-c"], []),
    ],
)
def test_export_filters(source_dsn: str, options: list[str], ids: list[str]) -> None:
    result = run("log", "export", "--database", source_dsn, *options)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ids


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--since", "2025-03-01"],
            "invalid --since: '2025-03-01' is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z",
        ),
        (
            ["--until", "2025-03-01T12:00:00"],
            "invalid --until: '2025-03-01T12:00:00' is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z",
        ),
        (
            ["--since", "2025-03-02T00:00:00Z", "--until", "2025-03-01T00:00:00Z"],
            "--since 2025-03-02T00:00:00Z is not before --until 2025-03-01T00:00:00Z",
        ),
        (
            ["--since", "0001-01-01T00:00:00+01:00"],
            "invalid --since: '0001-01-01T00:00:00+01:00' is out of range in UTC (years 1 to 9999)",
        ),
        (["--models", " , "], "--models ' , ' names no model"),
    ],
)
def test_export_rejects_bad_options_in_one_line(source_dsn: str, options: list[str], message: str) -> None:
    result = run("log", "export", "--database", source_dsn, *options)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message + "\n")


def test_unreadable_file_and_unreachable_database_fail_in_one_line(tmp_path: Path, source_dsn: str) -> None:
    missing = tmp_path / "missing.jsonl"
    result = run("log", "import", "--database", source_dsn, str(missing))
    assert (result.returncode, result.stderr) == (
        2,
        f"cannot read {missing}: [Errno 2] No such file or directory: '{missing}'\n",
    )

    result = run("log", "export", "--database", "postgresql://postgres@127.0.0.1:1/postgres")
    assert result.returncode == 2
    assert result.stderr.startswith("database error: ") and result.stderr.count("\n") == 1


# --- malformed lines ----------------------------------------------------------------------------


def line_with(**changes: Any) -> str:
    """:data:`FIRST_LINE` with keys replaced (a value of ``...`` removes the key)."""
    document = {**FIRST_LINE, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...})


def chain_with(index: int, **changes: Any) -> list[dict[str, Any]]:
    chain = [dict(b) for b in FIRST_LINE["chain"]]
    chain[index] = {k: v for k, v in {**chain[index], **changes}.items() if v is not ...}
    return chain


COUNT = "must be an integer from 0 to 2147483647, got"
MONEY = 'must be a non-negative decimal string such as "0.0045", got'
MALFORMED = [
    ("{", "not valid JSON: Expecting property name enclosed in double quotes (column 2)"),
    ("[1, 2]", "must be a JSON object, got [1, 2]"),
    ('{"id": "a", "id": "b"}', "id: key appears twice"),
    (line_with(billed_cost=...), "billed_cost: missing"),
    (line_with(latency_ms=12.5), "unexpected key 'latency_ms'"),
    (line_with(id=""), 'id: must be a non-empty string, got ""'),
    (line_with(principal=7), "principal: must be a non-empty string, got 7"),
    (
        line_with(ts="2025-03-01T12:00:00"),
        "ts: '2025-03-01T12:00:00' is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z",
    ),
    (line_with(ts=1740830400), "ts: must be an RFC 3339 timestamp string, got 1740830400"),
    (
        line_with(ts="9999-12-31T23:59:59-05:00"),
        "ts: '9999-12-31T23:59:59-05:00' is out of range in UTC (years 1 to 9999)",
    ),
    (line_with(status="200"), 'status: must be an HTTP status (an integer from 100 to 599), got "200"'),
    (line_with(status=99), "status: must be an HTTP status (an integer from 100 to 599), got 99"),
    (line_with(prompt_tokens=-1), f"prompt_tokens: {COUNT} -1"),
    (line_with(read_tokens=True), f"read_tokens: {COUNT} true"),
    (line_with(completion_tokens=1.5), f"completion_tokens: {COUNT} 1.5"),
    (line_with(prompt_tokens=2**31), f"prompt_tokens: {COUNT} 2147483648"),
    (line_with(creation_tokens={"5m": 0, "1h": 0}), "creation_tokens.24h: missing"),
    (line_with(creation_tokens={"5m": 0, "1h": 0, "24h": 0, "2h": 0}), "creation_tokens: unexpected key '2h'"),
    (
        line_with(creation_tokens={"5m": -3, "1h": 0, "24h": 0}),
        f"creation_tokens.5m: {COUNT} -3",
    ),
    (line_with(creation_tokens=[0, 0, 0]), "creation_tokens: must be a JSON object, got [0, 0, 0]"),
    (
        line_with(billed_cost=0.017505),
        f"billed_cost: {MONEY} 0.017505",
    ),
    (line_with(list_cost="1e-3"), f'list_cost: {MONEY} "1e-3"'),
    (
        line_with(input_per_mtok="NaN"),
        f'input_per_mtok: {MONEY} "NaN"',
    ),
    (
        line_with(output_per_mtok="-1"),
        f'output_per_mtok: {MONEY} "-1"',
    ),
    (line_with(chain={}), "chain: must be an array, got {}"),
    (line_with(chain=[7]), "chain[0]: must be a JSON object, got 7"),
    (line_with(chain=chain_with(0, h="xyz")), 'chain[0].h: must be a hex string of 1 to 32 bytes, got "xyz"'),
    (line_with(chain=chain_with(0, h="abc")), 'chain[0].h: must be a hex string of 1 to 32 bytes, got "abc"'),
    (
        line_with(chain=chain_with(1, t=1000)),
        "chain[1].t: cumulative tokens must not decrease (previous block: 1200), got 1000",
    ),
    (line_with(chain=chain_with(1, m="2h")), 'chain[1].m: must be null or one of 5m, 1h, 24h, got "2h"'),
    (line_with(chain=chain_with(2, r="")), 'chain[2].r: must be a non-empty string, got ""'),
    (line_with(chain=chain_with(2, m=...)), "chain[2].m: missing"),
    (line_with(chain=chain_with(0, x=1)), "chain[0]: unexpected key 'x'"),
    ("[" * 100_000 + "]" * 100_000, "nested more than 128 levels deep"),
    (line_with(chain="@").replace('"@"', "[" * 129 + "]" * 129), "nested more than 128 levels deep"),
    (line_with(chain="@").replace('"@"', "[" * 127 + "]" * 127),
     "chain[0]: must be a JSON object, got " + "[" * 37 + "..."),
    (line_with(engine_cached_tokens=-1), f"engine_cached_tokens: {COUNT} -1"),
    (line_with(engine_cached_tokens="12"), f'engine_cached_tokens: {COUNT} "12"'),
    (line_with(engine_cached_tokens=None), f"engine_cached_tokens: {COUNT} null"),
    (line_with(engine_cached_tokens=2**63), f"engine_cached_tokens: {COUNT} 9223372036854775808"),
    (line_with(engine_cached_tokens=1e300), f"engine_cached_tokens: {COUNT} 1e+300"),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_parse_names_the_line_and_field(line: str, message: str) -> None:
    with pytest.raises(LogFormatError) as caught:
        parse_json_line(line, 7)
    assert str(caught.value) == f"line 7: {message}"


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_import_of_a_malformed_line_exits_2_with_one_line(
    malformed_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line_with(id="fresh") + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as caught:
        main(["log", "import", "--database", malformed_dsn, str(path)])
    assert caught.value.code == 2
    assert capsys.readouterr() == ("", f"{path}: line 3: {message}\n")


def test_a_malformed_line_imports_nothing(malformed_dsn: str, tmp_path: Path) -> None:
    """The whole file or nothing: the valid first line is not logged either."""
    path = tmp_path / "bad.jsonl"
    path.write_bytes(line_with().encode() + b"\n\xff\n")
    result = run("log", "import", "--database", malformed_dsn, str(path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"{path}: line 2: not UTF-8 (invalid start byte at byte 0)\n"
    empty = run("log", "export", "--database", malformed_dsn)
    assert (empty.returncode, empty.stdout) == (0, "")


# --- the line format on its own -----------------------------------------------------------------


def test_line_round_trip_keeps_precision_and_normalises_time() -> None:
    request = LoggedRequest(
        id="ünïcode-1",
        ts=datetime(2025, 3, 1, 13, 0, 0, 1, tzinfo=UTC),
        principal="p",
        model="m",
        tokenizer_version="t",
        api="anthropic",
        status=200,
        prompt_tokens=5,
        completion_tokens=1,
        read_tokens=0,
        creation_tokens={"5m": 0, "1h": 0, "24h": 0},
        input_per_mtok=Decimal("0.10"),
        output_per_mtok=Decimal("1E+1"),
        billed_cost=Decimal("1E-7"),
        list_cost=Decimal("0E-10"),
        chain=(),
    )
    line = to_json_line(request)
    assert line == (
        '{"id":"ünïcode-1","ts":"2025-03-01T13:00:00.000001Z","principal":"p","model":"m","tokenizer_version":"t",'
        '"api":"anthropic","status":200,"prompt_tokens":5,"completion_tokens":1,"read_tokens":0,'
        '"creation_tokens":{"5m":0,"1h":0,"24h":0},"input_per_mtok":"0.10","output_per_mtok":"10",'
        '"billed_cost":"0.0000001","list_cost":"0.0000000000","chain":[]}'
    )
    assert parse_json_line(line) == request
    reported = msgspec.structs.replace(request, engine_cached_tokens=4)
    assert to_json_line(reported) == line[:-1] + ',"engine_cached_tokens":4}'
    assert parse_json_line(to_json_line(reported)) == reported
    shifted = parse_json_line(line.replace("2025-03-01T13:00:00.000001Z", "2025-03-01t14:00:00.000001+01:00"))
    assert shifted.ts == request.ts and shifted.ts.tzinfo is UTC

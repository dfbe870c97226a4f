"""The ledger spool (docs/design.md#the-ledger-spool) and the group commit: rows kept on disk are exactly what was
spooled, survive a reopen, tolerate a torn last line and hostile lines, are bounded, locked to one process, and
land in Postgres once each however often a drain is interrupted."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from promptcache.proxy.metrics import Metrics
from promptcache.proxy.storage import spool as spool_module
from promptcache.proxy.storage.ledger import CommitRow, commit_row
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.spool import DiskSpool, MemorySpool, SpoolError
from promptcache.proxy.storage.store import Store

from support.builders import finished_request as record
from support.faults import Relay, wait_until
from support.proxy import model_config

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def rows(n: int) -> list[CommitRow]:
    return [commit_row(record(100 + i)) for i in range(n)]


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "spool"


async def test_rows_survive_a_reopen_exactly(directory: Path) -> None:
    spool = DiskSpool.open(directory, 1 << 20)
    written = rows(3)
    assert await spool.append(written[:2]) == []
    assert await spool.append(written[2:]) == []
    assert (spool.count, await spool.rows()) == (3, written)
    spool.close()
    again = DiskSpool.open(directory, 1 << 20)
    try:
        assert (again.count, again.size) == (3, sum(p.stat().st_size for p in segments(directory)))
        assert await again.rows() == written  # Decimal, datetime and bytes round-trip exactly
        segment = await again.oldest()
        assert segment is not None and segment[1] == written
        await again.release(segment[0])
        assert (again.count, again.size, segments(directory)) == (0, 0, [])
    finally:
        again.close()


async def test_a_second_process_cannot_take_a_held_directory(directory: Path) -> None:
    spool = DiskSpool.open(directory, 1 << 20)
    try:
        with pytest.raises(SpoolError, match="in use by another proxy"):
            DiskSpool.open(directory, 1 << 20)
    finally:
        spool.close()
    DiskSpool.open(directory, 1 << 20).close()  # released with the descriptor


async def test_a_torn_last_line_is_dropped_and_the_rest_kept(
        directory: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = DiskSpool.open(directory, 1 << 20)
    written = rows(2)
    await spool.append(written)
    spool.close()
    (segment,) = segments(directory)
    with segment.open("ab") as f:
        f.write(b'{"request_id":"torn-by-a-cra')  # a crash in the middle of an append
    with caplog.at_level(logging.WARNING, logger="promptcache.spool"):
        again = DiskSpool.open(directory, 1 << 20)
    try:
        assert any("torn last line" in r.getMessage() for r in caplog.records)
        assert (again.count, await again.rows()) == (2, written)
        await again.append(rows(1))  # appends after the truncated end, not after the torn bytes
        assert again.count == 3 and len(await again.rows()) == 3
    finally:
        again.close()


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"request_id": "caf\xe9"}',
    b'{"request_id": 1e999999}',
    b"not json",
    b'{"request_id": "x"}',
], ids=["deep", "latin1", "huge-number", "text", "missing-fields"])
async def test_a_line_that_is_not_a_commit_is_logged_and_skipped(
        directory: Path, caplog: pytest.LogCaptureFixture, line: bytes) -> None:
    spool = DiskSpool.open(directory, 1 << 20)
    written = rows(2)
    await spool.append(written)
    spool.close()
    (segment,) = segments(directory)
    first, second = segment.read_bytes().splitlines(keepends=True)
    segment.write_bytes(first + line + b"\n" + second)
    again = DiskSpool.open(directory, 1 << 20)
    try:
        with caplog.at_level(logging.ERROR, logger="promptcache.spool"):
            found = await again.oldest()
        assert found is not None and found[1] == written
        (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "line 2 is not a commit" in error
    finally:
        again.close()


async def test_rows_past_the_bound_are_refused_whole() -> None:
    spool = MemorySpool(1)
    written = rows(2)
    assert await spool.append(written) == written
    spool.max_bytes = 10 << 10
    assert await spool.append(written[:1]) == []
    spool.max_bytes = spool.size
    assert await spool.append(written[1:]) == written[1:]
    assert spool.count == 1


async def test_a_read_segment_is_sealed_and_full_segments_roll_over(
        directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1)  # every append fills its segment
    spool = DiskSpool.open(directory, 1 << 20)
    try:
        written = rows(3)
        for row in written:
            await spool.append([row])
        assert len(segments(directory)) == 3
        monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1 << 20)
        first = await spool.oldest()
        assert first is not None and first[1] == written[:1]
        await spool.append(rows(1))  # not into the segment being drained
        assert len(segments(directory)) == 4
    finally:
        spool.close()


async def test_an_interrupted_drain_replays_without_billing_twice(pg: Database, pg_dsn: str,
                                                                 directory: Path) -> None:
    """A proxy killed after a segment landed but before it was deleted drains it again at start-up."""
    written = rows(5)
    spool = DiskSpool.open(directory, 1 << 20)
    try:
        store = Store(pg, None, Metrics(), spool=spool, batch_limit=2)
        await spool.append(written)
        assert await store.drain_spool() == 5
        await spool.append(written)  # as if the release never happened
        assert await store.drain_spool() == 5
        assert spool.count == 0
    finally:
        spool.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        ids = await conn.fetch("SELECT request_id FROM ledger WHERE request_id = ANY($1::text[])",
                               [r.request_id for r in written])
    finally:
        await conn.close()
    assert sorted(r["request_id"] for r in ids) == sorted(r.request_id for r in written)


async def test_a_group_commit_lands_every_row_and_sets_aside_only_a_refused_one(
        pg: Database, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    store = Store(pg, None, metrics, batch_limit=4)
    good = [record(100 + i) for i in range(6)]
    bad = record(2**40)  # a cumulative count beyond Postgres integer: refused
    futures = [store.submit(r) for r in [*good[:3], bad, *good[3:]]]
    with caplog.at_level(logging.ERROR, logger="promptcache.store"):
        await store.commit_pending()
    await asyncio.gather(*futures)
    assert metrics.registry.get_sample_value("promptcache_commit_batch_size_count") == 2.0  # 7 rows, groups of 4
    assert metrics.registry.get_sample_value("promptcache_commit_batch_size_sum") == 7.0
    assert metrics.registry.get_sample_value("promptcache_ledger_dropped_total") == 1.0
    assert any(bad.request_id in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)
    assert store.spool.count == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        landed = await conn.fetch("SELECT request_id FROM ledger WHERE request_id = ANY($1::text[])",
                                  [r.request_id for r in [*good, bad]])
    finally:
        await conn.close()
    assert sorted(r["request_id"] for r in landed) == sorted(r.request_id for r in good)


def proxy_config(path: Path, tokenizer: Path) -> Path:
    path.write_text(yaml.safe_dump({"models": [model_config("chat", "http://127.0.0.1:9/v1", "openai", tokenizer)]}))
    return path


@pytest.mark.parametrize(("args", "status", "message"), [
    (["--spool-max-mb", "0"], 2, "--spool-max-mb must be positive"),
    (["--spool-dir", "/dev/null/spool"], 78, "cannot open the ledger spool: spool directory /dev/null/spool"),
])
def test_the_proxy_refuses_a_spool_it_cannot_use(tmp_path: Path, word_tokenizer: Path, args: list[str], status: int,
                                                  message: str) -> None:
    config = proxy_config(tmp_path / "proxy.yaml", word_tokenizer)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    done = subprocess.run([PROMPTCACHE, "proxy", "--config", str(config), "--port", "0", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == status
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert "Traceback" not in done.stderr


def test_a_held_spool_directory_stops_a_second_proxy(tmp_path: Path, word_tokenizer: Path) -> None:
    directory = tmp_path / "spool"
    held = DiskSpool.open(directory / "worker-0", 1 << 20)
    try:
        config = proxy_config(tmp_path / "proxy.yaml", word_tokenizer)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
        done = subprocess.run([PROMPTCACHE, "proxy", "--config", str(config), "--port", "0", "--spool-dir",
                               str(directory)], env=env, capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert done.returncode == 78
    assert done.stderr.strip().splitlines()[-1] == \
        f"cannot open the ledger spool: spool directory {directory}/worker-0 is in use by another proxy"


async def test_a_group_in_flight_when_the_store_stops_is_not_lost(pg_dsn: str, pg_relay: Relay) -> None:
    """Stopping cancels the committer mid-round-trip; the group it held goes back to be committed by the stop (a
    second time if the first landed after all, which the request id makes harmless)."""
    relay = pg_relay
    db = await Database.connect(relay.dsn(pg_dsn))
    try:
        store = Store(db, None, Metrics())
        store.start()
        relay.delay, relay.delayed_reads = 0.5, 1  # the next answer from Postgres, the group's, is held
        records = [record(100 + i) for i in range(3)]
        for r in records:
            store.submit(r)

        async def in_flight() -> bool:
            return relay.held > 0

        await wait_until(in_flight, "the group's round trip")
        await store.stop()
    finally:
        await db.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        landed = await conn.fetch("SELECT request_id FROM ledger WHERE request_id = ANY($1::text[])",
                                  [r.request_id for r in records])
    finally:
        await conn.close()
    assert sorted(r["request_id"] for r in landed) == sorted(r.request_id for r in records)

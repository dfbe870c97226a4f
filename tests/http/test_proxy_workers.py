"""``promptcache proxy --workers N`` (issue 13 item 14): N processes on one port, each billing into the same ledger;
one /metrics for the pod whichever worker answers it; a stop drains every worker; a worker that dies takes the
pod's process down with it; spools of workers a smaller ``--workers`` no longer runs are adopted and drained."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import aiohttp
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from promptcache.proxy.storage.ledger import commit_row
from promptcache.proxy.storage.spool import DiskSpool
from promptcache.proxy.testing.simulator import Simulator

from support.builders import finished_request
from support.faults import fetch, free_port, wait_until
from support.proxy import model_config, new_key, unique, words

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
PROMPT = 20 + 3
COST = (PROMPT * Decimal("3.00") + 8 * Decimal("15.00")) / 1_000_000


@pytest.fixture
def config(tmp_path: Path, simulator: tuple[str, Simulator], word_tokenizer: Path) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({"models": [model_config("chat", simulator[0] + "/v1", "openai",
                                                            word_tokenizer)]}))
    return path


class Workers:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return sorted(c.pid for c in psutil.Process(self.process.pid).children()
                      if "multiprocessing.resource_tracker" not in " ".join(c.cmdline()))


StartWorkers = Callable[[int, Path], Awaitable[Workers]]


@pytest.fixture
async def start(tmp_path: Path, config: Path, pg_dsn: str) -> AsyncIterator[StartWorkers]:
    started: list[asyncio.subprocess.Process] = []

    async def run(workers: int, spool: Path) -> Workers:
        port = free_port()
        log = tmp_path / f"proxy-{port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTCACHE_", "PROMETHEUS_"))}
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                PROMPTCACHE, "proxy", "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                "--database", pg_dsn, "--spool-dir", str(spool), "--workers", str(workers), env=env,
                stdout=out, stderr=out)
        started.append(process)
        running = Workers(process, port, log)

        async def ready() -> bool:
            assert process.returncode is None, log.read_text()[-3000:]
            try:
                async with aiohttp.ClientSession() as http, http.get(running.url + "/readyz") as response:
                    return response.status == 200 and len(running.pids()) == workers
            except aiohttp.ClientError:
                return False

        await wait_until(ready, f"{workers} workers", within=60)
        return running

    yield run
    for process in started:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


def requests_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "promptcache_requests"
               for s in f.samples if s.name == "promptcache_requests_total")


async def test_two_workers_share_the_port_the_ledger_and_one_metrics_view(
        start: StartWorkers, tmp_path: Path, pg_dsn: str) -> None:
    proxy = await start(2, tmp_path / "spool")
    principal = unique("workers")
    key = await new_key(pg_dsn, principal)
    headers = {"authorization": f"Bearer {key}"}
    ids: list[str] = []
    for i in range(24):  # a connection each, so the kernel spreads them over both listeners
        async with aiohttp.ClientSession() as http, http.post(proxy.url + "/v1/chat/completions", headers=headers,
                                                             json={"model": "chat", "messages": [
                                                                 {"role": "user", "content": words(f"w{i}x", 20)}]},
                                                             ) as response:
            assert response.status == 200, await response.text()
            ids.append(response.headers["x-request-id"])
    for _ in range(12):  # whichever worker answers, the pod's totals
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/metrics") as response:
            assert requests_total(await response.text()) == 24.0
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["worker-0", "worker-1"]

    proxy.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proxy.process.wait(), 30) == 0
    rows = await fetch(pg_dsn, "SELECT request_id, cost FROM ledger WHERE principal_id = $1", principal)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["cost"] for r in rows} == {COST}


async def test_a_dead_worker_stops_the_rest_and_the_process_fails(start: StartWorkers, tmp_path: Path) -> None:
    proxy = await start(2, tmp_path / "spool")
    first, second = proxy.pids()
    os.kill(first, signal.SIGKILL)
    assert await asyncio.wait_for(proxy.process.wait(), 30) != 0
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE


async def test_a_supervisor_killed_outright_takes_its_workers_with_it(start: StartWorkers, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) leaves the parent no chance to pass a stop on: the kernel does, and the workers leave
    the port instead of holding it as orphans."""
    proxy = await start(2, tmp_path / "spool")
    workers = [psutil.Process(pid) for pid in proxy.pids()]
    proxy.process.kill()
    await proxy.process.wait()
    gone, alive = await asyncio.to_thread(psutil.wait_procs, workers, 30)
    assert alive == [] and len(gone) == 2


async def test_spools_of_workers_no_longer_run_are_adopted_and_drained(
        start: StartWorkers, tmp_path: Path, pg_dsn: str) -> None:
    spool = tmp_path / "spool"
    rows = [commit_row(finished_request(100 + i)) for i in range(3)]
    orphan = DiskSpool.open(spool / "worker-3", 1 << 20)  # left by an earlier --workers 4 during an outage
    await orphan.append(rows)
    orphan.close()
    await start(2, spool)

    async def landed() -> bool:
        found = await fetch(pg_dsn, "SELECT 1 FROM ledger WHERE request_id = ANY($1::text[])",
                            [r.request_id for r in rows])
        return len(found) == 3 and not list((spool / "worker-0").glob("*.jsonl"))

    await wait_until(landed, "the adopted rows to land and their segment to go", within=30)
    assert not (spool / "worker-3").exists()


@pytest.mark.parametrize("workers", ["0", "65"])
async def test_a_worker_count_out_of_range_is_refused(config: Path, workers: str) -> None:
    process = await asyncio.create_subprocess_exec(PROMPTCACHE, "proxy", "--config", str(config), "--workers",
                                                   workers, stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert (process.returncode, err.decode().strip().splitlines()[-1]) == (2, "--workers must be from 1 to 64")

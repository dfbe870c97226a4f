"""The durable-spool drill (issue 13 item 8), as an operator would run it: the proxy's own Postgres stopped,
N requests answered at list price, the proxy SIGKILLed with their bills only in its spool directory, started
again, Postgres started: every one of the N has exactly one ledger row, at its exact price.

Counts as in test_proxy_api: with the word tokenizer ``words(p, n)`` is n tokens, the simulated upstream adds 3
template tokens per message and replies with 8; prices 3.00 in / 15.00 out per million."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator

from support.faults import PrivatePostgres, fetch, free_port, wait_until
from support.proxy import model_config, new_key, unique, words

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
N = 40
PROMPT = 20 + 3
COST = (PROMPT * Decimal("3.00") + 8 * Decimal("15.00")) / 1_000_000


class ProxyProcess:
    """``promptcache proxy`` as its own process, with a spool directory and a log file."""

    def __init__(self, config: Path, dsn: str, spool: Path, log: Path) -> None:
        self.port = free_port()
        self.args = [PROMPTCACHE, "proxy", "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                     "--database", dsn, "--spool-dir", str(spool), "--degraded-ok"]
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(*self.args, env=env, stdout=log, stderr=log)
        await wait_until(self._ready, "the proxy to answer /readyz", within=30)

    async def _ready(self) -> bool:
        try:
            await self.readyz()
            return True
        except aiohttp.ClientError:
            assert self.process is not None and self.process.returncode is None, self.log.read_text()[-3000:]
            return False

    async def readyz(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/readyz") as response:
            body: dict[str, Any] = await response.json()
            return body

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@pytest.fixture
async def postgres() -> AsyncIterator[PrivatePostgres]:
    pg = PrivatePostgres()
    await pg.start()
    try:
        yield pg
    finally:
        await pg.remove()


async def test_bills_of_a_killed_proxy_land_from_its_spool_exactly_once(
    tmp_path: Path, postgres: PrivatePostgres, simulator: tuple[str, Simulator], word_tokenizer: Path,
) -> None:
    await migrate(postgres.dsn)
    principal = unique("drill")
    key = await new_key(postgres.dsn, principal)
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({"models": [model_config("chat", simulator[0] + "/v1", "openai",
                                                              word_tokenizer)]}))
    spool = tmp_path / "spool"
    proxy = ProxyProcess(config, postgres.dsn, spool, tmp_path / "proxy.log")
    await proxy.start()
    try:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)

        async def ask(i: int) -> str:
            completion = await client.chat.completions.with_raw_response.create(
                model="chat", messages=[{"role": "user", "content": words(f"q{i}w", 20)}])
            usage = completion.parse().usage
            assert usage is not None and usage.prompt_tokens_details is not None
            assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (PROMPT, 0)
            return completion.headers["x-request-id"]

        first = await ask(N)  # Postgres up: billed at once, and the key is known to the proxy
        await wait_until(lambda: _landed(postgres.dsn, [first]), "the first bill")

        await postgres.stop()
        semaphore = asyncio.Semaphore(8)

        async def limited(i: int) -> str:
            async with semaphore:
                return await ask(i)

        ids = await asyncio.gather(*(limited(i) for i in range(N)))
        assert len(set(ids)) == N

        async def spooled() -> bool:
            return bool((await proxy.readyz())["spooled"] == N)

        await wait_until(spooled, f"{N} bills in the spool")
        await proxy.kill()
        lines = b"".join(p.read_bytes() for p in sorted((spool / "worker-0").glob("*.jsonl"))).splitlines()
        assert len(lines) == N and all(i.encode() in b"".join(lines) for i in ids)

        await proxy.start()  # Postgres still down: the proxy takes over the spool and serves
        body = await proxy.readyz()
        assert (body["postgres"].startswith("down"), body["spooled"]) == (True, N)

        await postgres.start()

        async def drained() -> bool:
            return bool((await proxy.readyz())["spooled"] == 0)

        await wait_until(drained, "the spool to drain", within=30)
        rows = await fetch(postgres.dsn, "SELECT request_id, prompt_tokens, read_tokens, cost, list_cost, "
                           "tariff_version FROM ledger WHERE principal_id = $1", principal)
        assert sorted(r["request_id"] for r in rows) == sorted([first, *ids])  # exactly one row each
        assert {(r["prompt_tokens"], r["read_tokens"], r["cost"], r["list_cost"]) for r in rows} == \
            {(PROMPT, 0, COST, COST)}
        assert all(r["tariff_version"] is not None for r in rows)
        logged = await fetch(postgres.dsn, "SELECT count(*) AS n FROM request_log WHERE principal_id = $1",
                             principal)
        assert logged[0]["n"] == N + 1
        assert list((spool / "worker-0").glob("*.jsonl")) == []
        assert "Traceback" not in proxy.log.read_text()
    finally:
        await proxy.stop()


async def _landed(dsn: str, ids: list[str]) -> bool:
    try:
        rows = await fetch(dsn, "SELECT 1 FROM ledger WHERE request_id = ANY($1::text[])", ids)
    except OSError:
        return False
    return len(rows) == len(ids)

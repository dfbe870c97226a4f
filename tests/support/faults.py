"""Helpers for the end-to-end proxy tests: fault injection, direct database reads, a worked conversation.

The shared Postgres and Redis servers are never stopped or reconfigured: a test that needs
Postgres slow or unreachable puts a :class:`Relay` between the proxy and it, and a test that
needs Redis to die runs its own ``redis-server`` (:class:`PrivateRedis`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import anthropic
import asyncpg
import openai
import redis.asyncio as aioredis
from anthropic.types import MessageParam, TextBlockParam
from openai.types.chat import ChatCompletionMessageParam
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from promptcache.proxy.testing.simulator import REPLY

from support.proxy import RunningProxy, text, words


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Poll ``check`` until it holds; a wait for a background effect, never a timing assertion."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


class Relay:
    """A TCP relay on a loopback port in front of ``target``.

    ``delay`` seconds are added before each chunk of at most ``chunk`` bytes travels from the
    target back to the client (so a slowed HTTP upstream trickles its body); ``delayed_reads``,
    when set, limits that to the next so many chunks (so one Postgres read is slow, and the
    commits after it are not). :meth:`cut` closes the listener and every open connection, so
    the target looks unreachable; :meth:`restore` listens on the same port again.
    """

    def __init__(self, target_host: str, target_port: int, *, delay: float = 0.0, chunk: int = 65536) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.delayed_reads: int | None = None
        self.drop_next = 0
        """The next so many requests are met with a reset instead, on whichever connection they come (a fresh one or a
        kept-alive one): a server's side of a keep-alive connection it had already closed."""
        self.held = 0
        """Chunks being delayed right now."""
        self.chunk = chunk
        self.port = 0
        """Picked by the kernel at the first :meth:`start`, and kept by :meth:`restore`."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def restore(self) -> None:
        assert self._server is None, "the relay is already listening"
        await self.start()

    async def cut(self) -> None:
        """Stop listening and drop every connection (RST), as a network partition would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.cut()

    @classmethod
    async def to_postgres(cls, dsn: str) -> Relay:
        """A relay in front of the Postgres server ``dsn`` names; :meth:`dsn` gives the DSN through it."""
        parts = urlsplit(dsn)
        return await cls(parts.hostname or "127.0.0.1", parts.port or 5432).start()

    def dsn(self, dsn: str) -> str:
        """``dsn`` with its host and port replaced by the relay's."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        up = asyncio.create_task(self._pump(client_r, server_w, slow=False, client=client_w))
        down = asyncio.create_task(self._pump(server_r, client_w, slow=True))
        self._tasks.update((up, down))
        for task in (up, down):
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, slow: bool,
                    client: asyncio.StreamWriter | None = None) -> None:
        try:
            while data := await reader.read(self.chunk if slow else 65536):
                if client is not None and self.drop_next:
                    self.drop_next -= 1
                    client.transport.abort()
                    writer.transport.abort()
                    return
                if slow and self.delay and self.delayed_reads != 0:
                    if self.delayed_reads is not None:
                        self.delayed_reads -= 1
                    self.held += 1
                    try:
                        await asyncio.sleep(self.delay)
                        writer.write(data)
                    finally:
                        self.held -= 1
                else:
                    writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()


class PrivateRedis:
    """A throwaway ``redis-server`` on a free port (no persistence), that a test may stop and start."""

    def __init__(self, *server_args: str) -> None:
        self.server_args = server_args
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert self.process is None
        self.process = await asyncio.create_subprocess_exec(
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            *self.server_args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        client = self.client()
        try:
            async def up() -> bool:
                try:
                    return bool(await client.ping())
                except (OSError, aioredis.ConnectionError):
                    return False

            await wait_until(up, f"redis-server on port {self.port}")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        await process.wait()

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0))






class PrivatePostgres:
    """A throwaway Postgres cluster (the machine's binaries, ``initdb`` into a directory of its own under the
    system temp dir, trust auth, a free port on loopback), that a test may stop and start, then
    :meth:`remove`. As root the server runs as ``postgres``, which ``initdb`` demands (and so its directory
    is not under pytest's root-only ``tmp_path``)."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("PostgreSQL's server binaries are not installed (run .ci/setup)")
        self.bin = found[-1].parent
        self.directory = Path(tempfile.mkdtemp(prefix="promptcache-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)

    async def _run(self, *command: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._as_owner(*command), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {out.decode(errors='replace')}")

    async def start(self) -> None:
        if not self.data.exists():
            if os.geteuid() == 0:
                shutil.chown(self.directory, "postgres", "postgres")
            await self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                            "--no-sync", "-E", "UTF8")
        await self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.directory / "log"),
                        "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "start")

    async def stop(self) -> None:
        """A fast shutdown: sessions are cut, as in an outage."""
        if (self.data / "postmaster.pid").exists():
            await self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")

    async def remove(self) -> None:
        await self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


async def fetch(pg_dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Rows straight from the database (never through the proxy or a relay)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def ledger_rows(pg_dsn: str, principal: str) -> list[asyncpg.Record]:
    return await fetch(pg_dsn, "SELECT * FROM ledger WHERE principal_id = $1 ORDER BY started_at", principal)


async def log_rows(pg_dsn: str, principal: str) -> list[asyncpg.Record]:
    return await fetch(pg_dsn, "SELECT * FROM request_log WHERE principal_id = $1 ORDER BY ts", principal)


async def entries(pg_dsn: str, principal: str) -> list[asyncpg.Record]:
    return await fetch(pg_dsn, "SELECT * FROM cache_entries WHERE principal_id = $1 ORDER BY virtual_model, cum_tokens",
                       principal)


def splits(rows: Sequence[asyncpg.Record]) -> list[tuple[int, ...]]:
    """(prompt, completion, read, 5m, 1h, 24h, uncached) per ledger row."""
    return [(r["prompt_tokens"], r["completion_tokens"], r["read_tokens"], r["creation_5m"], r["creation_1h"],
             r["creation_24h"], r["uncached_tokens"]) for r in rows]


# -- the worked conversation (as in test_proxy_billing) ------------------------------------------
#
# The word tokenizer makes a block of ``words(p, n)`` n tokens; the simulated upstream adds 3
# template tokens per message (and per Anthropic system field) and replies with 8 tokens.
# Prices 3.00 in / 15.00 out per million; multipliers 1h 2.0, 5m 1.25, read 0.1.

SYSTEM = words("sys", 20)
USER = [words("first", 10), words("second", 10)]




def openai_turn(n: int) -> list[ChatCompletionMessageParam]:
    """Turn ``n`` (0 or 1): a 1h system prompt, the history, and a 5m-marked user message."""
    history: list[dict[str, Any]] = []
    for user in USER[:n]:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    # cache_control is not in the SDK's types: the SDK sends the dicts as they are.
    return cast(list[ChatCompletionMessageParam], [
        {"role": "system", "content": [text(SYSTEM, "1h")]}, *history,
        {"role": "user", "content": [text(USER[n], "5m")]}])


def anthropic_turn(n: int) -> tuple[list[TextBlockParam], list[MessageParam]]:
    """The same turn for the Messages API: (system, messages)."""
    history: list[dict[str, Any]] = []
    for user in USER[:n]:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
    return (cast(list[TextBlockParam], [text(SYSTEM, "1h")]),
            cast(list[MessageParam], [*history, {"role": "user", "content": [text(USER[n], "5m")]}]))


# (prompt, completion, read, 5m, 1h, 24h, uncached) and cost, worked by hand:
# turn 0: chain sys 20 (1h) · u0 30 (5m); prompt 30 + 3·2 = 36; writes 1h 20, 5m 10; uncached 6
#   (6·3 + 20·3·2.0 + 10·3·1.25 + 8·15) / 1e6 = (18 + 120 + 37.5 + 120) / 1e6 = 0.0002955
TURN0 = (36, 8, 0, 10, 20, 0, 6)
TURN0_COST = Decimal("0.0002955")
# turn 0 again, once cached: read 30 (u0, the deepest live hit), nothing written; uncached 6
#   (6·3 + 30·3·0.1 + 120) / 1e6 = (18 + 9 + 120) / 1e6 = 0.000147
TURN0_AGAIN = (36, 8, 30, 0, 0, 0, 6)
TURN0_AGAIN_COST = Decimal("0.000147")
# turn 1: chain sys 20 · u0 30 · a0 38 · u1 48 (5m); prompt 48 + 3·4 = 60; read 30, write 5m 18; uncached 12
#   (12·3 + 30·3·0.1 + 18·3·1.25 + 120) / 1e6 = (36 + 9 + 67.5 + 120) / 1e6 = 0.0002325
TURN1 = (60, 8, 30, 18, 0, 0, 12)
TURN1_COST = Decimal("0.0002325")
# list price of turn 0: (36·3 + 8·15) / 1e6 = 0.000228
TURN0_LIST = (36, 8, 0, 0, 0, 0, 36)
TURN0_LIST_COST = Decimal("0.000228")
# turn 1 again, once cached: read 48 (u1), nothing written; uncached 12
#   (12·3 + 48·3·0.1 + 120) / 1e6 = (36 + 14.4 + 120) / 1e6 = 0.0001704
TURN1_AGAIN = (60, 8, 48, 0, 0, 0, 12)
TURN1_AGAIN_COST = Decimal("0.0001704")


@dataclass
class Clients:
    oa: openai.AsyncOpenAI
    an: anthropic.AsyncAnthropic


SDK = Callable[[RunningProxy, str], Clients]


async def complete(c: Clients, api: str, model: str, turn: int) -> tuple[tuple[int, ...], str]:
    """One non-streaming request through the API's SDK: (its usage as a split tuple, its request id)."""
    oa, an = c.oa, c.an
    if api == "openai":
        raw = await oa.chat.completions.with_raw_response.create(model=model, messages=openai_turn(turn))
        u = raw.parse().usage
        assert u is not None and u.prompt_tokens_details is not None
        extra = u.model_extra or {}
        creation = extra["cache_creation"]
        assert u.prompt_tokens_details.cached_tokens == extra["cache_read_input_tokens"]
        usage = (u.prompt_tokens, u.completion_tokens, extra["cache_read_input_tokens"],
                 creation["ephemeral_5m_input_tokens"], creation["ephemeral_1h_input_tokens"],
                 creation["ephemeral_24h_input_tokens"],
                 u.prompt_tokens - extra["cache_read_input_tokens"] - extra["cache_creation_input_tokens"])
        return usage, raw.headers["x-request-id"]
    system, messages = anthropic_turn(turn)
    araw = await an.messages.with_raw_response.create(model=model, system=system, messages=messages, max_tokens=64)
    a = (await araw.parse()).usage
    assert a.cache_creation is not None and a.cache_read_input_tokens is not None
    assert a.cache_creation_input_tokens is not None
    tiers = a.cache_creation.model_dump()
    usage = (a.input_tokens + a.cache_read_input_tokens + a.cache_creation_input_tokens, a.output_tokens,
             a.cache_read_input_tokens, tiers["ephemeral_5m_input_tokens"], tiers["ephemeral_1h_input_tokens"],
             tiers["ephemeral_24h_input_tokens"], a.input_tokens)
    return usage, araw.headers["x-request-id"]

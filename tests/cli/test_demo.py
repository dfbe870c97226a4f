"""`promptcache demo` as the README's first command runs it: embedded Postgres, nothing left behind."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import redis.asyncio as aioredis

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def demo_processes(tmpdir: str) -> list[psutil.Process]:
    """Processes running from this demo's directories (another demo on the machine has its own)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"{tmpdir}/promptcache-demo-" in cmdline:
            found.append(proc)
    return found


def test_demo_runs_on_embedded_postgres_and_leaves_nothing_running() -> None:
    # A short private TMPDIR: the demo's directories (and the embedded Postgres socket) go there.
    tmpdir = tempfile.mkdtemp(prefix="pcd")
    env = {k: v for k, v in os.environ.items() if k not in ("PROMPTCACHE_DATABASE_URL", "PROMPTCACHE_REDIS_URL")}
    env["TMPDIR"] = tmpdir
    result = subprocess.run([PROMPTCACHE, "demo"], capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "database:  embedded Postgres" in out
    assert "SIMULATED local model server" in out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    # tenant, prompt, read, write 5m, write 1h, uncached, billed, list — cl100k_base counts of the demo's texts.
    assert [r[1:] for r in rows] == [
        ["acme", "1165", "0", "17", "1142", "6", "$0.007069", "$0.003630"],
        ["acme", "1231", "1159", "60", "0", "12", "$0.000744", "$0.003828"],
        ["acme", "1257", "1219", "20", "0", "18", "$0.000630", "$0.003906"],
        ["acme", "1282", "1239", "19", "0", "24", "$0.000650", "$0.003981"],
        ["acme", "1306", "1258", "18", "0", "30", "$0.000670", "$0.004053"],
        ["globex", "1165", "0", "17", "1142", "6", "$0.007069", "$0.003630"],
    ]
    assert "total" in out and "$0.016831" in out and "$0.023028" in out
    assert "saved $0.006197 against list price (26.9%)" in out
    assert demo_processes(tmpdir) == []
    assert [name for name in os.listdir(tmpdir) if name.startswith("promptcache-demo-")] == []
    shutil.rmtree(tmpdir)


async def test_demo_keeps_its_redis_keys_under_the_configured_prefix(empty_pg_dsn: str, redis_url: str) -> None:
    """With Redis configured, the demo's proxy writes under ``PROMPTCACHE_REDIS_PREFIX``, as the proxy's own does."""
    prefix = f"pctest:{secrets.token_hex(4)}:"
    env = {**os.environ, "PROMPTCACHE_DATABASE_URL": empty_pg_dsn, "PROMPTCACHE_REDIS_URL": redis_url,
           "PROMPTCACHE_REDIS_PREFIX": prefix}
    result = await asyncio.to_thread(subprocess.run, [PROMPTCACHE, "demo"], capture_output=True, text=True,
                                     timeout=120, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "database:  PROMPTCACHE_DATABASE_URL" in result.stdout
    client = aioredis.Redis.from_url(redis_url)
    try:
        written = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert written, "the demo wrote no cache entries under its prefix"
        await client.delete(*written)
    finally:
        await client.aclose()


def run_demo(env: dict[str, str]) -> tuple[list[list[str]], str]:
    result = subprocess.run([PROMPTCACHE, "demo"], capture_output=True, text=True, timeout=120, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    return [line.split()[1:] for line in out.splitlines() if line[:1].isdigit()], out[out.index("\nsaved "):].strip()


def test_a_second_run_on_the_same_database_reads_what_the_first_wrote_and_says_so(empty_pg_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMPTCACHE_REDIS_URL"}
    env["PROMPTCACHE_DATABASE_URL"] = empty_pg_dsn
    first, told = run_demo(env)
    assert first[0][:5] == ["acme", "1165", "0", "17", "1142"]
    assert told == ("saved $0.006197 against list price (26.9%). Request 1 writes the handbook (1h) and the question "
                    "(5m);\nlater requests read the previous prefix and write only the new turn; globex shares "
                    "nothing with acme.")
    second, told = run_demo(env)
    # Every prefix up to each request's last breakpoint was written by the first run and is still live: all reads.
    assert [r[:7] for r in second] == [
        ["acme", "1165", "1159", "0", "0", "6", "$0.000501"],
        ["acme", "1231", "1219", "0", "0", "12", "$0.000537"],
        ["acme", "1257", "1239", "0", "0", "18", "$0.000561"],
        ["acme", "1282", "1258", "0", "0", "24", "$0.000584"],
        ["acme", "1306", "1276", "0", "0", "30", "$0.000608"],
        ["globex", "1165", "1159", "0", "0", "6", "$0.000501"],
    ]
    assert told == ("saved $0.019737 against list price (85.7%). Request 1 reads 1,159 tokens an earlier run of the "
                    "demo left in this database (entries outlive the demo: 1h for the handbook, 5m for a turn);\n"
                    "requests 2 to 5 read their whole prefix, which the earlier run wrote too; globex reads only "
                    "what it wrote in the earlier run: tenants never share an entry.")

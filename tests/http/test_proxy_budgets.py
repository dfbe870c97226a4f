"""Monthly budgets (docs/design.md#budgets) across two proxies on one database, through the official SDKs, and the
``promptcache budgets`` command a person sets them with."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.faults import Relay, ledger_rows
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def budgets(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, "budgets", *args], capture_output=True, text=True, timeout=60, check=False)


def config(url: str, tokenizer: Path) -> dict[str, Any]:
    return {"models": [model_config("chat", url + "/v1", "openai", tokenizer),
                       model_config("claude", url, "anthropic", tokenizer)]}


async def spent(dsn: str, principal: str) -> Decimal:
    conn = await asyncpg.connect(dsn)
    try:
        total: Decimal = await conn.fetchval("SELECT COALESCE(sum(cost), 0) FROM ledger WHERE principal_id = $1",
                                             principal)
        return total
    finally:
        await conn.close()


async def chat(proxy: RunningProxy, key: str) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello there"}])


async def test_a_budget_holds_across_two_proxies_and_a_restart(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    principal = unique("budget")
    key = await new_key(pg_dsn, principal)
    async with running_proxy(config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as a, \
            running_proxy(config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as b:
        async def loaded() -> None:
            """What each proxy's background load (every second) would see by now, loaded at once: the test is exact."""
            for proxy in (a, b):
                assert proxy.server.proxy.store.budgets is not None
                await proxy.server.proxy.store.budgets.load()
        await chat(a, key)  # before any budget: its cost is seeded into the month when the budget is set
        await settle(a)
        one = await spent(pg_dsn, principal)
        assert one > 0
        monthly = one * 3 / 2

        done = budgets("set", principal, "--monthly", str(monthly), "--database", pg_dsn)
        assert (done.returncode, done.stdout) == (0, f"set the monthly budget of {principal} to ${monthly}\n")

        await loaded()
        await chat(b, key)  # spent one < 1.5 x one: admitted, and it crosses the budget
        await settle(b)
        await loaded()
        assert await spent(pg_dsn, principal) == 2 * one
        month = datetime.now(UTC).strftime("%Y-%m")
        message = (f"principal {principal} has used its monthly budget of ${monthly} (spent ${2 * one} since "
                   f"{month}-01); it resets at the start of next month (UTC) or when the budget is raised")
        with pytest.raises(openai.RateLimitError) as refused:
            await chat(a, key)
        assert refused.value.status_code == 429
        assert refused.value.body == {"message": message, "type": "insufficient_quota", "param": None,
                                      "code": "insufficient_quota"}
        claude = anthropic.AsyncAnthropic(base_url=b.url, api_key=key, max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as refused_too:
            await claude.messages.create(model="claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert refused_too.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": message,
                                                                      "code": "insufficient_quota"}}
        assert await spent(pg_dsn, principal) == 2 * one  # a refused request is not billed
        other = await new_key(pg_dsn, unique("unlimited"))
        await chat(a, other)  # another principal is not affected
        metrics = a.server.proxy.metrics.exposition().decode()
        assert 'promptcache_budget_refusals_total{model="chat"} 1.0' in metrics

        listed = json.loads(budgets("list", "--output", "json", "--database", pg_dsn).stdout)
        mine = next(entry for entry in listed if entry["principal"] == principal)
        assert mine == {"principal": principal, "monthly_usd": str(monthly), "spent_usd": str(2 * one),
                        "remaining_usd": "0", "month": month}

    # A fresh proxy (a restart) reads the same state from Postgres.
    async with running_proxy(config(simulator[0], word_tokenizer), tmp_path, pg_dsn) as fresh:
        cache = fresh.server.proxy.store.budgets
        assert cache is not None
        await cache.load()
        with pytest.raises(openai.RateLimitError):
            await chat(fresh, key)
        assert budgets("set", principal, "--monthly", str(3 * one), "--database", pg_dsn).stdout.startswith(
            f"changed the monthly budget of {principal}")
        await asyncio.sleep(cache.refresh + 0.5)  # its own background load, within a second, sees the raise
        await chat(fresh, key)  # raised: admitted again
        await settle(fresh)
        assert budgets("clear", principal, "--database", pg_dsn).stdout == f"cleared the budget of {principal}\n"
        await cache.load()
        await chat(fresh, key)
        await settle(fresh)
    assert await spent(pg_dsn, principal) == 4 * one


async def test_a_postgres_outage_keeps_the_last_budgets_in_force(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The proxy reaches Postgres through a relay of the test's own, cut for a while: budgets loaded before the
    outage stand (no one over budget slips through while they cannot be read), everyone else is served."""
    capped, free = unique("capped"), unique("free")
    capped_key, free_key = await new_key(pg_dsn, capped), await new_key(pg_dsn, free)
    assert budgets("set", capped, "--monthly", "0", "--database", pg_dsn).returncode == 0
    relay = await Relay.to_postgres(pg_dsn)
    try:
        async with running_proxy(config(simulator[0], word_tokenizer), tmp_path, relay.dsn(pg_dsn)) as proxy:
            cache = proxy.server.proxy.store.budgets
            assert cache is not None
            with pytest.raises(openai.RateLimitError):
                await chat(proxy, capped_key)  # loaded as the proxy started
            await chat(proxy, free_key)  # both keys are known now (the key cache outlives a short outage)
            await settle(proxy)
            await relay.cut()
            await asyncio.sleep(2 * cache.refresh + 0.5)  # background loads fail meanwhile
            assert "budgets not refreshed" in caplog.text
            with pytest.raises(openai.RateLimitError) as refused:
                await chat(proxy, capped_key)
            assert refused.value.body is not None and "has used its monthly budget of $0" in str(refused.value.body)
            await chat(proxy, free_key)  # billed at list price into the spool
            await relay.restore()
            await settle(proxy)
        assert len(await ledger_rows(pg_dsn, free)) == 2  # the spooled bill landed once Postgres was back
        assert await ledger_rows(pg_dsn, capped) == []
    finally:
        await relay.close()


@pytest.mark.parametrize("amount", ["-5", "1e3", "NaN", "Infinity", "9" * 13, "0.1234567890123", "", " 5", "5,00"])
def test_a_malformed_budget_is_one_line_and_exit_2(pg_dsn: str, amount: str) -> None:
    done = budgets("set", "acme", "--monthly", amount, "--database", pg_dsn)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1].endswith(
        'argument --monthly: must be a non-negative amount of US dollars such as "100" or "2500.50" (at most 12 '
        f"digits each side), got {amount!r}")


def test_clearing_no_budget_says_so(pg_dsn: str) -> None:
    principal = unique("none")
    done = budgets("clear", principal, "--database", pg_dsn)

    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"{principal} has no budget\n")

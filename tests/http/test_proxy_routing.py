"""Replica routing through the proxy (docs/design.md#replica-routing): three simulated upstream replicas, each behind a
relay of its own that a test can cut as a killed replica's would be, conversations through the official SDK, and the
ledger read back. Routing decides only where a request goes; every bill is the index's, checked exactly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from promptcache.proxy.domain.tokens import HuggingFaceTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

from support.faults import Relay, entries, ledger_rows, wait_until
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, text, unique, words


@dataclass
class Replicas:
    sims: list[Simulator]
    relays: list[Relay]

    @property
    def urls(self) -> list[str]:
        return [relay.url + "/v1" for relay in self.relays]

    def counts(self) -> list[int]:
        return [len(sim.requests) for sim in self.sims]


@contextlib.asynccontextmanager
async def replicas(tokenizer: Path, n: int = 3, latency: float = 0.0) -> AsyncIterator[Replicas]:
    async with contextlib.AsyncExitStack() as stack:
        sims, relays = [], []
        for _ in range(n):
            sim = Simulator(SimulatorSettings(HuggingFaceTokenizer(str(tokenizer)), latency=latency))
            url = await stack.enter_async_context(serving(sim.app()))
            relay = await Relay("127.0.0.1", int(url.rsplit(":", 1)[1])).start()
            stack.push_async_callback(relay.close)
            sims.append(sim)
            relays.append(relay)
        yield Replicas(sims, relays)


def config(urls: list[str], tokenizer: Path, **routing: Any) -> dict[str, Any]:
    model = model_config("chat", urls[0], "openai", tokenizer)
    model["upstream"]["replicas"] = urls
    if routing:
        model["routing"] = routing
    return {"models": [model]}


SYSTEM = words("shared", 40)
"""A system prompt every tenant sends: its KV would be the same, but each tenant's cache is its own."""


class Conversation:
    """One tenant's multi-turn chat, marked as clients mark them: the system prompt and the latest user turn."""

    def __init__(self, proxy: RunningProxy, key: str, name: str) -> None:
        self.client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        self.name = name
        self.messages: list[Any] = [{"role": "system", "content": [text(SYSTEM, "5m")]}]

    async def turn(self) -> None:
        n = len(self.messages)
        for message in self.messages[1:]:
            if message["role"] == "user":
                message["content"] = [text(message["content"][0]["text"])]
        self.messages.append({"role": "user", "content": [text(words(f"{self.name}t{n}x", 15), "5m")]})
        await self.client.chat.completions.create(model="chat", messages=self.messages)
        self.messages.append({"role": "assistant", "content": "ok"})


async def served_by(reps: Replicas, proxy: RunningProxy, work: Any) -> int:
    """Which replica answered the one request ``work`` sends."""
    before = reps.counts()
    await work
    await settle(proxy)
    changed = [i for i, (a, b) in enumerate(zip(before, reps.counts(), strict=True)) if b != a]
    assert len(changed) == 1, (before, reps.counts())
    return changed[0]


async def first_turn(reps: Replicas, proxy: RunningProxy, pg_dsn: str, name: str) -> tuple[str, Conversation, int]:
    """A new tenant's conversation after its first turn: (principal, conversation, the replica that answered)."""
    principal = unique(name)
    chat = Conversation(proxy, await new_key(pg_dsn, principal), name)
    return principal, chat, await served_by(reps, proxy, chat.turn())


def sample(proxy: RunningProxy, name: str, **labels: str) -> float:
    return proxy.server.proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def entry_replicas(pg_dsn: str, principal: str) -> set[str | None]:
    return {e["replica"] for e in await entries(pg_dsn, principal)}


async def deepest_entry(pg_dsn: str, principal: str) -> int:
    return max(int(e["cum_tokens"]) for e in await entries(pg_dsn, principal))


async def test_each_conversation_stays_on_the_replica_that_holds_its_prefix(
        tmp_path: Path, pg_dsn: str, redis_url: str, word_tokenizer: Path) -> None:
    async with replicas(word_tokenizer) as reps, \
            running_proxy(config(reps.urls, word_tokenizer), tmp_path, pg_dsn, redis_url) as proxy:
        homes: dict[str, set[int]] = {}
        for c in range(12):
            principal = unique(f"tenant{c}")
            chat = Conversation(proxy, await new_key(pg_dsn, principal), f"c{c}")
            homes[principal] = {await served_by(reps, proxy, chat.turn()) for _ in range(4)}
            rows = await ledger_rows(pg_dsn, principal)
            assert [r["read_tokens"] > 0 for r in rows] == [False, True, True, True]
            (home,) = homes[principal]
            assert await entry_replicas(pg_dsn, principal) == {reps.urls[home]}
        assert all(len(h) == 1 for h in homes.values()), homes
        assert len(set().union(*homes.values())) >= 2, "twelve tenants all hashed to one replica"
        decisions = {d: sum(sample(proxy, "promptcache_routes_total", model="chat", replica=u, decision=d)
                            for u in reps.urls) for d in ("read", "write", "least_loaded")}
        assert decisions == {"read": 36, "write": 12, "least_loaded": 0}
        assert all(sample(proxy, "promptcache_replica_in_flight", model="chat", replica=u) == 0
                   for u in reps.urls)


async def test_a_killed_replica_loses_no_request_and_bills_nothing_twice(
        tmp_path: Path, pg_dsn: str, word_tokenizer: Path) -> None:
    async with replicas(word_tokenizer) as reps, \
            running_proxy(config(reps.urls, word_tokenizer), tmp_path, pg_dsn) as proxy:
        principal, chat, home = await first_turn(reps, proxy, pg_dsn, "killed")
        assert await served_by(reps, proxy, chat.turn()) == home
        written = await deepest_entry(pg_dsn, principal)
        await reps.relays[home].cut()
        moved = await served_by(reps, proxy, chat.turn())  # the same request, on another replica
        assert moved != home
        assert await served_by(reps, proxy, chat.turn()) == moved  # its entries now point there
        rows = await ledger_rows(pg_dsn, principal)
        assert len(rows) == len({r["request_id"] for r in rows}) == 4
        # Cold for routing, not for billing: the turn that moved read all that turn 2 wrote.
        assert rows[2]["read_tokens"] == written > rows[1]["read_tokens"] > 0
        dead = reps.urls[home]
        assert sample(proxy, "promptcache_replica_failures_total", model="chat", replica=dead) == 1
        assert sample(proxy, "promptcache_routing_fallbacks_total", model="chat", reason="failing") == 1
        assert sample(proxy, "promptcache_replica_in_flight", model="chat", replica=dead) == 0


async def test_scaling_down_and_up_follows_the_config(
        tmp_path: Path, pg_dsn: str, word_tokenizer: Path) -> None:
    async with replicas(word_tokenizer, n=4) as reps:
        urls = reps.urls
        async with running_proxy(config(urls[:3], word_tokenizer), tmp_path, pg_dsn) as proxy:
            _, chat, home = await first_turn(reps, proxy, pg_dsn, "scaled")
            router = proxy.server.proxy.runtimes.models["chat"].router
            proxy.write_config(config([u for i, u in enumerate(urls) if i != home], word_tokenizer))
            await wait_until(lambda: _has(router.urls, urls[home], False), "the reload without the replica")
            moved = await served_by(reps, proxy, chat.turn())
            assert moved != home
            assert sample(proxy, "promptcache_routing_fallbacks_total", model="chat", reason="unready") == 1
            assert await served_by(reps, proxy, chat.turn()) == moved
            others = [Conversation(proxy, await new_key(pg_dsn, unique(f"new{i}")), f"n{i}") for i in range(12)]
            landed = {await served_by(reps, proxy, o.turn()) for o in others}
            assert home not in landed and len(landed) >= 2


async def _has(urls: Any, url: str, present: bool) -> bool:
    return (url in urls) == present


async def test_concurrent_reads_of_one_prefix_are_spread_within_the_bound(
        tmp_path: Path, pg_dsn: str, word_tokenizer: Path) -> None:
    async with replicas(word_tokenizer, latency=1.0) as reps, \
            running_proxy(config(reps.urls, word_tokenizer, maxImbalance="1.25"), tmp_path, pg_dsn) as proxy:
        principal = unique("burst")
        key = await new_key(pg_dsn, principal)
        first = Conversation(proxy, key, "b")
        await served_by(reps, proxy, first.turn())
        before = reps.counts()
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        same = [*first.messages, {"role": "user", "content": "go"}]
        await asyncio.gather(*(client.chat.completions.create(model="chat", messages=same) for _ in range(9)))
        await settle(proxy)
        spread = [after - b for after, b in zip(reps.counts(), before, strict=True)]
        assert sum(spread) == 9 and max(spread) <= 4, spread  # ceil(1.25 x 9 / 3)
        assert sample(proxy, "promptcache_routing_fallbacks_total", model="chat", reason="overloaded") >= 5
        rows = await ledger_rows(pg_dsn, principal)
        assert len(rows) == 10 and len({r["read_tokens"] for r in rows[1:]}) == 1  # the same bill on any replica


async def test_a_replica_that_dies_holding_a_request_hands_it_on(
        tmp_path: Path, pg_dsn: str, word_tokenizer: Path) -> None:
    """The replica took the request and died before answering (its connection reset): the same request is
    answered by another replica, and billed once, as a read of what the first turn wrote."""
    async with replicas(word_tokenizer, latency=1.0) as reps, \
            running_proxy(config(reps.urls, word_tokenizer), tmp_path, pg_dsn) as proxy:
        principal, chat, home = await first_turn(reps, proxy, pg_dsn, "held")
        before = reps.counts()
        turn = asyncio.create_task(chat.turn())

        async def held() -> bool:
            return reps.counts()[home] == before[home] + 1

        await wait_until(held, "the home replica to hold the second turn")
        await reps.relays[home].cut()
        await turn
        await settle(proxy)
        moved = [i for i, (a, b) in enumerate(zip(before, reps.counts(), strict=True)) if b != a and i != home]
        assert len(moved) == 1
        rows = await ledger_rows(pg_dsn, principal)
        assert len(rows) == len({r["request_id"] for r in rows}) == 2
        assert rows[1]["read_tokens"] == rows[0]["prompt_tokens"] - rows[0]["uncached_tokens"] > 0
        assert sample(proxy, "promptcache_replica_failures_total", model="chat", replica=reps.urls[home]) == 1


async def test_a_connection_dropped_once_is_retried_on_the_same_replica(
        tmp_path: Path, pg_dsn: str, word_tokenizer: Path) -> None:
    """A closed keep-alive connection is no failure: the request goes again to the same replica on a new one."""
    async with replicas(word_tokenizer) as reps, \
            running_proxy(config(reps.urls, word_tokenizer), tmp_path, pg_dsn) as proxy:
        principal, chat, home = await first_turn(reps, proxy, pg_dsn, "stale")
        reps.relays[home].drop_next = 1
        assert await served_by(reps, proxy, chat.turn()) == home
        assert reps.relays[home].drop_next == 0  # the drop happened
        assert sample(proxy, "promptcache_replica_failures_total", model="chat", replica=reps.urls[home]) == 0
        assert sample(proxy, "promptcache_routing_fallbacks_total", model="chat", reason="failing") == 0
        rows = await ledger_rows(pg_dsn, principal)
        assert len(rows) == 2 and rows[1]["read_tokens"] > 0

"""Core benchmark (issue 2): hashing, tokenisation and Postgres lookup figures.

Prints: canonicalise + hash time for a 1 MB, 400-block request (target <= 10 ms);
tokenisation throughput with a cold and a warm LRU; Postgres lookup p50/p99 for
20 candidates (target p50 <= 1 ms) against a throwaway database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import string
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from promptcache.proxy.domain.blocks import extract_blocks
from promptcache.proxy.domain.classify import Classification, Write
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.prepare import prepare
from promptcache.proxy.domain.pricing import Split, Tariff
from promptcache.proxy.domain.tokens import BlockCounter, TiktokenTokenizer
from promptcache.proxy.storage.index import PrefixIndex
from promptcache.proxy.storage.ledger import Ledger, RequestRecord
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.database import scratch_database


def request(blocks: int, total_bytes: int, seed: int = 7) -> dict[str, object]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(4000)]
    per_block = total_bytes // blocks
    messages = []
    for i in range(blocks):
        text: list[str] = []
        size = 0
        while size < per_block:
            word = rng.choice(words)
            text.append(word)
            size += len(word) + 1
        part: dict[str, object] = {"type": "text", "text": " ".join(text)}
        if i in (99, 249, blocks - 1):
            part["cache_control"] = {"type": "ephemeral", "ttl": "5m"}
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": [part]})
    return {"model": "bench", "messages": messages}


def timed(fn: object, repeat: int) -> list[float]:
    assert callable(fn)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_hashing() -> None:
    body = request(400, 1_000_000)
    policy = CachePolicy()
    hashing = timed(lambda: extract_blocks(body, "openai"), 50)
    full = timed(lambda: prepare(body, "openai", policy), 50)
    print(f"canonicalise+hash 1 MB / 400 blocks: p50 {statistics.median(hashing):.2f} ms "
          f"(target <= 10 ms), p99 {percentile(hashing, 0.99):.2f} ms")
    print(f"  with markers + forwarded body:    p50 {statistics.median(full):.2f} ms")


def bench_tokens() -> None:
    tokenizer = TiktokenTokenizer("cl100k_base")
    body = request(400, 1_000_000, seed=11)
    blocks = extract_blocks(body, "openai")
    counter = BlockCounter(tokenizer)
    start = time.perf_counter()
    tokens = counter.cumulative(blocks)[-1]
    cold = time.perf_counter() - start
    warm_times = timed(lambda: counter.cumulative(blocks), 20)
    warm = statistics.median(warm_times) / 1000
    print(f"tokenise 1 MB ({tokens} tokens, cl100k_base): cold LRU {cold * 1000:.1f} ms "
          f"= {tokens / cold / 1e6:.2f} M tok/s; warm LRU {warm * 1000:.3f} ms = {tokens / warm / 1e6:.0f} M tok/s")


async def bench_lookup() -> None:
    scratch = contextlib.AsyncExitStack()
    dsn = await scratch.enter_async_context(scratch_database("promptcache_bench"))
    try:
        await migrate(dsn)
        pg = await Database.connect(dsn)
        index, ledger = PrefixIndex(pg), Ledger(pg)
        now = datetime.now(UTC)
        rng = random.Random(3)
        scopes = [Scope(f"tenant-{i}", "bench", "tiktoken:cl100k_base") for i in range(50)]
        chains = {s: [rng.randbytes(32) for _ in range(200)] for s in scopes}
        tariff = Tariff.for_policy("bench", Decimal(1), Decimal(1), CachePolicy())
        for n, (scope, hashes) in enumerate(chains.items()):
            writes = tuple(Write(i, h, 1000 * (i + 1), "1h", now + timedelta(hours=1)) for i, h in enumerate(hashes))
            record = RequestRecord(f"seed-{n}", now, scope, "openai", 200, Split(0, 0),
                                   tariff, [], Classification(None, writes))
            await ledger.commit(record)
        latencies = []
        for i in range(3000):
            scope = scopes[i % len(scopes)]
            hashes = chains[scope]
            start_at = rng.randrange(0, len(hashes) - 20)
            candidates = hashes[start_at:start_at + 20]
            start = time.perf_counter()
            found = await index.lookup(scope, candidates)
            latencies.append((time.perf_counter() - start) * 1000)
            assert len(found) == 20
        latencies = latencies[200:]
        print(f"postgres lookup, 20 candidates, 10k entries: p50 {statistics.median(latencies):.3f} ms "
              f"(target <= 1 ms), p99 {percentile(latencies, 0.99):.3f} ms")
        await pg.close()
    finally:
        await scratch.aclose()


def main() -> int:
    print(f"promptcache core bench (python {sys.version.split()[0]}, {os.cpu_count()} cores)")
    bench_hashing()
    bench_tokens()
    asyncio.run(bench_lookup())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

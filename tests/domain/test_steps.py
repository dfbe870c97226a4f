"""Hashing and counting in steps: the proxy runs them while the upstream call (and maybe the
upload of a large body) is in flight, letting its event loop turn between steps."""

from __future__ import annotations

import asyncio
from typing import Any

from promptcache.proxy.domain.blocks import STEP_BYTES, extract_blocks, hashing, parse_blocks
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.prepare import admit
from promptcache.proxy.domain.steps import run, run_async
from promptcache.proxy.domain.tokens import BlockCounter


class Chars:
    """One token per character."""

    version = "chars:1"

    def count(self, text: str) -> int:
        return len(text)


def long_chat(messages: int, size: int) -> dict[str, Any]:
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": f"{i}:" + "x" * size} for i in range(messages)]}


def test_hashing_pauses_once_per_step_and_hashes_exactly_like_hash_blocks() -> None:
    body = long_chat(12, STEP_BYTES // 4)  # 12 blocks of a quarter step each: three whole steps
    blocks = parse_blocks(body, "openai")
    pauses = 0
    steps = hashing(blocks)
    while True:
        try:
            next(steps)
        except StopIteration:
            break
        pauses += 1
    assert pauses == 3
    assert [b.hash for b in blocks] == [b.hash for b in extract_blocks(body, "openai")]


def test_a_short_prompt_is_hashed_without_a_pause() -> None:
    steps = hashing(parse_blocks(long_chat(3, 100), "openai"))
    assert run(steps) is None
    steps = hashing(parse_blocks(long_chat(3, 100), "openai"))
    assert next(steps, "done") == "done"


def test_counting_pauses_only_for_what_the_tokenizer_reads() -> None:
    counter = BlockCounter(Chars())
    blocks = extract_blocks(long_chat(8, STEP_BYTES // 2), "openai")
    steps = counter.counting(blocks)
    pauses = sum(1 for _ in iter(lambda: next(steps, "done"), "done"))
    assert pauses == 4  # eight blocks of (a bit more than) half a step, all new to the tokenizer
    assert counter.tokenized == 8
    # The second time every block is in the LRU: no tokenizer, no pause, the same counts.
    again = counter.counting(blocks)
    assert next(again, "done") == "done"
    assert counter.cumulative(blocks) == BlockCounter(Chars()).cumulative(blocks)


async def test_the_event_loop_runs_between_steps_and_the_result_is_the_synchronous_one() -> None:
    body = long_chat(16, STEP_BYTES // 2)
    admission = admit(body, "openai", CachePolicy())
    turns = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    prepared = await run_async(admission.preparing(BlockCounter(Chars())))
    stop.set()
    await task
    assert turns - before >= 8 + 8  # a turn per hashing step and per counting step
    expected = admission.prepare(BlockCounter(Chars()))
    assert prepared.tokens == expected.tokens
    assert [b.hash for b in prepared.hashed] == [b.hash for b in expected.hashed]

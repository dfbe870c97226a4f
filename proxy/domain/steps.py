"""Work that can pause: generators that yield wherever an event loop may run, and their drivers.

Hashing and counting a large prompt takes milliseconds of CPU. The proxy does it while the
upstream call is in flight, possibly while the request body is still uploading, so it runs the
same code as the CLI in steps and lets its event loop turn between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]
"""Yields between steps; returns the result."""


def _step(steps: Steps[T]) -> list[T]:
    """One step: ``[]`` while there are more, ``[result]`` once the steps are done."""
    try:
        next(steps)
    except StopIteration as done:
        return [done.value]
    return []


def run(steps: Steps[T]) -> T:
    """All the steps at once."""
    while not (finished := _step(steps)):
        pass
    return finished[0]


async def run_async(steps: Steps[T]) -> T:
    """The steps, letting the event loop run between them."""
    while not (finished := _step(steps)):  # noqa: ASYNC110 - not a wait: a turn of the loop per step
        await asyncio.sleep(0)
    return finished[0]

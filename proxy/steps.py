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


def run(steps: Steps[T]) -> T:
    """All the steps at once."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result


async def run_async(steps: Steps[T]) -> T:
    """The steps, letting the event loop run between them."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result
        await asyncio.sleep(0)

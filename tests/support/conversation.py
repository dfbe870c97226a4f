"""The three-turn agent conversation the billing tests and the PlanReplay tests both drive."""

from __future__ import annotations

from typing import Any

from promptcache.proxy.testing.simulator import REPLY

from support.proxy import text, words

SYSTEM = words("sys", 20)
USER = [words("first", 10), words("second", 10), words("third", 10)]


def openai_turns() -> list[list[dict[str, Any]]]:
    system = {"role": "system", "content": [text(SYSTEM, "1h")]}
    turns = []
    history: list[dict[str, Any]] = []
    for i, user in enumerate(USER):
        turns.append([system, *history, {"role": "user", "content": [text(user, "5m")]}])
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
        assert i < 3
    return turns

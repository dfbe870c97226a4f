"""The three-turn agent conversation the billing tests and the PlanReplay tests both drive."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from promptcache.proxy.testing.simulator import REPLY

from support.proxy import text, words

SYSTEM = words("sys", 20)
USER = [words("first", 10), words("second", 10), words("third", 10)]

# (prompt, completion, read, creation_5m, creation_1h, uncached, cost) per turn, worked by hand:
# turn 1: chain sys 20 (1h) · u1 30 (5m); prompt 30 + 3·2 = 36; writes 1h 20, 5m 10; uncached 6
#   (6·3 + 20·3·2.0 + 10·3·1.25 + 8·15) / 1e6 = (18 + 120 + 37.5 + 120) / 1e6 = 0.0002955
# turn 2: chain 20 · 30 · a1 38 · u2 48 (5m); prompt 48 + 3·4 = 60; read 30 (u1), write 5m 18; uncached 12
#   (12·3 + 30·3·0.1 + 18·3·1.25 + 120) / 1e6 = (36 + 9 + 67.5 + 120) / 1e6 = 0.0002325
# turn 3: chain … u2 48 · a2 56 · u3 66 (5m); prompt 66 + 3·6 = 84; read 48, write 5m 18; uncached 18
#   (18·3 + 48·0.3 + 18·3.75 + 120) / 1e6 = (54 + 14.4 + 67.5 + 120) / 1e6 = 0.0002559
EXPECTED = [
    (36, 8, 0, 10, 20, 6, Decimal("0.0002955")),
    (60, 8, 30, 18, 0, 12, Decimal("0.0002325")),
    (84, 8, 48, 18, 0, 18, Decimal("0.0002559")),
]


def openai_turns() -> list[list[dict[str, Any]]]:
    system = {"role": "system", "content": [text(SYSTEM, "1h")]}
    turns = []
    history: list[dict[str, Any]] = []
    for i, user in enumerate(USER):
        turns.append([system, *history, {"role": "user", "content": [text(user, "5m")]}])
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]
        assert i < 3
    return turns


OPENAI_TTL = {"5m": None, "1h": "30m", "24h": "12h"}
"""Our tier as OpenAI's ``prompt_cache_breakpoint`` ttl (30m lives in 1h, 12h in 24h); 5m: the request's default,
so the tests send ``prompt_cache_retention="in_memory"`` (the policy's default tier, 5m)."""


def with_openai_breakpoints(messages: list[dict[str, Any]], part_type: str = "text") -> Any:
    """``messages`` with every ``cache_control`` marker sent in OpenAI's own syntax instead, on parts of
    ``part_type`` (``input_text`` for the Responses API); ``Any``, as the SDK's message types vary by version."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                new = {"type": part_type, "text": part["text"]}
                if "cache_control" in part:
                    ttl = OPENAI_TTL[part["cache_control"]["ttl"]]
                    new["prompt_cache_breakpoint"] = {"mode": "explicit", **({"ttl": ttl} if ttl else {})}
                parts.append(new)
            content = parts
        out.append({**message, "content": content})
    return out


def as_responses_input(messages: list[dict[str, Any]]) -> Any:
    """Chat messages as Responses API input items (text parts become ``input_text``, markers OpenAI's)."""
    return with_openai_breakpoints(messages, "input_text")

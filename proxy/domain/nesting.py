"""One nesting limit for every JSON (and YAML) document promptcache reads: request bodies, JSON Lines, config.

Parsers and the code after them recurse: a body 990 levels deep passed orjson and then overflowed the stack in a
repr or a re-serialisation. A document deeper than :data:`MAX_DEPTH` is refused where it comes in, with a clear
error, before anything walks it. Real requests nest a few levels (tool schemas a few dozen).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_DEPTH = 128
"""Objects and arrays (mappings and sequences) inside one another, the outermost counted as 1."""


def deeper_than(value: Any, limit: int = MAX_DEPTH, *, shared: bool = False) -> bool:
    """Whether ``value`` nests containers more than ``limit`` deep; level by level, so any depth is safe to ask about.

    ``shared``: containers may have several parents (YAML aliases); each level then keeps one of each, so an alias
    bomb costs its distinct nodes, not its expansion, and a cycle is, rightly, too deep. JSON never shares, and a
    request body is walked on the hot path, so it skips that bookkeeping."""
    containers = (dict, list)  # a tuple, and a plain loop: twice as fast as a union and a generator
    level = [value] if isinstance(value, containers) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        append = below.append
        for node in level:
            children: Iterable[Any] = node.values() if isinstance(node, dict) else node
            for child in children:
                if isinstance(child, containers):
                    append(child)
        level = list({id(node): node for node in below}.values()) if shared else below
    return False


def too_deep(limit: int = MAX_DEPTH) -> str:
    return f"nested more than {limit} levels deep"


class TooDeep(ValueError):
    """A document nested past the limit (its parser may have run out of stack before we could count)."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(too_deep(limit))


def load_yaml(data: str | bytes) -> Any:
    """``yaml.safe_load`` for files a person hands us (config, policies): :class:`TooDeep` past the limit, never a
    RecursionError; ``yaml.YAMLError`` as usual for what is not YAML."""
    import yaml

    try:
        document = yaml.safe_load(data)
    except RecursionError:
        raise TooDeep() from None
    if deeper_than(document, shared=True):
        raise TooDeep()
    return document

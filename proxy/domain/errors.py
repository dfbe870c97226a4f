"""Client errors raised by request parsing; the HTTP layer maps them to each API's error shape."""

from __future__ import annotations


class BadRequest(ValueError):
    """The body is not a valid request for its API (HTTP 400, ``invalid_request_error``)."""

    code = "invalid_request_error"


class InvalidCacheControl(BadRequest):
    """A ``cache_control`` marker breaks a rule of docs/design.md#breakpoints-markers-and-limits (HTTP 400,
    ``invalid_cache_control``)."""

    code = "invalid_cache_control"

    def __init__(self, block: int | None, path: str, rule: str, detail: str) -> None:
        where = f"block {block} ({path})" if block is not None else path
        super().__init__(f"{where}: {rule}: {detail}")
        self.block = block
        self.rule = rule


def clipped(text: str, limit: int = 40) -> str:
    """``text`` as an error message quotes it: cut to ``limit`` characters, so hostile input cannot flood a log."""
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""Server-sent events as the two APIs stream them: split the upstream byte stream into events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader


@dataclass
class Event:
    raw: bytes
    name: str | None
    data: str | None

    def json(self) -> Any:
        """The data payload as JSON, or None for ``[DONE]``, comments and non-JSON payloads."""
        if self.data is None or self.data == "[DONE]":
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


def encode(name: str | None, payload: Any) -> bytes:
    prefix = f"event: {name}\n" if name else ""
    return f"{prefix}data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def events(content: StreamReader) -> AsyncIterator[Event]:
    """Yield one event per blank-line-terminated block; a trailing unterminated block is an error."""
    lines: list[bytes] = []
    async for line in content:
        lines.append(line)
        if line in (b"\n", b"\r\n"):
            yield _parse(b"".join(lines))
            lines = []
    if any(line.strip() for line in lines):
        raise ConnectionError("upstream stream ended in the middle of an event")


def _parse(raw: bytes) -> Event:
    name: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return Event(raw, name, "\n".join(data) if data else None)

"""docs/design.md#replay-input: the request-log files replay reads, as lines, each named by its file and line.

Any number of files, plain or gzip (known by its magic bytes, not its name), and ``-`` for standard
input, which is copied into the run's work directory first: every shard reads every file, so each must
be readable more than once. A shard keeps the lines of its principals (:func:`shard_of`) and parses
only those; a line's origin packs its file's index and its line number into one integer, so
millions of them fit in an array (:mod:`promptcache.operator.replay.ordering` keeps them that way).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import msgspec

from promptcache.operator.replay.rows import LogError
from promptcache.proxy.storage.requestlog import READ_BUFFER, LogFormatError, LoggedRequest, parse_line

STDIN = "standard input"
_GZIP_MAGIC = b"\x1f\x8b"
LINE_BITS = 40
"""An origin is ``file index << LINE_BITS | line number``: a trillion lines a file, a million files."""
_PRINCIPAL = b'"principal":"'


@dataclass(frozen=True)
class Source:
    name: str
    """The file as messages name it: its path as given, or ``standard input``."""
    path: str
    size: int


def prepare(logs: Sequence[str], workdir: str) -> tuple[Source, ...]:
    """The ``--log`` arguments as readable files; standard input is copied to ``workdir`` first."""
    if list(logs).count("-") > 1:
        raise LogError("standard input can be given once (--log -)")
    sources = []
    for log in logs:
        path = log
        if log == "-":
            path = os.path.join(workdir, "standard-input")
            try:
                with open(path, "wb") as copy:
                    shutil.copyfileobj(sys.stdin.buffer, copy, 1 << 20)
            except OSError as exc:
                raise LogError(f"cannot read {STDIN}: {exc}") from None
        try:
            with open(path, "rb"):
                size = os.stat(path).st_size
        except OSError as exc:
            raise LogError(f"cannot read {log}: {exc}") from None
        sources.append(Source(STDIN if log == "-" else log, path, size))
    return tuple(sources)


def origin(index: int, lineno: int) -> int:
    return index << LINE_BITS | lineno


def where(sources: Sequence[Source], packed: int) -> str:
    """``FILE line N`` for an origin."""
    return f"{sources[packed >> LINE_BITS].name} line {packed & ((1 << LINE_BITS) - 1)}"


class Meter:
    """Bytes of input read so far (of the file on disk: compressed bytes for gzip), for the progress bar."""

    def __init__(self) -> None:
        self.done = 0


def lines(source: Source, meter: Meter | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)``; an unreadable or truncated file is a :class:`LogError` naming the line."""
    lineno = 0
    try:
        with open(source.path, "rb", buffering=READ_BUFFER) as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            with contextlib.ExitStack() as stack:
                stream: Iterable[bytes] = stack.enter_context(gzip.GzipFile(fileobj=raw)) if compressed else raw
                for lineno, line in enumerate(stream, 1):
                    if meter is not None:
                        if not compressed:
                            meter.done += len(line)
                        elif not lineno % 1024:
                            meter.done = raw.tell()
                    yield lineno, line
                if meter is not None and compressed:
                    meter.done = raw.tell()
    except EOFError:
        raise LogError(f"{source.name}: line {lineno + 1}: truncated gzip data (the file ends before its "
                       "end-of-stream marker)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise LogError(f"{source.name}: line {lineno + 1}: bad gzip data ({exc})") from None
    except OSError as exc:
        raise LogError(f"cannot read {source.name}: {exc}") from None


class _Principal(msgspec.Struct):
    principal: str


_ROUTE = msgspec.json.Decoder(_Principal)


def shard_of(line: bytes, shards: int) -> int:
    """Which of ``shards`` reads this line: by its principal, so each scope is in one shard.

    The principal is found as raw bytes when it is written plainly (no escape, no space before its
    value), else decoded; a line with no principal to find goes to shard 0, whose strict parse names
    the problem. The same principal is the same bytes either way, so it is always the same shard.
    """
    start = line.find(_PRINCIPAL)
    if start >= 0:
        start += len(_PRINCIPAL)
        end = line.find(b'"', start)
        name = line[start:end]
        if end > 0 and b"\\" not in name:
            return zlib.crc32(name) % shards
    try:
        principal = _ROUTE.decode(line).principal
    except (msgspec.DecodeError, UnicodeError):
        return 0
    return zlib.crc32(principal.encode("utf-8", "surrogatepass")) % shards


@dataclass(frozen=True)
class Selection:
    """What a run reads: the sources and the export-like filters, and which shard of how many."""

    sources: tuple[Source, ...]
    since: datetime | None = None
    until: datetime | None = None
    models: frozenset[str] | None = None
    shard: int = 0
    shards: int = 1


Entry = tuple[datetime, str, int, LoggedRequest]
"""A request with its sort key and origin: ``(ts, id, origin, request)``; tuples sort in log order."""


def entries(selection: Selection, index: int, meter: Meter | None = None) -> Iterator[Entry]:
    """The shard's selected requests of source ``index``, in file order."""
    source = selection.sources[index]
    since, until, models = selection.since, selection.until, selection.models
    shards, shard = selection.shards, selection.shard
    base = index << LINE_BITS
    try:
        for lineno, line in lines(source, meter):
            if shards > 1 and shard_of(line, shards) != shard:
                continue
            request = parse_line(line, lineno)
            if request is None or (models is not None and request.model not in models):
                continue
            ts = request.ts
            if (since is not None and ts < since) or (until is not None and ts >= until):
                continue
            yield ts, request.id, base | lineno, request
    except LogFormatError as exc:
        raise LogError(f"{source.name}: {exc}") from None

"""docs/design.md#replay-input: requests in (ts, id) order whatever order the files give them in, in bounded memory.

Files are usually sorted already (``log export`` writes them so), and then they are merged as they are
read: nothing is held. When one turns out not to be (:class:`Unsorted`), the shard starts again and
sorts: requests are packed (msgpack, about a quarter of their size as objects) into a buffer, which is
sorted and written to a temporary run whenever it passes the memory budget, and the runs are merged.

Repeated ids: a copy of a request has its (ts, id), so copies meet in the merge; identical ones are
dropped with ``--dedupe``, any other repeat is an error naming both files and lines. Ids that repeat
with different timestamps do not meet, so every id's 64-bit hash is kept with its origin (16 bytes a
request) and checked across all shards at the end (:func:`check_unique`).
"""

from __future__ import annotations

import heapq
import os
import struct
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from promptcache.operator.replay.rows import LogError
from promptcache.operator.replay.sources import LINE_BITS, Entry, Source, lines, where
from promptcache.proxy.storage.requestlog import LogFormatError, LoggedRequest, parse_line

ENTRY_OVERHEAD = 200
"""Bytes a buffered entry costs beyond its packed request (its tuple, timestamp and id)."""
_FRAME = struct.Struct("<QI")
"""A run file's entry header: origin and the packed request's length."""
_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder(LoggedRequest).decode


class Unsorted(Exception):
    """A source is not in (ts, id) order; the shard must sort."""


def in_order(stream: Iterable[Entry]) -> Iterator[Entry]:
    """``stream`` as it is, raising :class:`Unsorted` at the first entry before its predecessor."""
    previous: tuple[object, ...] | None = None
    for entry in stream:
        key = entry[:2]
        if previous is not None and key < previous:
            raise Unsorted
        previous = key
        yield entry


def merged(streams: Iterable[Iterable[Entry]]) -> Iterator[Entry]:
    """Sorted streams merged into one (origins break ties, so requests are never compared)."""
    return heapq.merge(*(in_order(stream) for stream in streams))


def sort(streams: Iterable[Iterable[Entry]], budget: int, workdir: str,
         progress: Callable[[int], None] | None = None) -> tuple[Iterator[Entry], int]:
    """Every entry of ``streams`` (read before this returns), sorted, and how many there are; at most about
    ``budget`` bytes of them are held in memory. ``progress`` is told the count every 10,000."""
    runs: list[str] = []
    buffer: list[tuple[object, str, int, bytes]] = []
    used = count = 0
    for stream in streams:
        for ts, ident, packed, request in stream:
            count += 1
            if progress is not None and not count % 10_000:
                progress(count)
            blob = _ENCODE(request)
            buffer.append((ts, ident, packed, blob))
            used += len(blob) + ENTRY_OVERHEAD
            if used > budget:
                buffer.sort()
                runs.append(_spill(buffer, workdir))
                buffer, used = [], 0
    buffer.sort()
    held = ((ts, ident, packed, _DECODE(blob)) for ts, ident, packed, blob in buffer)
    return heapq.merge(*(_run(path) for path in runs), held), count  # type: ignore[arg-type]


def _spill(buffer: Sequence[tuple[object, str, int, bytes]], workdir: str) -> str:
    fd, path = tempfile.mkstemp(prefix="run-", dir=workdir)
    with os.fdopen(fd, "wb", buffering=1 << 20) as out:
        for _, _, packed, blob in buffer:
            out.write(_FRAME.pack(packed, len(blob)))
            out.write(blob)
    return path


def _run(path: str) -> Iterator[Entry]:
    """A spilled run, read back in order; the file is removed once read."""
    try:
        with open(path, "rb", buffering=1 << 20) as run:
            while header := run.read(_FRAME.size):
                packed, size = _FRAME.unpack(header)
                request = _DECODE(run.read(size))
                yield request.ts, request.id, packed, request
    finally:
        os.unlink(path)


@dataclass
class Ids:
    """Every id's 64-bit hash and origin, for :func:`check_unique`; and the identical copies dropped."""

    hashes: array[int] = field(default_factory=lambda: array("q"))
    origins: array[int] = field(default_factory=lambda: array("Q"))
    dropped: int = 0


def id_hash(ident: str) -> int:
    """Python's own 64-bit hash of the id (SipHash, a third of blake2b's cost here): the same in every shard, which
    are forked from the process that checks them; two ids that share one are told apart by :func:`check_unique`."""
    return hash(ident)


def unique(stream: Iterable[Entry], sources: Sequence[Source], dedupe: bool, ids: Ids) -> Iterator[LoggedRequest]:
    """The requests of a sorted stream; a copy of the previous request is dropped (``dedupe``) or an error."""
    previous: Entry | None = None
    hashes, origins = ids.hashes, ids.origins
    for entry in stream:
        ts, ident, packed, request = entry
        if previous is not None and ident == previous[1] and ts == previous[0]:
            if request == previous[3]:
                if dedupe:
                    ids.dropped += 1
                    continue
                raise LogError(f"id {ident!r} appears twice: {where(sources, previous[2])} and "
                               f"{where(sources, packed)} (identical copies: pass --dedupe to drop them)")
            raise LogError(_differing(ident, sources, previous[2], packed))
        previous = entry
        hashes.append(id_hash(ident))
        origins.append(packed)
        yield request


def _differing(ident: str, sources: Sequence[Source], first: int, second: int) -> str:
    return (f"id {ident!r} appears twice with different contents: {where(sources, first)} and "
            f"{where(sources, second)}")


def check_unique(parts: Iterable[Ids], sources: Sequence[Source]) -> None:
    """Raise for an id kept twice anywhere (copies with different timestamps, or in different shards)."""
    hashes = np.concatenate([np.frombuffer(part.hashes, dtype=np.int64) for part in parts] or [np.empty(0, np.int64)])
    origins = np.concatenate([np.frombuffer(part.origins, dtype=np.uint64) for part in parts]
                             or [np.empty(0, np.uint64)])
    if hashes.size < 2:
        return
    order = np.lexsort((origins, hashes))
    hashes, origins = hashes[order], origins[order]
    repeats = np.flatnonzero(hashes[1:] == hashes[:-1])
    for k in repeats:
        first, second = int(origins[k]), int(origins[k + 1])
        ident = _id_at(sources, first)
        if ident is not None and ident == _id_at(sources, second):  # not two ids with the same hash
            raise LogError(_differing(ident, sources, first, second))


def _id_at(sources: Sequence[Source], packed: int) -> str | None:
    source, wanted = sources[packed >> LINE_BITS], packed & ((1 << LINE_BITS) - 1)
    for lineno, line in lines(source):
        if lineno == wanted:
            try:
                request = parse_line(line, lineno)
            except LogFormatError:
                return None
            return None if request is None else request.id
    return None

"""docs/design.md#the-ledger-spool: commits Postgres could not take, kept until it can.

A spool is a sequence of segments of JSON Lines, one :class:`CommitRow` per line. Appends go to
the newest segment and are durable before :meth:`Spool.append` returns (written, fsync'd, and the
directory fsync'd when a segment is created). The drain reads the oldest segment whole, commits it
and deletes it; a segment once read is sealed, so appends never race a drain. A proxy killed
mid-drain replays the segment again at start-up, which the commit's request-id key makes harmless.
The spool is bounded in bytes: a row that does not fit is refused, and the caller logs it in full.

:class:`DiskSpool` is the durable one (``--spool-dir``); :class:`MemorySpool` keeps the same
segments in memory, for a proxy run without a directory, and says so at start-up.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from promptcache.proxy.storage.ledger import CommitRow

_log = logging.getLogger("promptcache.spool")
SEGMENT_BYTES = 4 << 20
"""A segment is sealed once it holds this much, so a drain reads and deletes at most about this at a time."""
_SUFFIX = ".jsonl"
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CommitRow)


class SpoolError(Exception):
    """The spool directory cannot be used: unreadable, or held by another live proxy (two writers would replay
    each other's commits)."""


class Spool:
    """Bounded segments of committed-later rows; the storage is the subclass's (four small methods)."""

    durable = False
    """Whether what it holds survives the process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.count = 0
        """Rows waiting, in every segment."""
        self.size = 0
        """Bytes waiting, in every segment."""
        self._segments: dict[int, int] = {}
        """Segment number → rows in it, oldest first."""
        self._sealed: set[int] = set()
        self._lock = asyncio.Lock()

    def _recover(self) -> None:
        """Count what an earlier process left, dropping a torn last line (a crash mid-append)."""
        for number in sorted(self._list()):
            data = self._read(number)
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                _log.warning("spool segment %d: dropped a torn last line of %d bytes (a crash mid-append)",
                             number, len(data) - len(whole))
                self._truncate(number, len(whole))
            if not whole:
                self._delete(number)
                continue
            self._segments[number] = whole.count(b"\n")
            self._sealed.add(number)
            self.count += self._segments[number]
            self.size += len(whole)

    async def append(self, rows: Sequence[CommitRow]) -> list[CommitRow]:
        """Make ``rows`` durable; returns the rows that did not fit in ``max_bytes`` (not spooled)."""
        lines, refused, added = bytearray(), [], 0
        for row in rows:
            line = _encoder.encode(row) + b"\n"
            if self.size + len(lines) + len(line) > self.max_bytes:
                refused.append(row)
                continue
            lines += line
            added += 1
        if not added:
            return refused
        async with self._lock:
            number = max(self._segments, default=0)
            if number == 0 or number in self._sealed:
                number += 1
                self._segments[number] = 0
            try:
                await asyncio.to_thread(self._write, number, bytes(lines))
            except OSError as exc:
                _log.error("cannot write the spool: %s", exc)
                if not self._segments[number]:
                    del self._segments[number]
                return list(rows)
            self._segments[number] += added
            self.count += added
            self.size += len(lines)
            if self._segment_size(number) >= SEGMENT_BYTES:
                self._sealed.add(number)
        return refused

    async def oldest(self) -> tuple[int, list[CommitRow]] | None:
        """The oldest segment's number and rows, sealing it; None when the spool is empty. A line that does not
        decode (never written by a proxy) is logged in full and skipped."""
        async with self._lock:
            if not self._segments:
                return None
            number = min(self._segments)
            self._sealed.add(number)
            data = await asyncio.to_thread(self._read, number)
        rows = []
        for n, line in enumerate(data.splitlines(), 1):
            try:
                rows.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                _log.error("spool segment %d line %d is not a commit, skipped (%s): %r", number, n, exc, line)
        return number, rows

    async def release(self, number: int) -> None:
        """Forget a drained segment."""
        async with self._lock:
            size = self._segment_size(number)
            await asyncio.to_thread(self._delete, number)
            self.count -= self._segments.pop(number)
            self.size -= size
            self._sealed.discard(number)

    async def rows(self) -> list[CommitRow]:
        """Everything waiting, oldest first (for inspection; the drain goes segment by segment)."""
        async with self._lock:
            numbers = sorted(self._segments)
            data = [await asyncio.to_thread(self._read, n) for n in numbers]
        return [_decoder.decode(line) for chunk in data for line in chunk.splitlines()]

    def close(self) -> None:
        """Release whatever the storage holds (the directory lock)."""

    # -- storage ------------------------------------------------------------------------------------

    def _list(self) -> list[int]:
        raise NotImplementedError

    def _read(self, number: int) -> bytes:
        raise NotImplementedError

    def _write(self, number: int, data: bytes) -> None:
        """Append ``data`` whole or not at all (an error leaves the segment as it was)."""
        raise NotImplementedError

    def _truncate(self, number: int, size: int) -> None:
        raise NotImplementedError

    def _delete(self, number: int) -> None:
        raise NotImplementedError

    def _segment_size(self, number: int) -> int:
        raise NotImplementedError


class MemorySpool(Spool):
    """Segments in memory: bounded like the disk's, lost with the process."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._data: dict[int, bytearray] = {}

    def _list(self) -> list[int]:
        return list(self._data)

    def _read(self, number: int) -> bytes:
        return bytes(self._data[number])

    def _write(self, number: int, data: bytes) -> None:
        self._data.setdefault(number, bytearray()).extend(data)

    def _truncate(self, number: int, size: int) -> None:
        del self._data[number][size:]

    def _delete(self, number: int) -> None:
        self._data.pop(number, None)

    def _segment_size(self, number: int) -> int:
        return len(self._data.get(number, b""))


class DiskSpool(Spool):
    """Segments as files ``<n>.jsonl`` in a directory this process holds an exclusive lock on."""

    durable = True

    def __init__(self, directory: Path, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self.directory = directory
        self._lock_fd = -1

    @classmethod
    def open(cls, directory: Path, max_bytes: int) -> DiskSpool:
        """Lock the directory (made if missing) and take over what it holds; :class:`SpoolError` if it cannot."""
        spool = cls(directory, max_bytes)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool directory {directory}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool directory {directory} is in use by another proxy") from None
        spool._lock_fd = fd
        try:
            spool._recover()
        except OSError as exc:
            spool.close()
            raise SpoolError(f"spool directory {directory}: {exc}") from exc
        if spool.count:
            _log.warning("spool holds %d commits from an earlier process; they land when Postgres takes them",
                         spool.count)
        return spool

    def adopt(self, other: Path) -> int:
        """Take over the segments of a spool no process holds (a worker of an earlier, larger ``--workers``), so
        they drain here; returns how many rows came over. A held directory is left alone."""
        try:
            orphan = DiskSpool.open(other, self.max_bytes)
        except SpoolError as exc:
            _log.warning("not adopting %s: %s", other, exc)
            return 0
        try:
            moved = 0
            for number in sorted(orphan._segments):
                rows = orphan._segments[number]
                mine = max(self._segments, default=0) + 1
                orphan._path(number).rename(self._path(mine))
                self._segments[mine] = rows
                self._sealed.add(mine)
                self.count += rows
                self.size += self._segment_size(mine)
                moved += rows
            self._sync_directory()
        finally:
            orphan.close()
        (other / ".lock").unlink(missing_ok=True)
        other.rmdir()
        if moved:
            _log.warning("adopted %d commits from %s", moved, other)
        return moved

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:012d}{_SUFFIX}"

    def _list(self) -> list[int]:
        return [int(p.stem) for p in self.directory.glob("*" + _SUFFIX) if p.stem.isdigit()]

    def _read(self, number: int) -> bytes:
        return self._path(number).read_bytes()

    def _write(self, number: int, data: bytes) -> None:
        path = self._path(number)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)  # e.g. a full disk: no torn line for the next append to follow
                raise
        finally:
            os.close(fd)
        if created:
            self._sync_directory()

    def _truncate(self, number: int, size: int) -> None:
        os.truncate(self._path(number), size)

    def _delete(self, number: int) -> None:
        self._path(number).unlink(missing_ok=True)
        self._sync_directory()

    def _segment_size(self, number: int) -> int:
        try:
            return self._path(number).stat().st_size
        except FileNotFoundError:
            return 0

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

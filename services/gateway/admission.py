"""The count of requests in flight that --max-concurrent-requests bounds: a
gateway's own (LocalCount), or the whole server's when several gateway
workers share the public ports (SharedCount).

SharedCount keeps one slot per worker in a small file that every worker
maps: the requests it has in flight and whether it has been ready once. A
worker admits a request under an exclusive lock on the file, after summing
every slot, so the bound is exact over the whole server; a worker that is
started again (after a crash) zeroes its own slot, so what a dead worker had
in flight is not counted for ever."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

# Per worker: requests in flight, then 1 once it has been ready.
SLOT = struct.Struct("<qq")


class InFlightCount(Protocol):
    def acquire(self, limit: int) -> bool:
        """Count one more request unless `limit` are in flight already."""

    def release(self) -> None: ...


class LocalCount:
    def __init__(self) -> None:
        self.count = 0

    def acquire(self, limit: int) -> bool:
        if self.count >= limit:
            return False
        self.count += 1
        return True

    def release(self) -> None:
        self.count -= 1


def create_slots(path: Path, workers: int) -> None:
    """The file of `workers` zeroed slots, made before any worker starts."""
    path.write_bytes(bytes(SLOT.size * workers))


def _all_ready(slots: bytes | mmap.mmap) -> bool:
    return all(ready for _, ready in SLOT.iter_unpack(slots))


def workers_ready(path: Path) -> bool:
    """Every worker of the slots file at `path` has been ready once."""
    with path.open("rb") as file:
        fcntl.flock(file, fcntl.LOCK_SH)
        return _all_ready(file.read())


class SharedCount:
    """Worker `index`'s view of the slots file at `path`."""

    def __init__(self, path: Path, index: int):
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, 0)
        self.workers = len(self._map) // SLOT.size
        if not 0 <= index < self.workers:
            raise ValueError(f"gateway worker {index} has no slot in {path} ({self.workers} workers)")
        self._offset = index * SLOT.size
        with self._locked():
            _, ready = SLOT.unpack_from(self._map, self._offset)
            SLOT.pack_into(self._map, self._offset, 0, ready)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _in_flight(self) -> int:
        return sum(count for count, _ in SLOT.iter_unpack(self._map))

    def _add(self, delta: int) -> None:
        count, ready = SLOT.unpack_from(self._map, self._offset)
        SLOT.pack_into(self._map, self._offset, count + delta, ready)

    def acquire(self, limit: int) -> bool:
        with self._locked():
            if self._in_flight() >= limit:
                return False
            self._add(1)
            return True

    def release(self) -> None:
        with self._locked():
            self._add(-1)

    def in_flight(self) -> int:
        with self._locked():
            return self._in_flight()

    def mark_ready(self) -> None:
        with self._locked():
            count, _ = SLOT.unpack_from(self._map, self._offset)
            SLOT.pack_into(self._map, self._offset, count, 1)

    def all_ready_once(self) -> bool:
        """Every worker has been ready at least once: the server as a whole
        has started (a worker started again later does not undo it)."""
        with self._locked():
            return _all_ready(self._map)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

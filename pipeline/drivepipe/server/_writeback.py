"""Write-behind for long sequential writes: start writeback early, fsync finds little left.

A direct upload ends with an ``fsync`` (the drive must be on disk before its
UUID is given out).  Left alone, the kernel holds gigabytes of dirty pages
and that final fsync stalls for seconds; worse, the dirty-page throttle hits
mid-upload.  :class:`WriteBehind` asks the kernel (``sync_file_range``) to
start writing each 32 MiB window as soon as it is complete, and for files
larger than a quarter of RAM also waits for older windows and drops them from
the page cache, so a 100 GiB upload does not evict everything else.  A
chunk (``ChunkWriter``) does the same in 4 MiB windows, so the ``fdatasync``
that must end each chunk before it is acknowledged waits for at most the last
window.  Advice only: where ``sync_file_range`` is missing nothing happens and
fsync does it all.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

from drivepipe._files import load_sync_file_range

WINDOW: Final = 32 << 20
_SYNC_FILE_RANGE_WAIT_BEFORE: Final = 1
_SYNC_FILE_RANGE_WRITE: Final = 2
_SYNC_FILE_RANGE_WAIT_AFTER: Final = 4


_sync_file_range = load_sync_file_range()


def _ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


class WriteBehind:
    """Call :meth:`advance` with the write position after each sequential write.

    ``start``: where the writes begin (a chunk's offset); ``window``: how much is
    written before its writeback is started.
    """

    __slots__ = ("_drop", "_fd", "_previous", "_started", "_window")

    def __init__(self, fd: int, size: int, *, start: int = 0, window: int = WINDOW) -> None:
        self._fd = fd
        self._previous = start
        self._started = start
        self._window = window
        self._drop = size > _ram() // 4

    def advance(self, pos: int) -> None:
        if _sync_file_range is None or pos - self._started < self._window:
            return
        _sync_file_range(self._fd, self._started, pos - self._started, _SYNC_FILE_RANGE_WRITE)
        if self._drop and self._previous < self._started:
            self._settle(self._previous, self._started - self._previous)
        self._previous, self._started = self._started, pos

    def _settle(self, offset: int, length: int) -> None:
        flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
        _sync_file_range(self._fd, offset, length, flags)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

"""Decode in worker threads, yield in image order: the one mechanism the readers share.

Before that, :func:`coalesce` turns the pieces a table-driven image maps (qcow2
clusters, vmdk grains) into jobs' worth of work: reads and batches of compressed
pieces.

In: a stream of *jobs*, each either an :class:`~drivepipe.Extent` that is ready
(a hole, a piece read in place) or a callable that produces a list of extents
(read and inflate some compressed clusters, decode an xz block).  Out: the
extents in job order.  At most ``limit`` jobs are in flight, so memory is
bounded by ``limit`` x the largest job; the decompressors release the GIL, so
the threads really run in parallel.  On an error or an early close, jobs not
started are cancelled.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeAlias

from drivepipe._extent import Extent

if TYPE_CHECKING:
    from array import array

Job: TypeAlias = Extent | Callable[[], list[Extent]]
#: the kinds of the pieces a table-driven image maps (qcow2 clusters, vmdk grains)
HOLE, DATA, COMPRESSED = 0, 1, 2
#: ``(kind, image offset, length, host offset, extra)``: one piece of such an image, where
#: ``extra`` is the format's (qcow2: the compressed size; vmdk: the grain's offset)
Piece: TypeAlias = tuple[int, int, int, int, int]
#: a table of such an image in memory: an array, not a tuple of ints (a 32 MiB L1 table
#: as a tuple would take ~160 MiB)
Table: TypeAlias = "array[int]"


class LazyPool:
    """A thread pool made on first use (a reader that is only inspected starts none)."""

    def __init__(self, threads: int, prefix: str) -> None:
        self.threads = max(1, threads)
        self.prefix = prefix
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.prefix)
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def in_order(jobs: Iterator[Job], pool: LazyPool, limit: int | None = None) -> Iterator[Extent]:
    """Run ``jobs`` on ``pool`` (``limit`` in flight, default 2 x threads + 2), in order."""
    most = limit if limit is not None else 2 * pool.threads + 2
    inflight: deque[Future[list[Extent]] | Extent] = deque()
    try:
        for job in jobs:
            inflight.append(job if isinstance(job, Extent) else pool.get().submit(job))
            while len(inflight) > most or (inflight and isinstance(inflight[0], Extent)):
                yield from _ready(inflight.popleft())
        while inflight:
            yield from _ready(inflight.popleft())
    finally:
        for item in inflight:
            if isinstance(item, Future):
                item.cancel()


def _ready(item: Future[list[Extent]] | Extent) -> Iterator[Extent]:
    if isinstance(item, Extent):
        yield item
    else:
        yield from item.result()


def coalesce(pieces: Iterable[Piece], unit: int, limit: int) -> Iterator[Piece | list[Piece]]:
    """The pieces as work: holes merged (one piece), host-contiguous data merged and cut
    into reads of at most ``limit`` bytes (pieces), compressed pieces of ``unit`` bytes
    of output batched up to ``limit`` of it (lists)."""
    pending: Piece | None = None
    batch: list[Piece] = []
    for piece in pieces:
        if piece[0] == COMPRESSED:
            if pending is not None:
                yield from _cut(pending, limit)
                pending = None
            batch.append(piece)
            if len(batch) * unit >= limit:
                yield batch
                batch = []
            continue
        if batch:
            yield batch
            batch = []
        if pending is not None and _joins(pending, piece):
            pending = (piece[0], pending[1], pending[2] + piece[2], pending[3], 0)
            continue
        if pending is not None:
            yield from _cut(pending, limit)
        pending = piece
    if batch:
        yield batch
    if pending is not None:
        yield from _cut(pending, limit)


def _joins(prev: Piece, piece: Piece) -> bool:
    """True if ``piece`` extends ``prev``: holes after holes, host-contiguous data."""
    if prev[0] != piece[0]:
        return False
    return prev[0] == HOLE or prev[3] + prev[2] == piece[3]


def _cut(piece: Piece, limit: int) -> Iterator[Piece]:
    """A data piece in reads of at most ``limit`` bytes; holes stay whole."""
    kind, offset, length, host, _ = piece
    if kind == HOLE or length <= limit:
        yield piece
        return
    for pos in range(0, length, limit):
        yield (kind, offset + pos, min(limit, length - pos), host + pos, 0)

"""Decode in worker threads, yield in image order: the one mechanism the readers share.

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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeAlias

from drivepipe._extent import Extent

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

Job: TypeAlias = Extent | Callable[[], list[Extent]]


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
                # concurrent.futures (and the logging it imports) when a pool is needed:
                # 18 ms of a start that reads no compressed image
                from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

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
            if not isinstance(item, Extent):
                item.cancel()


def _ready(item: Future[list[Extent]] | Extent) -> Iterator[Extent]:
    if isinstance(item, Extent):
        yield item
    else:
        yield from item.result()

"""The runner: wires source -> stages -> sink, meters each part, cleans up.

With ``overlap`` the source and stages run in a producer thread that feeds a
bounded queue, so reading/decoding/hashing work while the sink (a socket, a
disk) works too; the queue's depth bounds memory.  Whatever fails - a part
raising, a size that does not match, Ctrl-C - every part is closed, the sink
is aborted, and the error surfaces in the calling thread.

A thread only pays when the producer side has work to overlap.  When it would
run nothing but *inline* parts - a source or stage whose ``inline`` attribute
is true, as for plain ``pread``s of a mostly dense local file (a sparse one
keeps the thread: its holes are hashed while its data is read) - the handoff costs more than
it saves (the GIL passed back and forth for every extent, and a queue of
multi-MiB buffers that malloc keeps returning to the kernel): measured on 1 GiB
of warm raw file, the read + hash of ``checksum`` took 0.31-0.80 s with the
thread and 0.15-0.23 s without (xxh128sum: 0.18 s); ``convert`` of it 1.62 ->
1.47 s.  Such a pipeline runs in the calling thread.  (An upload keeps its
thread: the hash stage is not marked inline, and reading + hashing overlap
with the send there.)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from drivepipe._errors import Cancelled, SizeMismatch
from drivepipe._extent import Extent
from drivepipe._stage import Sink, Source, Stage
from drivepipe._stats import RunStats, StageStats

T = TypeVar("T")

_END = object()


def _close(it: Iterator[Extent]) -> None:
    """Close a generator chain now, so its ``finally`` blocks run in this thread."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def metered(upstream: Iterator[Extent], stats: StageStats) -> Iterator[Extent]:
    """Count bytes and inclusive seconds of ``upstream`` into ``stats``."""
    clock = time.perf_counter
    while True:
        t0 = clock()
        try:
            ext = next(upstream)
        except StopIteration:
            stats.inclusive += clock() - t0
            return
        stats.inclusive += clock() - t0
        stats.count(ext.length, ext.data is None)
        yield ext


def exact_size(upstream: Iterator[Extent], size: int, what: str = "image") -> Iterator[Extent]:
    """Pass extents through, failing as soon as they stop tiling ``[0, size)``."""
    pos = 0
    for ext in upstream:
        if ext.offset != pos:
            raise SizeMismatch(f"{what}: stream jumped from offset {pos} to {ext.offset}")
        pos += ext.length
        if pos > size:
            raise SizeMismatch(f"{what}: produced more than the announced {size} bytes")
        if ext.data is not None and len(ext.data) != ext.length:
            raise SizeMismatch(f"{what}: extent at {ext.offset} carries the wrong byte count")
        yield ext
    if pos != size:
        raise SizeMismatch(f"{what}: produced {pos} bytes, announced {size}")


class Pipeline(Generic[T]):
    """One run of ``source -> stages -> sink`` with stats in ``stats``.

    With ``overlap``, the source and the first ``split`` stages (all of them by
    default) run in a producer thread; the remaining stages and the sink run in
    the calling thread, fed through a queue of ``queue_depth`` extents.
    """

    def __init__(
        self,
        source: Source,
        stages: Sequence[Stage],
        sink: Sink[T],
        *,
        size: int,
        stats: RunStats | None = None,
        overlap: bool = True,
        queue_depth: int = 16,
        split: int | None = None,
    ) -> None:
        self.source = source
        self.stages = list(stages)
        self.sink = sink
        self.size = size
        self.stats = stats or RunStats(title=sink.name, total=size)
        self.stats.total = size
        self.queue_depth = max(1, queue_depth)
        self.split = len(self.stages) if split is None else max(0, min(split, len(self.stages)))
        self.overlap = overlap and not self._all_inline()
        self._stop = threading.Event()

    def _all_inline(self) -> bool:
        """True when the producer side would be only inline parts (see the module doc)."""
        producer: list[object] = [self.source, *self.stages[: self.split]]
        return all(getattr(part, "inline", False) for part in producer)

    def _meter(
        self, stages: Sequence[Stage], feed: Iterator[Extent], upstream: StageStats
    ) -> tuple[Iterator[Extent], StageStats]:
        for stage in stages:
            stats = self.stats.add(stage.name, "stage")
            stats.upstream = upstream
            feed = metered(stage.process(feed), stats)
            upstream = stats
        return feed, upstream

    def run(self) -> T:
        try:
            chain, feed, producer, sink_stats = self._build()
        except BaseException as exc:
            # A part can fail while the chain is built (an eager extents()/process()):
            # the others must still be aborted and closed.
            self._fail()
            self._close_all()
            if isinstance(exc, KeyboardInterrupt):
                raise Cancelled() from exc
            raise
        return self._run(chain, feed, producer, sink_stats)

    def _build(
        self,
    ) -> tuple[Iterator[Extent], Iterator[Extent], threading.Thread | None, StageStats]:
        """Wire and meter the parts; start nothing."""
        source_stats = self.stats.add(self.source.name, "source")
        chain, last = self._meter(
            self.stages[: self.split], metered(self.source.extents(), source_stats), source_stats
        )
        producer: threading.Thread | None = None
        feed = chain
        if self.overlap:
            q: queue.Queue[object] = queue.Queue(self.queue_depth)
            producer = threading.Thread(
                target=self._produce, args=(chain, q), name="drivepipe-producer", daemon=True
            )
            # The queue wait is the consumer side's "upstream" time: not work.
            last = StageStats("queue", "queue")
            feed = self._drain(q, last)
        feed, last = self._meter(self.stages[self.split :], feed, last)
        sink_stats = self.stats.add(self.sink.name, "sink")
        sink_stats.upstream = last
        return chain, feed, producer, sink_stats

    def _run(
        self,
        chain: Iterator[Extent],
        feed: Iterator[Extent],
        producer: threading.Thread | None,
        sink_stats: StageStats,
    ) -> T:
        try:
            self.stats.transfer_started = time.perf_counter()
            self.stats.set_phase("transfer")
            if producer is not None:
                producer.start()
            sink_stats.started = time.perf_counter()
            checked = exact_size(feed, self.size)
            if not self.sink.meter(sink_stats):
                checked = self._count(checked, sink_stats)
            result = self.sink.consume(checked, self.size)
            sink_stats.finished = time.perf_counter()
            return result
        except KeyboardInterrupt as exc:
            self._fail()
            raise Cancelled() from exc
        except BaseException:
            self._fail()
            raise
        finally:
            if sink_stats.started is not None and sink_stats.finished is None:
                sink_stats.finished = time.perf_counter()
            self._stop.set()
            if producer is not None and producer.is_alive():
                producer.join()
            _close(feed)
            if producer is None:
                _close(chain)
            self._close_all()
            self.stats.finished = time.perf_counter()
            self.stats.queue_fill = None

    def _fail(self) -> None:
        self._stop.set()
        self.sink.abort()

    def _close_all(self) -> None:
        for stage in self.stages:
            stage.close()
        self.source.close()
        self.sink.close()

    def _produce(self, chain: Iterator[Extent], q: queue.Queue[object]) -> None:
        item: object = _END
        try:
            for ext in chain:
                if not self._put(q, ext):
                    return
        except BaseException as exc:  # handed to the consumer thread, raised there
            item = exc
        finally:
            _close(chain)
        self._put(q, item)

    def _put(self, q: queue.Queue[object], item: object) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
            except queue.Full:
                continue
            self.stats.queue_fill = (q.qsize(), self.queue_depth)
            return True
        return False

    def _drain(self, q: queue.Queue[object], wait: StageStats) -> Iterator[Extent]:
        clock = time.perf_counter
        while True:
            t0 = clock()
            item = q.get()
            wait.inclusive += clock() - t0
            self.stats.note_queue(q.qsize(), self.queue_depth)
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Extent)
            yield item

    @staticmethod
    def _count(feed: Iterator[Extent], stats: StageStats) -> Iterator[Extent]:
        for ext in feed:
            stats.count(ext.length, ext.data is None)
            yield ext


def run_pipeline(
    source: Source,
    stages: Sequence[Stage],
    sink: Sink[T],
    *,
    size: int,
    stats: RunStats | None = None,
    overlap: bool = True,
    queue_depth: int = 16,
    split: int | None = None,
) -> T:
    """Run ``source -> stages -> sink`` and return the sink's result."""
    pipe = Pipeline(
        source, stages, sink, size=size, stats=stats, overlap=overlap,
        queue_depth=queue_depth, split=split,
    )
    return pipe.run()

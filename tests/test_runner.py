"""The runner: size checks, errors across the thread, cleanup, bounded queue, stats.

The sources, stages and sinks here are small real implementations of the
contracts (the runner is the thing under test), each recording what was done
to it so the tests can check cleanup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from drivepipe._errors import Cancelled, SizeMismatch
from drivepipe._extent import Extent
from drivepipe._runner import run_pipeline
from drivepipe._stage import Sink, Source, Stage
from drivepipe._stats import RunStats


class ListSource(Source):
    """Yields the given extents; optionally raises after ``fail_after`` of them."""

    name = "list"

    def __init__(
        self, extents: list[Extent], size: int | None = None, fail_after: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.items = extents
        self.size = sum(e.length for e in extents) if size is None else size
        self.fail_after = fail_after
        self.error = error or RuntimeError("source broke")
        self.produced = 0
        self.closed = 0

    def extents(self) -> Iterator[Extent]:
        for i, ext in enumerate(self.items):
            if self.fail_after is not None and i == self.fail_after:
                raise self.error
            self.produced += 1
            yield ext

    def close(self) -> None:
        self.closed += 1


class CallStage(Stage):
    """Calls ``hook`` on every extent it passes through."""

    def __init__(self, name: str, hook: Callable[[Extent], None] = lambda e: None) -> None:
        self.name = name
        self.hook = hook
        self.closed = 0

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in upstream:
            self.hook(ext)
            yield ext

    def close(self) -> None:
        self.closed += 1


class CollectSink(Sink[bytes]):
    """Keeps the stream's bytes; ``hook`` runs on each extent as it arrives."""

    name = "collect"

    def __init__(self, hook: Callable[[Extent], None] = lambda e: None) -> None:
        self.hook = hook
        self.aborted = 0
        self.closed = 0

    def consume(self, extents: Iterator[Extent], size: int) -> bytes:
        out = bytearray()
        for ext in extents:
            self.hook(ext)
            out += bytes(ext.length) if ext.data is None else ext.data
        return bytes(out)

    def abort(self) -> None:
        self.aborted += 1

    def close(self) -> None:
        self.closed += 1


def tiled(*specs: bytes | int) -> list[Extent]:
    """Extents in order: ``bytes`` are data, ``int`` are holes of that length."""
    out: list[Extent] = []
    pos = 0
    for spec in specs:
        if isinstance(spec, int):
            out.append(Extent.hole(pos, spec))
            pos += spec
        else:
            out.append(Extent(pos, len(spec), spec))
            pos += len(spec)
    return out


OVERLAP = pytest.mark.parametrize("overlap", [True, False], ids=["threaded", "inline"])


@OVERLAP
def test_stream_arrives_whole_and_stats_add_up(overlap: bool) -> None:
    extents = tiled(b"abc", 5, b"defg", 1000, b"h")
    source = ListSource(extents)
    stats = RunStats("t")
    stage = CallStage("pass")
    result = run_pipeline(
        source, [stage], CollectSink(), size=source.size, stats=stats, overlap=overlap
    )
    assert result == b"abc" + bytes(5) + b"defg" + bytes(1000) + b"h"
    by_name = {s.name: s for s in stats.stages}
    assert set(by_name) == {"list", "pass", "collect"}
    for part in by_name.values():
        assert part.bytes == source.size
        assert part.data_bytes == 8
        assert part.hole_bytes == 1005
        assert part.busy >= 0
    assert stats.done == source.size
    assert stats.total == source.size


@OVERLAP
@pytest.mark.parametrize(
    ("extents", "size", "message"),
    [
        (tiled(b"abcd", 4), 5, "more than the announced"),
        (tiled(b"abcd", 4), 12, "produced 8 bytes, announced 12"),
        ([Extent(0, 4, b"abcd"), Extent(6, 2, b"ef")], 8, "jumped from offset 4 to 6"),
        ([Extent(0, 4, b"abcd"), Extent(2, 4, b"cdef")], 6, "jumped from offset 4 to 2"),
        ([Extent(0, 4, b"abc")], 4, "wrong byte count"),
    ],
    ids=["too-many", "too-few", "gap", "overlap", "short-data"],
)
def test_exact_size_refuses_streams_that_do_not_tile(
    overlap: bool, extents: list[Extent], size: int, message: str
) -> None:
    source = ListSource(extents, size=size)
    sink = CollectSink()
    with pytest.raises(SizeMismatch, match=message):
        run_pipeline(source, [], sink, size=size, overlap=overlap)
    assert sink.aborted == 1
    assert sink.closed == 1
    assert source.closed == 1


@OVERLAP
def test_producer_error_surfaces_in_caller_and_everything_is_cleaned_up(overlap: bool) -> None:
    error = ValueError("disk on fire")
    source = ListSource(tiled(*[b"x" * 10] * 20), fail_after=7, error=error)
    stages = [CallStage("a"), CallStage("b")]
    sink = CollectSink()
    with pytest.raises(ValueError, match="disk on fire") as info:
        run_pipeline(source, stages, sink, size=source.size, overlap=overlap)
    assert info.value is error
    assert source.produced == 7
    assert sink.aborted == 1 and sink.closed == 1
    assert source.closed == 1
    assert [s.closed for s in stages] == [1, 1]


@OVERLAP
def test_sink_error_stops_the_producer_and_cleans_up(overlap: bool) -> None:
    source = ListSource(tiled(*[b"y" * 10] * 10_000))

    def explode(ext: Extent) -> None:
        if ext.offset >= 50:
            raise OSError(28, "No space left on device")

    sink = CollectSink(explode)
    with pytest.raises(OSError, match="No space"):
        run_pipeline(source, [CallStage("s")], sink, size=source.size, overlap=overlap,
                     queue_depth=4)
    assert source.produced < 10_000, "the producer kept going after the sink failed"
    assert sink.aborted == 1 and sink.closed == 1 and source.closed == 1
    assert not [t for t in threading.enumerate() if t.name == "drivepipe-producer"]


@OVERLAP
@pytest.mark.parametrize("where", ["stage", "sink"])
def test_ctrl_c_inside_a_part_becomes_cancelled_and_aborts_the_sink(
    overlap: bool, where: str
) -> None:
    def interrupt(ext: Extent) -> None:
        if ext.offset >= 30:
            raise KeyboardInterrupt

    source = ListSource(tiled(*[b"z" * 10] * 10))
    stage = CallStage("s", interrupt if where == "stage" else lambda e: None)
    sink = CollectSink(interrupt if where == "sink" else lambda e: None)
    with pytest.raises(Cancelled) as info:
        run_pipeline(source, [stage], sink, size=source.size, overlap=overlap)
    assert info.value.exit_code == 130
    assert sink.aborted == 1 and sink.closed == 1
    assert source.closed == 1 and stage.closed == 1


def test_queue_bounds_how_far_the_producer_runs_ahead() -> None:
    depth = 3
    source = ListSource(tiled(*[b"q" * 8] * 200))
    ahead: list[int] = []
    consumed = 0

    def slow_consumer(ext: Extent) -> None:
        nonlocal consumed
        consumed += 1
        # give the producer every chance to run ahead
        time.sleep(0.0005)
        ahead.append(source.produced - consumed)

    run_pipeline(source, [], CollectSink(slow_consumer), size=source.size, queue_depth=depth)
    # in the queue, plus one in the producer's hand waiting to be put
    assert max(ahead) <= depth + 1
    assert max(ahead) >= 1, "the producer never ran ahead: the stages did not overlap"


@OVERLAP
def test_the_sleeping_stage_is_the_bottleneck(overlap: bool) -> None:
    source = ListSource(tiled(*([b"s" * 64, 64] * 15)))
    stats = RunStats("t")
    stages = [
        CallStage("fast-before"),
        CallStage("sleepy", lambda e: time.sleep(0.004)),
        CallStage("fast-after"),
    ]
    run_pipeline(
        source, stages, CollectSink(), size=source.size, stats=stats, overlap=overlap, split=2
    )
    neck = stats.bottleneck()
    assert neck is not None and neck.name == "sleepy"
    assert all(s.busy >= 0 for s in stats.stages)
    assert stats.as_dict()["bottleneck"] == "sleepy"


def test_split_runs_later_stages_in_the_calling_thread() -> None:
    seen: dict[str, set[str]] = {"early": set(), "late": set()}

    def where(name: str) -> Callable[[Extent], None]:
        return lambda e: seen[name].add(threading.current_thread().name)

    source = ListSource(tiled(b"a", b"b", 3))
    run_pipeline(
        source, [CallStage("e", where("early")), CallStage("l", where("late"))], CollectSink(),
        size=source.size, split=1,
    )
    assert seen["early"] == {"drivepipe-producer"}
    assert seen["late"] == {threading.current_thread().name}


class EagerSource(ListSource):
    """A source whose ``extents()`` does its work (and fails) before returning."""

    def extents(self) -> Iterator[Extent]:
        raise self.error


class EagerStage(CallStage):
    """A stage whose ``process()`` reads a header eagerly and finds it corrupt."""

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        raise ValueError("bad header")


@OVERLAP
def test_parts_failing_while_the_pipeline_is_built_are_still_cleaned_up(overlap: bool) -> None:
    source = EagerSource(tiled(b"abc"), error=OSError(5, "Input/output error"))
    sink = CollectSink()
    with pytest.raises(OSError):
        run_pipeline(source, [], sink, size=3, overlap=overlap)
    assert source.closed == 1 and sink.aborted == 1 and sink.closed == 1

    source = ListSource(tiled(b"abc"))
    stages = [CallStage("ok"), EagerStage("eager")]
    sink = CollectSink()
    with pytest.raises(ValueError, match="bad header"):
        run_pipeline(source, stages, sink, size=3, overlap=overlap, split=1)
    assert source.closed == 1 and [s.closed for s in stages] == [1, 1]
    assert sink.aborted == 1 and sink.closed == 1

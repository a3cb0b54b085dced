"""Inline producers run in the calling thread; others get a producer thread; both clean up."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivepipe._errors import ImageError
from drivepipe._extent import Extent
from drivepipe._runner import Pipeline
from drivepipe._stage import Sink, Source, Stage


class Seen(Source):
    name = "seen"

    def __init__(self, inline: bool, fail_at: int | None = None) -> None:
        self.inline = inline
        self.size = 4 * 1024
        self.fail_at = fail_at
        self.threads: set[int] = set()
        self.closed = 0

    def extents(self) -> Iterator[Extent]:
        for i in range(4):
            self.threads.add(threading.get_ident())
            if i == self.fail_at:
                raise ImageError("bad block")
            yield Extent(i * 1024, 1024, bytes([i + 1]) * 1024)

    def close(self) -> None:
        self.closed += 1


class Passing(Stage):
    name = "pass"

    def __init__(self, inline: bool) -> None:
        self.inline = inline

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        yield from upstream


class Collect(Sink[bytes]):
    name = "collect"

    def __init__(self) -> None:
        self.aborted = False

    def consume(self, extents: Iterator[Extent], size: int) -> bytes:
        return b"".join(bytes(e.data) for e in extents if e.data is not None)

    def abort(self) -> None:
        self.aborted = True


@pytest.mark.parametrize(("source_inline", "stage_inline", "threaded"), [
    (True, True, False), (True, False, True), (False, True, True), (False, False, True),
])
def test_thread_only_when_a_producer_part_is_not_inline(
    source_inline: bool, stage_inline: bool, threaded: bool
) -> None:
    source = Seen(source_inline)
    pipe = Pipeline(source, [Passing(stage_inline)], Collect(), size=source.size)
    assert pipe.overlap is threaded
    out = pipe.run()
    assert out == b"".join(bytes([i + 1]) * 1024 for i in range(4))
    assert (source.threads != {threading.get_ident()}) is threaded
    assert source.closed == 1


def test_stages_after_the_split_do_not_matter() -> None:
    source = Seen(True)
    pipe = Pipeline(source, [Passing(False)], Collect(), size=source.size, split=0)
    assert pipe.overlap is False


@pytest.mark.parametrize("inline", [True, False])
def test_a_failing_source_aborts_the_sink_either_way(inline: bool) -> None:
    source = Seen(inline, fail_at=2)
    sink = Collect()
    with pytest.raises(ImageError, match="bad block"):
        Pipeline(source, [], sink, size=source.size).run()
    assert sink.aborted
    assert source.closed == 1


def test_file_reader_is_inline_only_when_mostly_dense(tmp_path: Path) -> None:
    from drivepipe_plugins.sources.file import SparseFileReader  # noqa: PLC0415

    dense = tmp_path / "dense.raw"
    dense.write_bytes(b"\x01" * (1 << 20))
    sparse = tmp_path / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.write(b"\x01" * (1 << 20))
    readers = [SparseFileReader(str(dense)), SparseFileReader(str(sparse))]
    try:
        assert readers[0].inline is True
        # a filesystem without holes allocates everything: then it is dense, read inline
        assert readers[1].inline is (os.stat(sparse).st_blocks * 512 >= (64 << 20) * 0.9)
        for reader in readers:
            pipe = Pipeline(reader, [], Collect(), size=reader.size)
            assert pipe.overlap is not reader.inline
            data = pipe.run()  # holes are left out by Collect: the data bytes only
            assert data == b"\x01" * (1 << 20)
    finally:
        for reader in readers:
            reader.close()

"""The upload's read callback on its own: what curl gets for each request of bytes.

No server needed: :class:`BodyReader` is called the way libcurl calls a
READFUNCTION (with the free space of its upload buffer) and must hand back the
stream's exact bytes, as views (no copies), holes as views of the shared zero
buffer, and abort - before the last byte - when the stream has the wrong size.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from drivepipe._errors import CorruptImage, SizeMismatch
from drivepipe._extent import ZERO, ZERO_SIZE, Extent
from drivepipe_plugins.targets.drive_upload import BodyReader, Interrupts

ABORT = 0x10000000  # CURL_READFUNC_ABORT


def random_stream(rng: random.Random, count: int) -> tuple[list[Extent], bytes]:
    extents, parts, pos = [], [], 0
    for _ in range(count):
        n = rng.choice([1, 7, 4096, rng.randrange(1, 2 * ZERO_SIZE + 2)])
        if rng.random() < 0.5:
            extents.append(Extent.hole(pos, n))
            parts.append(bytes(n))
        else:
            data = rng.randbytes(min(n, 1 << 20))
            n = len(data)
            extents.append(Extent(pos, n, data))
            parts.append(data)
        pos += n
    return extents, b"".join(parts)


def drain(reader: BodyReader, rng: random.Random) -> list[memoryview]:
    chunks = []
    while reader.sent < reader.size:
        want = rng.choice([1, 100, 16 << 10, 1 << 20, 2 << 20])
        chunk = reader(want)
        assert isinstance(chunk, memoryview), reader.error
        assert 0 < len(chunk) <= want
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("seed", range(6))
def test_reader_serves_the_exact_stream_as_views(seed: int) -> None:
    rng = random.Random(seed)
    extents, expected = random_stream(rng, rng.randrange(1, 9))
    reader = BodyReader(iter(extents), len(expected))
    chunks = drain(reader, rng)
    assert b"".join(chunks) == expected
    data_objects = {id(e.data) for e in extents if e.data is not None}
    for chunk in chunks:
        # Holes come from the one zero buffer, data from the extent's own buffer: no copies.
        assert chunk.obj is ZERO or id(chunk.obj) in data_objects
    assert reader.error is None


def test_a_huge_hole_allocates_nothing() -> None:
    size = 1 << 40  # 1 TiB of zeros: only views of the shared buffer are handed out
    reader = BodyReader(iter([Extent.hole(0, size)]), size)
    for _ in range(100):
        chunk = reader(2 << 20)
        assert isinstance(chunk, memoryview) and chunk.obj is ZERO and len(chunk) == 2 << 20


def test_short_stream_aborts() -> None:
    reader = BodyReader(iter([Extent(0, 10, b"x" * 10)]), 11)
    assert bytes(reader(100)) == b"x" * 10  # not the last byte yet
    assert reader(100) == ABORT
    assert isinstance(reader.error, SizeMismatch)


def test_long_stream_aborts_before_the_last_byte() -> None:
    extents = [Extent(0, 10, b"x" * 10), Extent(10, 5, b"y" * 5)]
    reader = BodyReader(iter(extents), 10)
    # Handing over these 10 bytes would complete the body: the extra extent is found first.
    assert reader(100) == ABORT
    assert isinstance(reader.error, SizeMismatch)
    assert "more than the announced" in str(reader.error)


def test_trailing_empty_extents_are_fine() -> None:
    extents = [Extent(0, 10, b"x" * 10), Extent(10, 0, b""), Extent.hole(10, 0)]
    reader = BodyReader(iter(extents), 10)
    assert bytes(reader(100)) == b"x" * 10
    assert reader.error is None


def test_pipeline_error_is_kept_for_after_perform() -> None:
    def failing() -> Iterator[Extent]:
        yield Extent(0, 4, b"abcd")
        raise CorruptImage("bad cluster")

    reader = BodyReader(failing(), 100)
    assert bytes(reader(2)) == b"ab"
    assert bytes(reader(100)) == b"cd"
    assert reader(100) == ABORT
    assert isinstance(reader.error, CorruptImage)


def test_interrupt_flag_aborts_the_next_read() -> None:
    interrupts = Interrupts()
    reader = BodyReader(iter([Extent.hole(0, 100)]), 100, interrupts)
    assert len(reader(10)) == 10  # type: ignore[arg-type]  # a view, checked by len
    assert interrupts(0, 0, 0, 0) == 0
    interrupts.requested = True
    assert interrupts(0, 0, 0, 0) == 1  # XFERINFOFUNCTION asks curl to stop
    assert reader(10) == ABORT
    assert isinstance(reader.error, KeyboardInterrupt)


@pytest.mark.parametrize("extent", [Extent(0, 1024, b"z" * 1024), Extent.hole(0, 1024)])
def test_extent_running_past_the_size_aborts(extent: Extent) -> None:
    """Without the runner's check too: never more than Content-Length, never a full body."""
    reader = BodyReader(iter([extent]), 1000)
    assert bytes(reader(600)) == bytes(extent.data or bytes(600))[:600]
    assert reader(2048) == ABORT
    assert reader.sent == 1000  # counted, but the last call's bytes never reached curl
    assert isinstance(reader.error, SizeMismatch)

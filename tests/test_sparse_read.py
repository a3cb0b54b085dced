"""The sparse reader: holes from SEEK_DATA/SEEK_HOLE are never read, content is exact.

"Never read" is checked by recording every ``os.pread``/``os.preadv`` the
reader makes, and every window of the file it maps, while it streams a real
sparse file on the test filesystem.
"""

from __future__ import annotations

import mmap
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.decode_helpers import checked
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_files import MakeImage, random_layout, write_sparse
from tmpfs import loop_device as attach_loop

from drivepipe._errors import ImageError
from drivepipe._extent import ZERO_BLOCK, Extent, is_zero
from drivepipe._registry import open_image
from drivepipe._stage import OpenOptions
from drivepipe.jobs.images import ReadOptions, open_input
from drivepipe_plugins.sources import file as file_source
from drivepipe_plugins.sources.file import SparseFileReader, data_ranges

MiB = 1 << 20

def content(extents: list[Extent]) -> bytes:
    return b"".join(bytes(e.length) if e.data is None else bytes(e.data) for e in extents)


def assert_tiles(extents: list[Extent], start: int, end: int) -> None:
    for _ in checked(extents, start, end):
        pass


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every (offset, length) read with os.pread/os.preadv from now on."""
    seen: list[tuple[int, int]] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, offset: int) -> bytes:
        seen.append((offset, n))
        return real_pread(fd, n, offset)

    def preadv(fd: int, buffers: list[bytearray], offset: int, *flags: int) -> int:
        seen.append((offset, sum(len(memoryview(b)) for b in buffers)))
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    record_windows(monkeypatch, seen)
    return seen


def record_windows(monkeypatch: pytest.MonkeyPatch, seen: list[tuple[int, int]]) -> None:
    """Count each mapped window as a read of its bytes (mapping is how the data is read)."""
    real_map = file_source.map_window

    def map_window(fd: int, offset: int, length: int) -> mmap.mmap:
        seen.append((offset, length))
        return real_map(fd, offset, length)

    monkeypatch.setattr(file_source, "map_window", map_window)


def written_blocks(layout: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """The 4 KiB blocks touched by each written piece: the most a filesystem can call data."""
    spans = sorted(
        (off - off % ZERO_BLOCK, -(-(off + len(data)) // ZERO_BLOCK) * ZERO_BLOCK)
        for off, data in layout
    )
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def inside(span: tuple[int, int], allowed: list[tuple[int, int]]) -> bool:
    return any(a <= span[0] and span[1] <= b for a, b in allowed)


def fs_supports_holes(path: Path) -> bool:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return sum(e - s for s, e in data_ranges(f.fileno(), size)) < size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(1, 6 * MiB),
    pieces=st.integers(0, 6),
    read_size=st.sampled_from([4096, 64 << 10, 1 * MiB, 4 * MiB]),
    mmap_reads=st.booleans(),
)
def test_stream_is_exact_and_holes_are_never_read(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    size: int,
    pieces: int,
    read_size: int,
    mmap_reads: bool,
) -> None:
    rng = random.Random(seed)
    layout = random_layout(rng, size, pieces, min(size, 256 << 10))
    path = write_sparse(tmp_path_factory.mktemp("r") / "img.raw", size, layout)
    expected = path.read_bytes()
    seen: list[tuple[int, int]] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        seen.append((offset, n))
        return real_pread(fd, n, offset)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pread", pread)
        record_windows(mp, seen)
        reader = SparseFileReader(str(path), read_size=read_size, mmap_reads=mmap_reads)
        try:
            assert reader.seekable_holes
            extents = list(reader.extents())
        finally:
            reader.close()
    assert_tiles(extents, 0, size)
    assert content(extents) == expected
    allowed = written_blocks(layout)
    for offset, n in seen:
        assert inside((offset, offset + n), allowed), f"read a hole at {offset}+{n}"
        # large aligned reads: no read crosses a read_size boundary
        assert offset // read_size == (offset + n - 1) // read_size
    data = sum(e.length for e in extents if e.data is not None)
    assert sum(n for _, n in seen) == data
    assert data <= sum(b - a for a, b in allowed)


def test_a_mostly_hole_file_reads_only_its_data(
    make_sparse: MakeImage, reads: list[tuple[int, int]]
) -> None:
    path = make_sparse(256 * MiB, pieces=3, max_piece=64 << 10, seed=3)
    if not fs_supports_holes(path):
        pytest.skip("the test filesystem keeps no holes")
    reader = SparseFileReader(str(path))
    try:
        extents = list(reader.extents())
    finally:
        reader.close()
    read_bytes = sum(n for _, n in reads)
    assert read_bytes <= 3 * ((64 << 10) + 2 * ZERO_BLOCK)
    assert sum(e.length for e in extents if e.is_hole) >= 256 * MiB - read_bytes


@settings(max_examples=40, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 3 * MiB), st.integers(0, 2 * MiB)), max_size=8),
    read_size=st.sampled_from([4096, 128 << 10, 1 * MiB]),
)
def test_read_range_matches_the_file(
    sparse_sample: tuple[Path, bytes], ranges: list[tuple[int, int]], read_size: int
) -> None:
    path, expected = sparse_sample
    reader = SparseFileReader(str(path), read_size=read_size)
    try:
        for offset, length in ranges:
            end = min(offset + length, len(expected))
            got = list(reader.read_range(offset, length))
            if offset >= end:
                assert got == []
                continue
            assert_tiles(got, offset, end)
            assert content(got) == expected[offset:end]
    finally:
        reader.close()


@pytest.fixture(scope="module")
def sparse_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    rng = random.Random(11)
    size = 3 * MiB + 1234
    layout = random_layout(rng, size, 6, 300 << 10, zero_pieces=2)
    path = write_sparse(tmp_path_factory.mktemp("rr") / "sample.raw", size, layout)
    return path, path.read_bytes()


def assert_zero_blocks_are_holes(extents: list[Extent]) -> None:
    for ext in extents:
        if ext.data is None:
            continue
        view = memoryview(ext.data)
        for start in range((-ext.offset) % ZERO_BLOCK, ext.length - ZERO_BLOCK + 1, ZERO_BLOCK):
            assert not is_zero(view[start : start + ZERO_BLOCK]), f"zero block at {ext.offset}"


def assert_read_back(extents: list[Extent], expected: bytes) -> None:
    """The extents tile ``expected``, hold its bytes, and no zero block is left as data."""
    assert_tiles(extents, 0, len(expected))
    assert content(extents) == expected
    assert_zero_blocks_are_holes(extents)


def test_without_hole_information_zero_blocks_become_holes(make_sparse: MakeImage) -> None:
    path = make_sparse(5 * MiB + 77, pieces=5, max_piece=200 << 10, zero_pieces=3, seed=5)
    expected = path.read_bytes()
    reader = SparseFileReader(str(path), read_size=1 * MiB)
    # As on a filesystem without SEEK_HOLE: every byte is "data" until looked at.
    reader.seekable_holes = False
    reader.detect_zeros = True
    try:
        extents = list(reader.extents())
    finally:
        reader.close()
    assert_read_back(extents, expected)
    assert sum(e.length for e in extents if e.is_hole) >= 4 * MiB


def test_detect_zeros_also_works_with_hole_information(make_sparse: MakeImage) -> None:
    path = make_sparse(2 * MiB, pieces=2, max_piece=300 << 10, zero_pieces=4, seed=8)
    reader = SparseFileReader(str(path), detect_zeros=True)
    try:
        extents = list(reader.extents())
    finally:
        reader.close()
    assert content(extents) == path.read_bytes()
    assert_zero_blocks_are_holes(extents)


def test_dropping_the_cache_behind_the_cursor_keeps_the_content(make_sparse: MakeImage) -> None:
    path = make_sparse(3 * MiB, pieces=4, max_piece=1 * MiB, seed=9)
    reader = SparseFileReader(str(path), read_size=4096, drop_cache_above=0)
    try:
        assert reader.drop_cache
        assert content(list(reader.extents())) == path.read_bytes()
    finally:
        reader.close()


def test_empty_file_has_no_extents(tmp_path: Path) -> None:
    path = tmp_path / "empty.raw"
    path.touch()
    reader = SparseFileReader(str(path))
    try:
        assert reader.size == 0
        assert list(reader.extents()) == []
        assert reader.data_size() == 0
    finally:
        reader.close()


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        SparseFileReader(str(tmp_path / "nope.raw"))


def assert_shrinking_refused(path: Path, cut_to: int) -> None:
    """Cut ``path`` to ``cut_to`` bytes after the first extent was read: refused."""
    reader = SparseFileReader(str(path), read_size=1 * MiB)
    try:
        stream = reader.extents()
        next(stream)
        os.truncate(path, cut_to)
        with pytest.raises(ImageError, match="shrank"):
            list(stream)
    finally:
        reader.close()


def test_a_file_that_shrinks_while_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.raw"
    path.write_bytes(os.urandom(4 * MiB))
    assert_shrinking_refused(path, 2 * MiB)


def test_a_file_truncated_into_a_hole_while_read_is_refused(tmp_path: Path) -> None:
    # Data, a hole, then data: cut the file inside the hole after the first data range.
    size = 8 * MiB
    path = write_sparse(tmp_path / "cut.raw", size, [(0, b"a" * MiB), (6 * MiB, b"b" * MiB)])
    if not fs_supports_holes(path):
        pytest.skip("the test filesystem keeps no holes")
    assert_shrinking_refused(path, 3 * MiB)


def test_raw_format_reports_sizes_and_random_access(make_sparse: MakeImage) -> None:
    path = make_sparse(4 * MiB + 10, pieces=3, max_piece=128 << 10, seed=2)
    image = open_image(str(path), "raw", OpenOptions(read_size=1 * MiB))
    try:
        assert image.format == "raw"
        assert image.size == image.file_size == 4 * MiB + 10
        with open(path, "rb") as f:
            fs_data = sum(e - s for s, e in data_ranges(f.fileno(), image.size))
        assert image.data_size == fs_data
        assert image.random_access is image.source
        assert image.details == {"block_device": False, "holes_known": True}
    finally:
        image.close()


@pytest.fixture
def loop_device(make_sparse: MakeImage) -> Iterator[tuple[str, Path]]:
    """A loop block device over a sparse file (root and losetup needed, else skip)."""
    path = make_sparse(3 * MiB, pieces=3, max_piece=256 << 10, zero_pieces=1, seed=4)
    with attach_loop(path) as device:
        yield device, path


def test_block_device_is_read_whole_with_zero_blocks_as_holes(
    loop_device: tuple[str, Path],
) -> None:
    device, path = loop_device
    expected = path.read_bytes()
    reader = SparseFileReader(device, read_size=1 * MiB)
    try:
        assert reader.is_block
        assert reader.size == len(expected)
        assert not reader.seekable_holes
        extents = list(reader.extents())
    finally:
        reader.close()
    assert_read_back(extents, expected)
    assert any(e.is_hole for e in extents)


def test_only_the_data_counts_towards_dropping_the_page_cache(tmp_path: Path) -> None:
    # 64 GiB of holes and 1 MiB of data: nothing big enough to evict the cache for.
    path = write_sparse(tmp_path / "huge.raw", 64 << 30, [(5 << 30, os.urandom(MiB))])
    if not fs_supports_holes(path):
        pytest.skip("the test filesystem keeps no holes")
    for threshold, drops in ((4 * MiB, False), (MiB // 2, True)):
        reader = SparseFileReader(str(path), drop_cache_above=threshold)
        try:
            assert reader.drop_cache is drops
        finally:
            reader.close()


def test_a_regular_file_is_read_through_mapped_windows_and_pread_is_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dense.raw"
    path.write_bytes(os.urandom(3 * MiB + 5))
    expected = path.read_bytes()

    def kinds(**kw: bool) -> set[type]:
        reader = SparseFileReader(str(path), read_size=1 * MiB, **kw)
        try:
            extents = list(reader.extents())
        finally:
            reader.close()
        assert content(extents) == expected  # every view still valid after the stream ended
        return {type(e.data) for e in extents if e.data is not None}

    assert kinds() == {memoryview}
    assert kinds(mmap_reads=False) == {bytes}

    def refuse(fd: int, offset: int, length: int) -> mmap.mmap:
        raise OSError(19, "No such device")  # what a filesystem without mmap answers

    monkeypatch.setattr(file_source, "map_window", refuse)
    assert kinds() == {bytes}


def test_a_block_device_is_not_mapped(loop_device: tuple[str, Path]) -> None:
    reader = SparseFileReader(loop_device[0])
    try:
        assert not reader.mmap_reads
    finally:
        reader.close()


def test_read_options_choose_mmap_or_pread(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1 * MiB))
    for mmap_reads in (True, False):
        image = open_input(str(path), ReadOptions(mmap=mmap_reads))
        try:
            assert image.source.mmap_reads is mmap_reads  # type: ignore[attr-defined]
        finally:
            image.close()

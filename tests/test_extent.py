"""Extents, the shared zero buffer, zero detection, splitting and rechunking."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivepipe._extent import (
    ZERO,
    ZERO_BLOCK,
    ZERO_SIZE,
    Extent,
    is_zero,
    rechunk,
    split_zeros,
    zero_chunks,
)


def test_hole_extent_carries_no_bytes() -> None:
    hole = Extent.hole(4096, 1 << 40)
    assert hole.is_hole
    assert hole.data is None
    assert hole.end == 4096 + (1 << 40)
    assert not Extent(0, 3, b"abc").is_hole


@pytest.mark.parametrize("n", [0, 1, 4095, ZERO_SIZE, ZERO_SIZE + 1, 3 * ZERO_SIZE + 17])
def test_is_zero_on_zeros_and_on_one_set_byte(n: int) -> None:
    buf = bytearray(n)
    assert is_zero(buf)
    assert is_zero(memoryview(buf))
    if n:
        for pos in {0, n // 2, n - 1}:
            buf[pos] = 1
            assert not is_zero(buf)
            buf[pos] = 0


@pytest.mark.parametrize("length", [0, 1, ZERO_SIZE - 1, ZERO_SIZE, 2 * ZERO_SIZE + 5])
def test_zero_chunks_add_up_and_share_one_buffer(length: int) -> None:
    chunks = list(zero_chunks(length))
    assert sum(len(c) for c in chunks) == length
    assert all(len(c) <= ZERO_SIZE and c.obj is ZERO for c in chunks)


def _content(pieces: list[Extent]) -> bytes:
    return b"".join(bytes(p.length) if p.data is None else bytes(p.data) for p in pieces)


@st.composite
def blocky_data(draw: st.DrawFn) -> tuple[int, bytes]:
    """Data made of zero and non-zero runs, at an arbitrary (unaligned) image offset."""
    offset = draw(st.integers(0, 3 * ZERO_BLOCK))
    runs = draw(
        st.lists(st.tuples(st.booleans(), st.integers(1, 3 * ZERO_BLOCK)), min_size=1, max_size=8)
    )
    rng = random.Random(draw(st.integers(0, 2**32)))
    out = bytearray()
    for zero, n in runs:
        out += bytes(n) if zero else bytes(rng.randint(1, 255) for _ in range(n))
    return offset, bytes(out)


@settings(max_examples=60, deadline=None)
@given(blocky_data())
def test_split_zeros_tiles_keeps_content_and_holes_are_aligned_zero_blocks(
    case: tuple[int, bytes],
) -> None:
    offset, data = case
    pieces = list(split_zeros(Extent(offset, len(data), data)))
    pos = offset
    for piece in pieces:
        assert piece.offset == pos
        assert piece.length > 0
        pos = piece.end
    assert pos == offset + len(data)
    assert _content(pieces) == data
    for prev, nxt in itertools.pairwise(pieces):
        assert prev.is_hole != nxt.is_hole, "adjacent runs of one kind must be merged"
    for piece in pieces:
        if piece.is_hole and not is_zero(data):
            # a hole inside the extent starts/ends on a block boundary or the extent's edge
            assert piece.offset % ZERO_BLOCK == 0 or piece.offset == offset
            assert piece.end % ZERO_BLOCK == 0 or piece.end == offset + len(data)


@settings(max_examples=40, deadline=None)
@given(blocky_data())
def test_split_zeros_leaves_no_whole_zero_block_in_data(case: tuple[int, bytes]) -> None:
    offset, data = case
    for piece in split_zeros(Extent(offset, len(data), data)):
        if piece.data is None:
            continue
        view = memoryview(piece.data)
        first = (-piece.offset) % ZERO_BLOCK
        for start in range(first, piece.length - ZERO_BLOCK + 1, ZERO_BLOCK):
            assert not is_zero(view[start : start + ZERO_BLOCK])


def test_split_zeros_passes_holes_and_turns_all_zero_data_into_one_hole() -> None:
    hole = Extent.hole(10, 100)
    assert list(split_zeros(hole)) == [hole]
    assert list(split_zeros(Extent(7, 9000, bytes(9000)))) == [Extent.hole(7, 9000)]


def test_split_zeros_returns_dense_data_whole() -> None:
    data = b"\x01" * (3 * ZERO_BLOCK)
    (piece,) = split_zeros(Extent(0, len(data), data))
    assert piece.offset == 0 and piece.length == len(data) and bytes(piece.data or b"") == data


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 50)), max_size=10),
    st.integers(1, 20),
)
def test_rechunk_caps_data_extents_and_passes_holes(
    runs: list[tuple[bool, int]], max_len: int
) -> None:
    extents: list[Extent] = []
    pos = 0
    for hole, n in runs:
        extents.append(Extent.hole(pos, n) if hole else Extent(pos, n, bytes([n]) * n))
        pos += n
    out = list(rechunk(iter(extents), max_len))
    assert _content(out) == _content(extents)
    assert all(e.is_hole or e.length <= max_len for e in out)
    assert [e for e in out if e.is_hole] == [e for e in extents if e.is_hole]
    pos = 0
    for e in out:
        assert e.offset == pos
        pos = e.end


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 12345])
def test_split_zeros_finds_one_zero_block_in_dense_data(offset: int) -> None:
    rng = random.Random(offset)
    data = bytearray(rng.randbytes(64 * ZERO_BLOCK))
    # a block whose first 8 bytes are zero but not the rest stays data
    lead = (-offset) % ZERO_BLOCK
    decoy = lead + 5 * ZERO_BLOCK
    data[decoy : decoy + 8] = bytes(8)
    data[decoy + 8] = data[decoy + 8] or 1
    hole_at = lead + 20 * ZERO_BLOCK
    data[hole_at : hole_at + ZERO_BLOCK] = bytes(ZERO_BLOCK)
    pieces = list(split_zeros(Extent(offset, len(data), bytes(data))))
    assert _content(pieces) == bytes(data)
    holes = [p for p in pieces if p.is_hole]
    assert holes == [Extent.hole(offset + hole_at, ZERO_BLOCK)]


@pytest.mark.parametrize("where", ["head", "tail"])
def test_split_zeros_finds_partial_zero_blocks_at_the_edges(where: str) -> None:
    offset = 100  # the first block is partial: 3996 bytes
    data = bytearray(b"\x05" * (3 * ZERO_BLOCK))
    if where == "head":
        data[: ZERO_BLOCK - offset] = bytes(ZERO_BLOCK - offset)
        expected_hole = Extent.hole(offset, ZERO_BLOCK - offset)
    else:
        data[-offset:] = bytes(offset)
        expected_hole = Extent.hole(offset + len(data) - offset, offset)
    pieces = list(split_zeros(Extent(offset, len(data), bytes(data))))
    assert _content(pieces) == bytes(data)
    assert [p for p in pieces if p.is_hole] == [expected_hole]


def test_split_zeros_scans_buffers_it_cannot_sample() -> None:
    data = bytearray(b"\x01" * (4 * ZERO_BLOCK))
    data[ZERO_BLOCK : 2 * ZERO_BLOCK] = bytes(ZERO_BLOCK)
    words = memoryview(bytes(data)).cast("I")  # not a byte view
    pieces = list(split_zeros(Extent(0, len(data), words.cast("B"))))
    assert [p for p in pieces if p.is_hole] == [Extent.hole(ZERO_BLOCK, ZERO_BLOCK)]
    pieces = list(split_zeros(Extent(0, len(data), bytes(data)), block=1000))
    assert _content(pieces) == bytes(data)
    assert all(p.is_hole or not is_zero(p.data or b"") for p in pieces)

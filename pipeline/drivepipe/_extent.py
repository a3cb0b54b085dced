"""Extents: the unit that flows through every pipeline.

An image is a sequence of extents in image order, each starting where the
previous one ended.  A *hole* is an extent whose ``data`` is ``None``: a run of
zero bytes of the given length that carries no bytes at all, so a 100 GiB
hole costs the same as a 4 KiB one.  A data extent carries exactly ``length``
bytes (``bytes``, ``bytearray`` or ``memoryview``; consumers must not keep a
reference past the next pull unless the producer documents otherwise - the
built-in producers never reuse buffers, so keeping them is safe).

``ZERO`` is the one shared zero buffer: holes are hashed, sent and compared
against it instead of materialising zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

ZERO_SIZE = 4 << 20
ZERO = bytes(ZERO_SIZE)
ZERO_VIEW = memoryview(ZERO)

# The granularity at which data is checked for zeros (sparse output, holes
# found in decoded data).  4 KiB is the page/block size of every Linux
# filesystem, so nothing finer could be a hole on disk anyway.
ZERO_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes at ``offset``; ``data is None`` means zeros."""

    offset: int
    length: int
    data: Buffer | None = None

    @property
    def is_hole(self) -> bool:
        return self.data is None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @classmethod
    def hole(cls, offset: int, length: int) -> Extent:
        return cls(offset, length, None)


def is_zero(data: Buffer) -> bool:
    """True when every byte of ``data`` is zero, at memcmp speed."""
    view = memoryview(data)
    n = len(view)
    pos = 0
    while n - pos > ZERO_SIZE:
        if not ZERO.startswith(view[pos : pos + ZERO_SIZE]):
            return False
        pos += ZERO_SIZE
    return ZERO.startswith(view[pos:])


def zero_chunks(length: int) -> Iterator[memoryview]:
    """Yield views of the shared zero buffer that add up to ``length`` bytes."""
    while length > 0:
        n = min(length, ZERO_SIZE)
        yield ZERO_VIEW[:n]
        length -= n


def split_zeros(extent: Extent, block: int = ZERO_BLOCK) -> Iterator[Extent]:
    """Split a data extent into data and hole extents at ``block`` granularity.

    Blocks are aligned to the image (``offset % block``) so that the holes found
    line up with filesystem blocks.  Adjacent runs of the same kind are merged,
    so an extent without zero blocks comes back as itself.
    """
    data = extent.data
    if data is None:
        yield extent
        return
    if is_zero(data):
        yield Extent.hole(extent.offset, extent.length)
        return
    view = memoryview(data)
    if not _may_hold_zero_block(view, extent.offset, block):
        yield extent
        return
    n = extent.length
    run_start = 0
    run_zero: bool | None = None
    pos = 0
    first = block - (extent.offset % block)
    while pos < n:
        step = first if pos == 0 else block
        end = min(pos + step, n)
        zero = ZERO.startswith(view[pos:end])
        if run_zero is None:
            run_zero = zero
        elif zero != run_zero:
            yield _piece(extent.offset, view, run_start, pos, run_zero)
            run_start, run_zero = pos, zero
        pos = end
    if run_zero is not None:
        yield _piece(extent.offset, view, run_start, n, run_zero)


def _may_hold_zero_block(view: memoryview, offset: int, block: int) -> bool:
    """False when no ``block``-aligned block of ``view`` can be all zeros.

    Dense data is the common case, and looking at every block from Python costs
    more than the write it saves: instead, the first 8 bytes of every whole block
    are gathered in one strided C-level pass, and only if one of them is zero (or
    a partial block at either end is) does the caller scan block by block.
    """
    n = len(view)
    head = (-offset) % block
    whole = (n - head) // block * block if n > head else 0
    tail = head + whole
    if head and ZERO.startswith(view[: min(head, n)]):
        return True
    if tail < n and ZERO.startswith(view[tail:]):
        return True
    if not whole:
        return False
    if block % 8 or view.format != "B" or not view.c_contiguous:
        return True  # cannot sample cheaply: let the caller scan
    firsts = view[head:tail].cast("Q")[:: block // 8]
    return 0 in firsts.tolist()


def _piece(base: int, view: memoryview, start: int, end: int, hole: bool) -> Extent:
    if hole:
        return Extent.hole(base + start, end - start)
    return Extent(base + start, end - start, view[start:end])


def rechunk(extents: Iterator[Extent], max_len: int) -> Iterator[Extent]:
    """Cut data extents longer than ``max_len`` into pieces; holes pass as they are."""
    for ext in extents:
        if ext.data is None or ext.length <= max_len:
            yield ext
            continue
        view = memoryview(ext.data)
        for pos in range(0, ext.length, max_len):
            end = min(pos + max_len, ext.length)
            yield Extent(ext.offset + pos, end - pos, view[pos:end])

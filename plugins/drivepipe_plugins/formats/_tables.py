"""What the table-driven image formats share (qcow2 clusters, vmdk grains).

Their tables map the image to *pieces*: holes, data at a host offset, compressed
data.  :func:`coalesce` turns the pieces of a range into work for
:func:`~drivepipe_plugins.formats._parallel.in_order`: merged holes, reads of
host-contiguous data, and batches of compressed pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from array import array

#: the kinds of the pieces a table-driven image maps (qcow2 clusters, vmdk grains)
HOLE, DATA, COMPRESSED = 0, 1, 2
#: ``(kind, image offset, length, host offset, extra)``: one piece of such an image, where
#: ``extra`` is the format's (qcow2: the compressed size; vmdk: the grain's offset)
Piece: TypeAlias = tuple[int, int, int, int, int]
#: a table of such an image in memory: an array, not a tuple of ints (a 32 MiB L1 table
#: as a tuple would take ~160 MiB)
Table: TypeAlias = "array[int]"


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

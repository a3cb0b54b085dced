"""What the random-access image formats (vhd, vdi, vhdx, vmdk) have in common.

:class:`RangedImage` is a :class:`~drivepipe.Source` that is also a
:class:`~drivepipe._stage.RandomAccess`: ``extents()`` is the whole range, and
``read_range`` clamps a range to the image before the format walks it.
:class:`MagicFormat` detects a format by the bytes it starts with.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

from drivepipe._extent import Extent
from drivepipe._stage import ByteSource, Source


class RangedImage(Source):
    """A raw disk read through a format's tables, any range of it on request."""

    def extents(self) -> Iterator[Extent]:
        return self.read_range(0, self.size)

    def read_range(self, offset: int, length: int) -> Iterator[Extent]:
        """The raw disk's extents covering ``[offset, offset+length)``, in order."""
        end = min(offset + length, self.size)
        if offset >= end:
            return iter(())
        return self.extents_between(offset, end)

    @abstractmethod
    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        """The extents of ``[offset, end)``, a non-empty range within the disk."""


class MagicFormat:
    """Mix-in of an :class:`~drivepipe.ImageFormat` recognised by its first bytes."""

    magic: ClassVar[bytes]

    def detect(self, head: bytes, source: ByteSource) -> bool:
        return head.startswith(self.magic)

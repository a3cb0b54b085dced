"""Discard sink: consumes a stream and keeps nothing; returns the byte count.

Used by ``checksum`` (the hash stage is the point) and by ``bench`` to time
the stages upstream of a real sink.
"""

from __future__ import annotations

from collections.abc import Iterator

from drivepipe._extent import Extent
from drivepipe._stage import Sink, TargetOptions


class DiscardSink(Sink[int]):
    name = "discard"

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> DiscardSink:
        """``discard:`` (anything after the colon is ignored)."""
        return cls()

    def consume(self, extents: Iterator[Extent], size: int) -> int:
        total = 0
        for ext in extents:
            total += ext.length
        return total

"""xxh3-128 checksum stage: extents in, the same extents out, a digest on the side.

The digest equals ``xxh128sum`` of the raw bytes.  Holes are hashed from the
one shared zero buffer, never read from disk and never allocated.
"""

from __future__ import annotations

from collections.abc import Iterator

import xxhash

from drivepipe._extent import Extent, zero_chunks
from drivepipe._stage import Stage


class Xxh3Stage(Stage):
    name = "xxh3"

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        update = self._hash.update
        for ext in upstream:
            if ext.data is None:
                for zeros in zero_chunks(ext.length):
                    update(zeros)
            else:
                update(ext.data)
            yield ext

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

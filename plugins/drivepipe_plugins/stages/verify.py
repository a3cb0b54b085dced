"""Verify stage ("verify"): extents in, the same extents out, checked at the end of the stream.

In: the stream of a download (kept prefix and fetched bytes alike, in order) and
what it should be, an :class:`~drivepipe._verify.Expectation` (the xxh3-128 of
the first ``length`` bytes, every byte after them zero) or None (then the digest
is only computed).  Holes are hashed from the shared zero buffer.  Out: the
extents unchanged; after the last one, :attr:`VerifyStage.digest` holds the
whole stream's xxh3-128 (what ``xxh128sum`` prints) and the prefix digest.

Refused: a stream whose digest does not match, or whose bytes after the
expected length are not all zero: :class:`~drivepipe.VerifyError` is raised
*after* the last extent passed and *before* the end of the stream reaches the
sink, so the sink never publishes bad bytes.  Nothing is read back from disk.
"""

from __future__ import annotations

from collections.abc import Iterator

from drivepipe._errors import SizeMismatch, VerifyError
from drivepipe._extent import Extent
from drivepipe._stage import Stage
from drivepipe._verify import Expectation, FileDigest, FileDigester


class VerifyStage(Stage):
    """Hashes the stream as it flows; raises :class:`VerifyError` at its end on a mismatch."""

    name = "verify"

    def __init__(self, size: int, expected: Expectation | None = None) -> None:
        self.size = size
        self.expected = expected
        self.digest: FileDigest | None = None
        self._digester = FileDigester(size, expected.length if expected else None)

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        digester = self._digester
        for ext in upstream:
            if ext.offset != digester.pos:
                raise SizeMismatch(f"verify: stream jumped from offset {digester.pos} to "
                                   f"{ext.offset}")
            digester.feed(ext)
            yield ext
        if digester.pos != self.size:
            return  # short: the runner's size check says so in its own words
        self.digest = digester.result()
        self._check(self.digest)

    def _check(self, got: FileDigest) -> None:
        expected = self.expected
        if expected is None:
            return
        if got.prefix != expected.digest:
            raise VerifyError(f"xxh128 {got.prefix} of the first {got.prefix_length} bytes does "
                              f"not match {expected.digest} from {expected.origin}")
        if got.nonzero_tail_at is not None:
            raise VerifyError(f"byte {got.nonzero_tail_at} is not zero, but the drive holds "
                              f"only {expected.length} bytes of data ({expected.origin})")

"""Proof that a downloaded ``.part`` file is the right drive.

What goes in: the path of a finished (or partly kept) ``.part`` file, its
journal, and what the bytes should be: an :class:`Expectation` from
``--expect xxh128:HEX`` or from the drive's meta (``drivepipe_xxh128`` over the
first ``drivepipe_size`` bytes, every byte after that zero).  What comes out:
the whole file's xxh3-128, the prefix digest the expectation names, and where
the tail stops being zero.  Files are read with :class:`SparseFileReader`, so
holes are hashed from the shared zero buffer and never read from disk.

:func:`check_kept_blocks` re-hashes the blocks a journal says are done and
returns the ones whose bytes on disk no longer match (a resumed download
refetches them; a failed verification names them).
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import xxhash

from drivepipe._errors import UsageError
from drivepipe._extent import Extent, is_zero, zero_chunks
from drivepipe.resume.download_journal import DownloadJournal
from drivepipe_plugins.sources.file import SparseFileReader

#: ``xxh128:HEX`` (also ``xxh3-128:``/``xxh3_128:``), or the bare digest ``xxh128sum`` prints
_EXPECT_RE = re.compile(r"^(?:(?:xxh128|xxh3-128|xxh3_128):)?([0-9a-fA-F]{32})$")

#: ``(bytes_done, bytes_total)`` while hashing
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Expectation:
    """The xxh3-128 of the first ``length`` bytes (None: the whole file); the rest zeros."""

    digest: str
    length: int | None = None
    origin: str = "--expect"


def parse_expect(text: str) -> Expectation:
    m = _EXPECT_RE.match(text.strip())
    if not m:
        raise UsageError(f"--expect must be 32 hex digits (as xxh128sum prints them), optionally "
                         f"prefixed xxh128:, got {text!r}")
    return Expectation(m.group(1).lower())


def expectation_from_meta(meta: dict[str, object], size: int) -> Expectation | None:
    """The digest our upload stored in a drive's meta, if it is there and makes sense."""
    digest, length = meta.get("drivepipe_xxh128"), meta.get("drivepipe_size")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", digest):
        return None
    try:
        prefix = int(str(length)) if length is not None else size
    except ValueError:
        return None
    if not 0 <= prefix <= size:
        return None
    return Expectation(digest.lower(), prefix, "the drive's meta")


@dataclass(frozen=True)
class FileDigest:
    """Digests of one pass over a file."""

    whole: str
    #: digest of the first ``prefix`` bytes
    prefix: str
    prefix_length: int
    #: offset of the first non-zero byte after the prefix, None if all zero
    nonzero_tail_at: int | None


def _hash_extent(h: xxhash.xxh3_128, ext: Extent) -> None:
    if ext.data is None:
        for zeros in zero_chunks(ext.length):
            h.update(zeros)
    else:
        h.update(ext.data)


def _split_at(extents: Iterable[Extent], cut: int) -> Iterator[tuple[bool, Extent]]:
    """``(before_cut, piece)`` for each extent, split where it straddles ``cut``."""
    for ext in extents:
        if ext.offset < cut < ext.end:
            n = cut - ext.offset
            data = memoryview(ext.data) if ext.data is not None else None
            yield True, Extent(ext.offset, n, None if data is None else data[:n])
            yield False, Extent(cut, ext.length - n, None if data is None else data[n:])
        else:
            yield ext.offset < cut, ext


class FileDigester:
    """Digests of a file fed as contiguous extents from offset 0 (see :class:`FileDigest`)."""

    def __init__(self, size: int, prefix: int | None = None) -> None:
        self.size = size
        self.cut = size if prefix is None else min(prefix, size)
        self.pos = 0
        self._hash = xxhash.xxh3_128()
        self._prefix = self._hash.hexdigest() if self.cut == 0 else ""
        self._nonzero: int | None = None

    def feed(self, ext: Extent) -> None:
        if ext.offset != self.pos:
            raise ValueError(f"extent at {ext.offset}, expected {self.pos}")
        for before, piece in _split_at((ext,), self.cut):
            _hash_extent(self._hash, piece)
            if not before and self._nonzero is None and piece.data is not None \
                    and not is_zero(piece.data):
                self._nonzero = _first_nonzero(piece)
            if before and piece.end == self.cut:
                self._prefix = self._hash.hexdigest()
        self.pos = ext.end

    def result(self) -> FileDigest:
        if self.pos != self.size:
            raise ValueError(f"fed {self.pos} of {self.size} bytes")
        return FileDigest(self._hash.hexdigest(), self._prefix, self.cut, self._nonzero)


def digest_file(path: str, prefix: int | None = None, progress: Progress | None = None
                ) -> FileDigest:
    """xxh3-128 of the whole file and of its first ``prefix`` bytes; zero check after it."""
    reader = SparseFileReader(path)
    try:
        digester = FileDigester(reader.size, prefix)
        for ext in reader.extents():
            digester.feed(ext)
            if progress is not None:
                progress(ext.end, reader.size)
    finally:
        reader.close()
    return digester.result()


class PrefixHasher:
    """Hashes a ``.part`` file while it downloads, following the finished prefix.

    A thread waits for the journal's next block in file order, reads it back
    from the page cache (holes unread) and feeds a :class:`FileDigester`, so the
    whole-file digest is ready moments after the last block lands instead of
    costing a second pass.  Blocks must not change once journaled (true within
    one run); a failure here only means :func:`digest_file` does the pass later.
    """

    def __init__(self, path: str, journal: DownloadJournal, digester: FileDigester,
                 progress: Progress | None = None) -> None:
        self.path = path
        self.journal = journal
        self.digester = digester
        self.progress = progress
        # a digester already fed a kept prefix continues after it
        self.next_block = journal.block_count if digester.pos >= digester.size \
            else digester.pos // journal.block_size
        self.error: BaseException | None = None
        self._stopped = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="drivepipe-hash")

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Tell the thread that a block was journaled."""
        with self._wake:
            self._wake.notify()

    def stop(self) -> None:
        self._stopped = True
        self.wake()
        self._thread.join()

    def finish(self) -> FileDigest | None:
        """The digests once every block is hashed; None if hashing failed."""
        self.wake()
        self._thread.join()
        if self.error is not None or self.digester.pos != self.digester.size:
            return None
        return self.digester.result()

    def _run(self) -> None:
        try:
            reader = SparseFileReader(self.path, drop_cache_above=1 << 62)
        except BaseException as exc:  # reported through finish(): a pass follows instead
            self.error = exc
            return
        try:
            while self.next_block < self.journal.block_count and self._wait_for_next():
                offset, length = self.journal.block_span(self.next_block)
                for ext in reader.read_range(offset, length):
                    self.digester.feed(ext)
                self.next_block += 1
                if self.progress is not None:
                    self.progress(offset + length, self.digester.size)
        except BaseException as exc:  # reported through finish(): a pass follows instead
            self.error = exc
        finally:
            reader.close()

    def _wait_for_next(self) -> bool:
        with self._wake:
            while not self._stopped and self.next_block not in self.journal.blocks:
                self._wake.wait(0.5)
        return not self._stopped


def _first_nonzero(ext: Extent) -> int:
    data = bytes(ext.data or b"")
    stripped = data.lstrip(b"\0")
    return ext.offset + len(data) - len(stripped)


def block_digest_on_disk(reader: SparseFileReader, offset: int, length: int,
                         keep: list[Extent] | None = None) -> str:
    """The journal digest (xxh3-64) of ``[offset, offset+length)`` as it is on disk.

    With ``keep``, the block's extents are also appended to it (one block in memory).
    """
    h = xxhash.xxh3_64()
    for ext in reader.read_range(offset, length):
        if ext.data is None:
            for zeros in zero_chunks(ext.length):
                h.update(zeros)
        else:
            h.update(ext.data)
        if keep is not None:
            keep.append(ext)
    return h.hexdigest()


def check_kept_blocks(path: str, journal: DownloadJournal, progress: Progress | None = None,
                      digester: FileDigester | None = None) -> list[int]:
    """Indexes of journal blocks whose bytes on disk no longer match their digest.

    A ``digester`` is fed the good blocks that continue its prefix, so a resumed
    download does not read its kept prefix a second time to hash the whole file.
    """
    bad: list[int] = []
    reader = SparseFileReader(path)
    try:
        if reader.size != journal.identity.size:
            return sorted(journal.blocks)
        total, done = journal.done_bytes(), 0
        for index in sorted(journal.blocks):
            offset, length = journal.block_span(index)
            extents: list[Extent] | None = \
                [] if digester is not None and digester.pos == offset else None
            if block_digest_on_disk(reader, offset, length, extents) != journal.blocks[index]:
                bad.append(index)
            elif digester is not None and extents is not None:
                for ext in extents:
                    digester.feed(ext)
            done += length
            if progress is not None:
                progress(done, total)
    finally:
        reader.close()
    return bad


def blocks_with_data(path: str, journal: DownloadJournal, indexes: Iterable[int]) -> set[int]:
    """Which of ``indexes`` overlap data on disk (cheap: SEEK_DATA/SEEK_HOLE only)."""
    reader = SparseFileReader(path)
    try:
        ranges = list(reader.ranges())
    finally:
        reader.close()
    ends = [end for _, end in ranges]
    found = set()
    for index in indexes:
        start, length = journal.block_span(index)
        i = bisect.bisect_right(ends, start)  # first range ending after the block starts
        if i < len(ranges) and ranges[i][0] < start + length:
            found.add(index)
    return found


def describe_blocks(journal: DownloadJournal, indexes: list[int], limit: int = 8) -> str:
    """``bytes A-B, C-D, ...`` for block indexes, adjacent blocks merged."""
    runs: list[list[int]] = []
    for i in sorted(indexes):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    parts = []
    for first, last in runs[:limit]:
        start = journal.block_span(first)[0]
        end_off, end_len = journal.block_span(last - 1)
        parts.append(f"{start}-{end_off + end_len - 1}")
    more = f" and {len(runs) - limit} more" if len(runs) > limit else ""
    return "bytes " + ", ".join(parts) + more

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

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import xxhash

from drivepipe._errors import UsageError
from drivepipe._extent import Extent, is_zero, zero_chunks
from drivepipe_plugins.download_journal import DownloadJournal
from drivepipe_plugins.sparse_read import SparseFileReader

_EXPECT_RE = re.compile(r"^(?:xxh128|xxh3-128|xxh3_128):([0-9a-fA-F]{32})$")

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
        raise UsageError(f"--expect must look like xxh128:<32 hex digits>, got {text!r}")
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


def digest_file(path: str, prefix: int | None = None, progress: Progress | None = None
                ) -> FileDigest:
    """xxh3-128 of the whole file and of its first ``prefix`` bytes; zero check after it."""
    reader = SparseFileReader(path)
    try:
        size = reader.size
        cut = size if prefix is None else min(prefix, size)
        h = xxhash.xxh3_128()
        prefix_digest = h.hexdigest() if cut == 0 else ""
        nonzero: int | None = None
        for before, ext in _split_at(reader.extents(), cut):
            _hash_extent(h, ext)
            if not before and nonzero is None and ext.data is not None and not is_zero(ext.data):
                nonzero = _first_nonzero(ext)
            if before and ext.end == cut:
                prefix_digest = h.hexdigest()
            if progress is not None:
                progress(ext.end, size)
    finally:
        reader.close()
    return FileDigest(h.hexdigest(), prefix_digest, cut, nonzero)


def _first_nonzero(ext: Extent) -> int:
    data = bytes(ext.data or b"")
    stripped = data.lstrip(b"\0")
    return ext.offset + len(data) - len(stripped)


def block_digest_on_disk(reader: SparseFileReader, offset: int, length: int) -> str:
    """The journal digest (xxh3-64) of ``[offset, offset+length)`` as it is on disk."""
    h = xxhash.xxh3_64()
    for ext in reader.read_range(offset, length):
        if ext.data is None:
            for zeros in zero_chunks(ext.length):
                h.update(zeros)
        else:
            h.update(ext.data)
    return h.hexdigest()


def check_kept_blocks(path: str, journal: DownloadJournal, progress: Progress | None = None
                      ) -> list[int]:
    """Indexes of journal blocks whose bytes on disk no longer match their digest."""
    bad: list[int] = []
    reader = SparseFileReader(path)
    try:
        if reader.size != journal.identity.size:
            return sorted(journal.blocks)
        total, done = journal.done_bytes(), 0
        for index in sorted(journal.blocks):
            offset, length = journal.block_span(index)
            if block_digest_on_disk(reader, offset, length) != journal.blocks[index]:
                bad.append(index)
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
    found = set()
    for index in indexes:
        start, length = journal.block_span(index)
        if any(lo < start + length and start < hi for lo, hi in ranges):
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

"""What a downloaded drive should be, and the digests that prove it.

An :class:`Expectation` comes from an expected digest (``xxh128:HEX``, as
``xxh128sum`` prints it) or from the drive's meta (``drivepipe_xxh128`` over the
first ``drivepipe_size`` bytes, every byte after that zero).  A
:class:`FileDigester` is fed a stream's extents in order (holes hashed from the
shared zero buffer) and gives the whole stream's xxh3-128, the prefix digest the
expectation names, and where the tail stops being zero: the download's verify
stage hashes the bytes as they flow, so nothing is read back from the file.
:func:`digest_file` is the same over a file on disk (through the registry's
``file`` source, holes never read), for outputs that already exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import xxhash

from drivepipe._errors import UsageError
from drivepipe._extent import Buffer, Extent, is_zero, zero_chunks
from drivepipe._registry import open_file

#: ``xxh128:HEX`` (also ``xxh3-128:``/``xxh3_128:``), or the bare digest ``xxh128sum`` prints
_EXPECT_RE = re.compile(r"^(?:(?:xxh128|xxh3-128|xxh3_128):)?([0-9a-fA-F]{32})$")

#: ``(bytes_done, bytes_total)`` while hashing
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Expectation:
    """The xxh3-128 of the first ``length`` bytes (None: the whole file); the rest zeros."""

    digest: str
    length: int | None = None
    origin: str = "the expected digest"


def parse_expect(text: str) -> Expectation:
    m = _EXPECT_RE.match(text.strip())
    if not m:
        raise UsageError(f"an expected digest must be 32 hex digits (as xxh128sum prints "
                         f"them), optionally prefixed xxh128:, got {text!r}")
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


class Hasher(Protocol):
    def update(self, data: Buffer, /) -> None: ...


def hash_extent(h: Hasher, ext: Extent) -> None:
    """Feed ``ext``'s bytes to ``h`` (any xxhash object); a hole from the shared zero buffer."""
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
            hash_extent(self._hash, piece)
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
    reader = open_file(path)
    try:
        digester = FileDigester(reader.size, prefix)
        for ext in reader.extents():
            digester.feed(ext)
            if progress is not None:
                progress(ext.end, reader.size)
    finally:
        reader.close()
    return digester.result()


def _first_nonzero(ext: Extent) -> int:
    data = bytes(ext.data or b"")
    stripped = data.lstrip(b"\0")
    return ext.offset + len(data) - len(stripped)

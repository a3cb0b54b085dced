"""Shared machinery for the stream decompressor formats (gzip, xz, zstd, bzip2).

In: the compressed file's bytes as extents (from :class:`SparseFileReader`).
Out: the raw image as extents with offsets in the raw image, each at most one
decompressor call's output (bounded by ``max_length``, so a decompression bomb
costs time, never memory), all-zero blocks turned into holes.

A *decoder* is a function ``(chunks, out_size) -> iterator of output pieces``.
It raises :class:`BadStream` for corrupt input and :class:`Truncated` when the
input ends mid-stream; :class:`DecodeStage` turns those into one clear
:class:`CorruptImage` line naming the file and the compressed offset.  The same
decoder runs the *counting pass* (:func:`count_output`) that finds the exact
raw size of formats that do not record it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from drivepipe._errors import CorruptImage, ImageError
from drivepipe._extent import ZERO_VIEW, Buffer, Extent, split_zeros
from drivepipe._stage import ImageInput, OpenOptions, PhaseCallback, Stage

from .sparse_read import SparseFileReader

T = TypeVar("T")


def read_structure(path: str, walk: Callable[[int, int], T]) -> T:
    """Open ``path`` and return ``walk(fd, file_size)``; OS errors become ImageError.

    For the formats whose exact size comes from walking their own headers or
    indexes (xz, zstd) before any byte is decoded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        return walk(fd, os.fstat(fd).st_size)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)

#: input handed to one decompressor call; small so that the copy a decompressor
#: makes of the bytes after a stream's end (``unused_data``) stays cheap even
#: when members are tiny (BGZF: 64 KiB each)
FEED_SLICE = 128 << 10
#: bounds on one decompressor call's output (= one extent).  Output that
#: stays in the CPU cache decodes faster: measured on a 256 MiB gzip, 256 KiB
#: pieces 1280 MB/s per CPU, 1 MiB 1030, 4 MiB 710, 16 MiB 560.
MIN_OUT = 64 << 10
MAX_OUT = 1 << 20
#: the counting pass keeps nothing, so it uses the fastest piece size
COUNT_OUT = 256 << 10
#: a decompressor that makes no progress this many calls in a row is stuck
STALL_LIMIT = 64


class BadStream(Exception):
    """The compressed bytes are not a valid stream (the reason is the message)."""


class Truncated(BadStream):
    """The input ended in the middle of a stream."""


Decoder = Callable[[Iterator[memoryview], int], Iterator[bytes]]


class StreamDecompressor(Protocol):
    """What zlib/isal, lzma and bz2 decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: Buffer, max_length: int = -1) -> bytes: ...


def out_size(options: OpenOptions) -> int:
    """Bytes per decompressor call: the read size, within the bounds above."""
    return max(MIN_OUT, min(options.read_size, MAX_OUT))


class CompressedFeed:
    """The compressed bytes of an extent stream as memoryviews; counts the offset.

    Holes in the compressed file (unusual, but a sparse file may have them)
    are fed as zero bytes from the shared zero buffer.
    """

    def __init__(self, upstream: Iterator[Extent]) -> None:
        self._upstream = upstream
        #: compressed bytes handed out so far
        self.offset = 0

    def __iter__(self) -> Iterator[memoryview]:
        for ext in self._upstream:
            if ext.data is not None:
                self.offset += ext.length
                yield memoryview(ext.data)
                continue
            left = ext.length
            while left > 0:
                n = min(left, len(ZERO_VIEW))
                self.offset += n
                left -= n
                yield ZERO_VIEW[:n]


def _zero_prefix(view: memoryview) -> int:
    """How many zero bytes ``view`` starts with."""
    pos = 0
    while pos < len(view):
        window = bytes(view[pos : pos + 4096])
        rest = window.lstrip(b"\0")
        if rest:
            return pos + len(window) - len(rest)
        pos += len(window)
    return pos


def decode_streams(
    chunks: Iterator[memoryview],
    out: int,
    new_stream: Callable[[], StreamDecompressor],
    errors: tuple[type[Exception], ...],
    padding_multiple: int = 1,
) -> Iterator[bytes]:
    """Decode concatenated streams (gzip members, xz streams, bzip2 streams).

    Zero bytes between and after streams are skipped as padding; their count
    must be a multiple of ``padding_multiple`` (xz stream padding: 4).
    """
    state = _MultiStream(new_stream, out, padding_multiple)
    try:
        for chunk in chunks:
            yield from state.feed(chunk)
    except errors as exc:
        raise BadStream(str(exc) or type(exc).__name__) from exc
    state.finish()


class _MultiStream:
    def __init__(
        self, new_stream: Callable[[], StreamDecompressor], out: int, padding_multiple: int
    ) -> None:
        self.new_stream = new_stream
        self.out = out
        self.padding_multiple = padding_multiple
        self.current: StreamDecompressor | None = None
        self.padding = 0
        self.streams = 0

    def feed(self, chunk: memoryview) -> Iterator[bytes]:
        view = chunk
        while view:
            if self.current is None:
                view = self._skip_padding(view)
                if not view:
                    return
                self._check_padding()
                self.current = self.new_stream()
            piece = view[:FEED_SLICE]
            yield from self._drain(self.current, piece)
            if self.current.eof:
                view = view[len(piece) - len(self.current.unused_data) :]
                self.current = None
                self.streams += 1
            else:
                view = view[len(piece) :]

    def _drain(self, dec: StreamDecompressor, piece: memoryview) -> Iterator[bytes]:
        data = dec.decompress(piece, self.out)
        stalls = 0
        while True:
            if data:
                stalls = 0
                yield data
            elif stalls > STALL_LIMIT:
                raise BadStream("decompressor made no progress")
            else:
                stalls += 1
            if dec.eof or dec.needs_input:
                return
            data = dec.decompress(b"", self.out)

    def _skip_padding(self, view: memoryview) -> memoryview:
        zeros = _zero_prefix(view)
        self.padding += zeros
        return view[zeros:]

    def _check_padding(self) -> None:
        if self.padding % self.padding_multiple:
            raise BadStream(
                f"stream padding of {self.padding} bytes is not a multiple of "
                f"{self.padding_multiple}"
            )
        self.padding = 0

    def finish(self) -> None:
        if self.current is not None:
            raise Truncated("the input ends in the middle of a stream")
        if self.streams == 0:
            raise BadStream("no compressed stream found")
        self._check_padding()


class DecodeStage(Stage):
    """Compressed bytes in, raw image extents out, exactly ``size`` bytes."""

    def __init__(
        self, name: str, path: str, fmt: str, decoder: Decoder, size: int, out: int
    ) -> None:
        self.name = name
        self.path = path
        self.fmt = fmt
        self.decoder = decoder
        self.size = size
        self.out = out

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        feed = CompressedFeed(upstream)
        pos = 0
        for piece in _guarded(self.decoder(iter(feed), self.out), feed, self.path, self.fmt):
            n = len(piece)
            if pos + n > self.size:
                raise CorruptImage(
                    f"{self.path}: {self.fmt} stream decodes to more than the "
                    f"{self.size} bytes counted before streaming"
                )
            yield from split_zeros(Extent(pos, n, piece))
            pos += n
        if pos != self.size:
            raise CorruptImage(
                f"{self.path}: {self.fmt} stream decoded to {pos} bytes, "
                f"expected {self.size}"
            )


def _guarded(
    pieces: Iterator[bytes], feed: CompressedFeed, path: str, fmt: str
) -> Iterator[bytes]:
    """Re-raise decoder failures as one CorruptImage line with the offset."""
    try:
        yield from pieces
    except Truncated as exc:
        raise CorruptImage(
            f"{path}: truncated {fmt} stream at compressed offset {feed.offset}"
        ) from exc
    except BadStream as exc:
        raise CorruptImage(
            f"{path}: corrupt {fmt} stream near compressed offset {feed.offset}: {exc}"
        ) from exc


def file_chunks(
    path: str, chunk: int, on_phase: PhaseCallback | None, phase: str
) -> Iterator[Extent]:
    """The file's bytes in ``chunk``-sized extents, reporting progress as ``phase``."""
    reader = SparseFileReader(path, read_size=chunk)
    try:
        total = reader.size
        for ext in reader.extents():
            yield ext
            if on_phase is not None:
                on_phase(phase, ext.end, total)
    finally:
        reader.close()


def count_output(path: str, fmt: str, decoder: Decoder, options: OpenOptions) -> int:
    """The counting pass: decode the whole file and return the raw size."""
    feed = CompressedFeed(file_chunks(path, options.read_size, options.on_phase, "counting"))
    total = 0
    for piece in _guarded(decoder(iter(feed), COUNT_OUT), feed, path, fmt):
        total += len(piece)
    return total


def open_compressed(
    path: str,
    fmt: str,
    stage_name: str,
    decoder: Decoder,
    size: int,
    options: OpenOptions,
    details: dict[str, object],
) -> ImageInput:
    """The ImageInput of a compressed file: a file reader plus one decode stage."""
    reader = SparseFileReader(
        path, read_size=options.read_size, drop_cache_above=options.drop_cache_above
    )
    stage = DecodeStage(stage_name, path, fmt, decoder, size, out_size(options))
    return ImageInput(
        path=path,
        format=fmt,
        size=size,
        source=reader,
        stages=[stage],
        file_size=reader.size,
        details=details,
    )


def pread_exact(fd: int, length: int, offset: int, path: str, what: str) -> bytes:
    """Read exactly ``length`` bytes or fail with CorruptImage naming ``what``."""
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise ImageError(f"{path}: read error at {offset}: {exc.strerror}") from exc
    if len(data) != length:
        raise CorruptImage(f"{path}: truncated file: {what} at offset {offset} is past the end")
    return data

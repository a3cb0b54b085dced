"""Shared machinery for the stream decompressor formats (gzip, xz, zstd, bzip2).

In: the compressed bytes as extents (from a :class:`~drivepipe.ByteSource`).
Out: the raw image as extents with offsets in the raw image, each at most one
decompressor call's output (bounded by ``max_length``, so a decompression bomb
costs time, never memory), all-zero blocks turned into holes.

A *decoder* is a function ``(chunks, out_size) -> iterator of output pieces``.
It raises :class:`BadStream` for corrupt input and :class:`Truncated` when the
input ends mid-stream; :class:`DecodeStage` turns those into one clear
:class:`CorruptImage` line naming the file and the compressed offset.  The same
decoder runs the *counting pass* (:func:`count_output`) that finds the exact
raw size of formats that do not record it.

:class:`StreamLayer` is the :class:`~drivepipe.DecodedLayer` of a compressor
read front to back; :class:`IndexedSource` the random-access view of one whose
blocks (xz) or frames (zstd) decode independently.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from drivepipe._errors import CorruptImage
from drivepipe._extent import ZERO_VIEW, Buffer, Extent, split_zeros
from drivepipe._stage import ByteSource, DecodedLayer, OpenOptions, Source, Stage

if TYPE_CHECKING:
    from concurrent.futures import Future

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


@dataclass(eq=False)
class DecodeStage(Stage):
    """Compressed bytes in, raw image extents out, exactly ``size`` bytes."""

    name: str = field()  # no default: Stage's class attribute is not one
    path: str
    fmt: str
    decoder: Decoder
    #: None: as many bytes as the stream holds (a spool learns the size so)
    size: int | None
    #: bytes per decompressor call (:func:`out_size`)
    out: int

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        feed = CompressedFeed(upstream)
        pos = 0
        for piece in _guarded(self.decoder(iter(feed), self.out), feed, self.path, self.fmt):
            n = len(piece)
            if self.size is not None and pos + n > self.size:
                raise CorruptImage(
                    f"{self.path}: {self.fmt} stream decodes to more than the "
                    f"{self.size} bytes counted before streaming"
                )
            yield from split_zeros(Extent(pos, n, piece))
            pos += n
        if self.size is not None and pos != self.size:
            raise CorruptImage(
                f"{self.path}: {self.fmt} stream decoded to {pos} bytes, "
                f"expected {self.size}"
            )


def _guarded(
    pieces: Iterator[bytes], feed: CompressedFeed, path: str, fmt: str
) -> Generator[bytes, None, None]:
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


def source_chunks(source: ByteSource, on_phase: Callable[[str, int, int], None] | None,
                  phase: str) -> Iterator[Extent]:
    """The source's extents, reporting progress as ``phase``."""
    total = source.size
    for ext in source.extents():
        yield ext
        if on_phase is not None:
            on_phase(phase, ext.end, total)


def count_output(source: ByteSource, fmt: str, decoder: Decoder, options: OpenOptions) -> int:
    """The counting pass: decode the whole input and return the raw size."""
    feed = CompressedFeed(source_chunks(source, options.on_phase, "counting"))
    total = 0
    for piece in _guarded(decoder(iter(feed), COUNT_OUT), feed, source.label, fmt):
        total += len(piece)
    return total


def decoded_head(source: ByteSource, fmt: str, decoder: Decoder, length: int) -> bytes:
    """The first ``length`` decoded bytes (decodes only as far as needed)."""
    feed = CompressedFeed(source.extents())
    out = bytearray()
    pieces = _guarded(decoder(iter(feed), MIN_OUT), feed, source.label, fmt)
    try:
        for piece in pieces:
            out += piece
            if len(out) >= length:
                break
    finally:
        pieces.close()
    return bytes(out[:length])


@dataclass(eq=False)
class StreamLayer(DecodedLayer):
    """A compressor read front to back: a decode stage after its byte source."""

    source: ByteSource
    format: str = field()  # no default: DecodedLayer's class attribute is not one
    #: the decode stage's name (gunzip, unxz, ...)
    stage_name: str
    decoder: Decoder
    details: dict[str, object]
    known_size: int | None = None

    def head(self, length: int = 4096) -> bytes:
        return decoded_head(self.source, self.format, self.decoder, length)

    def exact_size(self) -> int | None:
        return self.known_size

    def counted_size(self, options: OpenOptions) -> int:
        self.known_size = count_output(self.source, self.format, self.decoder, options)
        self.details["size_from"] = "counting pass"
        return self.known_size

    def stream(self, size: int | None, options: OpenOptions) -> tuple[Source, list[Stage]]:
        stage = DecodeStage(
            self.stage_name, self.source.label, self.format, self.decoder, size,
            out_size(options),
        )
        return self.source, [stage]


#: a block or frame decoded for random reads is at most this big (else: spool)
INDEXED_MAX_BLOCK = 32 << 20
#: decoded blocks kept for random reads, besides the ones being decoded: the one
#: being read and the one before (a read may straddle the boundary)
_INDEXED_CACHE = 2


class IndexedSource(ByteSource):
    """Random reads of a decoded layer whose blocks decode independently.

    ``blocks`` are ``(raw_offset, raw_size)`` in order, covering ``[0, size)``;
    ``decode(i)`` returns block ``i``'s exact bytes (raising CorruptImage).  A
    read decodes the blocks it touches, keeps the last two (an inner qcow2 reads
    its tables and then mostly in order) and decodes the next block ahead in a
    worker thread (xz and zstd release the GIL), so two blocks decode at once
    while the reader copies out of a third.  Memory: about four blocks of at most
    :data:`INDEXED_MAX_BLOCK` bytes (measured: 2 GiB of qcow2 in xz -T2, 24 MiB
    blocks: see benchmarks/RESULTS.md).
    """

    random = True

    def __init__(
        self,
        label: str,
        name: str,
        blocks: list[tuple[int, int]],
        decode: Callable[[int], Buffer],
        threads: int,
    ) -> None:
        self.label = label
        self.name = name
        self._starts = [b[0] for b in blocks]
        self._sizes = [b[1] for b in blocks]
        self.size = blocks[-1][0] + blocks[-1][1] if blocks else 0
        self._decode = decode
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Buffer] = OrderedDict()
        self._pending: dict[int, Future[Buffer]] = {}
        # one block ahead: with the two kept, at most four blocks are alive at once
        self._ahead = 1
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - see _parallel

        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=name)

    def _block(self, index: int) -> Buffer:
        future: Future[Buffer] | None = None
        with self._lock:
            data = self._cache.get(index)
            if data is not None:
                self._cache.move_to_end(index)
            else:
                future = self._pending.get(index)
                if future is None:
                    future = self._pending[index] = self._pool.submit(self._decode, index)
            for ahead in range(index + 1, min(index + 1 + self._ahead, len(self._starts))):
                if ahead not in self._cache and ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._decode, ahead)
        if future is None:
            assert data is not None
            return data
        try:
            data = future.result()
        finally:
            with self._lock:
                if self._pending.get(index) is future:
                    del self._pending[index]
        with self._lock:
            self._cache[index] = data
            self._cache.move_to_end(index)
            while len(self._cache) > _INDEXED_CACHE:
                self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        index = bisect.bisect_right(self._starts, offset) - 1
        start = self._starts[index]
        if end <= start + self._sizes[index]:  # within one block: one copy
            return bytes(memoryview(self._block(index))[offset - start : end - start])
        out = bytearray()
        pos = offset
        while pos < end:
            data = self._block(index)
            start = self._starts[index]
            piece = memoryview(data)[pos - start : min(end, start + len(data)) - start]
            out += piece
            pos += len(piece)
            index += 1
        return bytes(out)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._cache.clear()

"""xz: an xz file (one or more streams, stream padding between/after) in, raw out.

Detect: magic ``fd 37 7a 58 5a 00``.  Size: exact and cheap (< 1 ms): walk
back from the end of the file - skip stream padding, read the 12-byte stream
footer, the index it points to, and sum the index records' uncompressed sizes;
repeat for each earlier concatenated stream until offset 0.  Every footer,
index and header CRC32 is checked, so a corrupt or truncated file is refused
before streaming.  Decoding: a file of several blocks (``xz -T`` writes
them) whose blocks are at most 32 MiB is decoded block by block in a small
thread pool (source stage "unxz"); anything else streams through stdlib
``lzma`` one stream at a time (it stops at stream padding by itself),
skipping the padding between streams (stage "unxz" after the file reader).
Refused: bad magic, CRC or index, padding not a multiple of 4.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from drivepipe._errors import CorruptImage
from drivepipe._extent import Buffer, Extent, split_zeros
from drivepipe._stage import (
    ByteSource,
    CompressionFormat,
    DecodedLayer,
    OpenOptions,
    Source,
    Stage,
)
from drivepipe_plugins.formats._codec import (
    INDEXED_MAX_BLOCK,
    IndexedSource,
    StreamDecompressor,
    StreamLayer,
    decode_streams,
    out_size,
)
from drivepipe_plugins.formats._parallel import LazyPool, in_order
from drivepipe_plugins.formats._ranged import MagicFormat

XZ_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
_HEADER = 12
_FOOTER = 12
_PAD_SCAN = 64 << 10
#: an index this large (millions of blocks) is refused rather than read into memory
_MAX_INDEX = 64 << 20
_CHECKS = {0: "none", 1: "crc32", 4: "crc64", 10: "sha256"}
#: blocks decoded in parallel hold up to this much raw data each while in flight
_PARALLEL_MAX_BLOCK = 32 << 20
#: block lists longer than this are not kept (they only serve parallel decoding)
_MAX_BLOCK_LIST = 1 << 18


def _new_stream() -> StreamDecompressor:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)


def decode_xz(chunks: Iterator[memoryview], out: int) -> Iterator[bytes]:
    """Decode every xz stream in turn, skipping stream padding (multiples of 4 zeros)."""
    return decode_streams(
        chunks, out, _new_stream, (lzma.LZMAError, EOFError, ValueError), padding_multiple=4
    )


def _round4(n: int) -> int:
    return (n + 3) & ~3


def _varints(data: bytes, pos: int, count: int) -> tuple[list[int], int]:
    """Decode ``count`` xz multibyte integers from ``data`` at ``pos``."""
    values: list[int] = []
    for _ in range(count):
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 56:
                raise ValueError("bad integer in the index")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        values.append(value)
    return values, pos


@dataclass
class XzBlock:
    """One block: where it lies in the file and in the raw image."""

    offset: int
    #: bytes it occupies in the file (its unpadded size rounded up to 4)
    stored: int
    unpadded: int
    raw_offset: int
    raw_size: int
    #: the 12-byte header of its stream (flags: which check the block carries)
    stream_header: bytes


@dataclass
class XzLayout:
    streams: int = 0
    blocks: int = 0
    size: int = 0
    #: integrity check of each stream, in file order
    checks: list[str] = field(default_factory=list)
    #: every block in file order; None when there are too many to keep
    block_list: list[XzBlock] | None = field(default_factory=list)

    def add_stream_blocks(self, blocks: list[XzBlock]) -> None:
        """Prepend a stream's blocks (the walk goes backwards)."""
        if self.block_list is None or len(self.block_list) + len(blocks) > _MAX_BLOCK_LIST:
            self.block_list = None
            return
        self.block_list[:0] = blocks

    def number_blocks(self) -> None:
        """Give every block its offset in the raw image, once the walk is done."""
        pos = 0
        for block in self.block_list or ():
            block.raw_offset = pos
            pos += block.raw_size


def _blocks(records: list[tuple[int, int]], stream_start: int, header: bytes) -> list[XzBlock]:
    out = []
    pos = stream_start + _HEADER
    for unpadded, raw in records:
        out.append(XzBlock(pos, _round4(unpadded), unpadded, 0, raw, header))
        pos += _round4(unpadded)
    return out


class _IndexWalker:
    def __init__(self, source: ByteSource) -> None:
        self.source, self.path, self.end = source, source.label, source.size

    def bad(self, why: str, offset: int) -> CorruptImage:
        return CorruptImage(f"{self.path}: corrupt xz file: {why} at offset {offset}")

    def read(self, offset: int, length: int, why: str) -> bytes:
        data = self.source.pread(offset, length) if offset >= 0 else b""
        if len(data) != length:
            raise self.bad(f"{why} would start before the file", offset)
        return data

    def skip_padding(self, pos: int) -> int:
        start = pos
        while pos > 0:
            n = min(pos, _PAD_SCAN)
            window = self.read(pos - n, n, "padding")
            kept = window.rstrip(b"\0")
            pos -= n - len(kept)
            if kept:
                break
        if (start - pos) % 4:
            raise self.bad("stream padding is not a multiple of 4 bytes", pos)
        return pos

    def stream(self, end: int, layout: XzLayout) -> int:
        """Account for the stream ending at ``end``; return where it starts."""
        footer = self.read(end - _FOOTER, _FOOTER, "stream footer")
        crc, backward, flags, magic = struct.unpack("<II2s2s", footer)
        if magic != FOOTER_MAGIC or crc != zlib.crc32(footer[4:10]):
            raise self.bad("bad stream footer", end - _FOOTER)
        index_size = (int(backward) + 1) * 4
        index_at = end - _FOOTER - index_size
        if index_size > _MAX_INDEX or index_at < _HEADER:
            raise self.bad("index size out of range", end - _FOOTER)
        records = self.index(index_at, index_size)
        start = index_at - sum(_round4(u) for u, _ in records) - _HEADER
        header = self.read(start, _HEADER, "stream header")
        if header[:6] != XZ_MAGIC or header[6:8] != flags:
            raise self.bad("stream header does not match its footer", start)
        if struct.unpack("<I", header[8:])[0] != zlib.crc32(header[6:8]):
            raise self.bad("bad stream header CRC", start)
        layout.streams += 1
        layout.blocks += len(records)
        layout.size += sum(r for _, r in records)
        layout.add_stream_blocks(_blocks(records, start, header))
        layout.checks.insert(0, _CHECKS.get(flags[1] & 0x0F, str(flags[1] & 0x0F)))
        return start

    def index(self, at: int, size: int) -> list[tuple[int, int]]:
        """Parse the index at ``at``: (unpadded size, raw size) of each block."""
        data = self.read(at, size, "index")
        if data[0] != 0 or struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
            raise self.bad("bad index", at)
        try:
            (count,), pos = _varints(data, 1, 1)
            if count > size:
                raise ValueError("too many records")
            values, pos = _varints(data, pos, 2 * count)
        except ValueError as exc:
            raise self.bad(str(exc), at) from exc
        if _round4(pos) != size - 4 or any(data[pos : size - 4]):
            raise self.bad("index padding", at + pos)
        return list(zip(values[0::2], values[1::2], strict=True))

    def walk(self) -> XzLayout:
        layout = XzLayout()
        pos = self.skip_padding(self.end)
        while pos > 0:
            pos = self.skip_padding(self.stream(pos, layout))
        if layout.streams == 0:
            raise self.bad("no xz stream", 0)
        layout.number_blocks()
        return layout


def xz_layout(source: ByteSource) -> XzLayout:
    """Streams, blocks and the exact raw size of ``source`` from its indexes."""
    return _IndexWalker(source).walk()



def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def single_block_stream(block: XzBlock, data: Buffer) -> list[Buffer]:
    """A complete xz stream holding just ``block``, so it decodes on its own: the
    stream header, the block's bytes as they are (not copied) and index + footer."""
    index = bytearray(b"\0" + _varint(1) + _varint(block.unpadded) + _varint(block.raw_size))
    index += bytes(-len(index) % 4)
    index += struct.pack("<I", zlib.crc32(index))
    flags = block.stream_header[6:8]
    tail = struct.pack("<I", len(index) // 4 - 1) + flags
    footer = struct.pack("<I", zlib.crc32(tail)) + tail + FOOTER_MAGIC
    return [block.stream_header, data, bytes(index) + footer]


class XzBlockSource(Source):
    """Decodes the blocks of a multi-block xz file in parallel, in order.

    xz -T writes independent blocks; each is wrapped into a one-block stream
    (header, block, a one-record index, footer) and decoded by stdlib ``lzma``
    in a worker thread (it releases the GIL).  At most ``2 x threads`` blocks
    are in flight, each at most ``_PARALLEL_MAX_BLOCK`` raw bytes, so memory
    stays bounded; all-zero blocks of output become holes inside the workers.
    """

    name = "unxz"

    def __init__(self, source: ByteSource, layout: XzLayout, options: OpenOptions) -> None:
        assert layout.block_list is not None
        self.source = source
        self.path = source.label
        self.blocks = layout.block_list
        self.size = layout.size
        self.threads = max(2, options.threads)
        self.out = out_size(options)
        self._pool = LazyPool(self.threads, "unxz")

    def extents(self) -> Iterator[Extent]:
        jobs = (partial(self._decode, block) for block in self.blocks)
        return in_order(jobs, self._pool, 2 * self.threads)

    def _decode(self, block: XzBlock) -> list[Extent]:
        out: list[Extent] = []
        pos = block.raw_offset
        for piece in decode_block(self.source, block, self.out):
            out.extend(split_zeros(Extent(pos, len(piece), piece)))
            pos += len(piece)
        return out

    def close(self) -> None:
        self._pool.shutdown()


def decode_block(source: ByteSource, block: XzBlock, out: int) -> Iterator[bytes]:
    """The decoded pieces of one block (at most ``out`` bytes each), checked against
    the index's size."""
    data = source.pread_exact(block.offset, block.stored, "xz block")
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    pos = 0
    try:
        for part in _slices(single_block_stream(block, memoryview(data))):
            # small input slices: what a decompress() call leaves unread is copied
            # inside the decompressor, and a whole block's remainder is megabytes
            piece = dec.decompress(part, out)
            while piece:
                if pos + len(piece) > block.raw_size:
                    raise lzma.LZMAError("block holds more data than its index says")
                yield piece
                pos += len(piece)
                piece = dec.decompress(b"", out) if not dec.eof and not dec.needs_input \
                    else b""
    except lzma.LZMAError as exc:
        raise CorruptImage(
            f"{source.label}: corrupt xz block at compressed offset {block.offset}: {exc}"
        ) from exc
    if not dec.eof or pos != block.raw_size:
        raise CorruptImage(
            f"{source.label}: xz block at compressed offset {block.offset} decodes to "
            f"{pos} bytes, its index says {block.raw_size}"
        )


def _slices(parts: list[Buffer], size: int = 256 << 10) -> Iterator[memoryview]:
    for part in parts:
        view = memoryview(part)
        for pos in range(0, len(view), size):
            yield view[pos : pos + size]


def parallel_ok(layout: XzLayout, options: OpenOptions) -> bool:
    """Decode blocks in parallel when there are several and each is small enough."""
    blocks = layout.block_list
    return (
        options.threads > 1
        and blocks is not None
        and len(blocks) > 1
        and max(b.raw_size for b in blocks) <= _PARALLEL_MAX_BLOCK
    )


class XzLayer(StreamLayer):
    """An xz file: its size from the index; blocks decode in parallel and, when
    there are several, answer random reads."""

    def __init__(self, source: ByteSource, layout: XzLayout, options: OpenOptions) -> None:
        details: dict[str, object] = {
            "compression": "xz", "streams": layout.streams, "blocks": layout.blocks,
            "checks": ", ".join(layout.checks), "size_from": "xz index",
        }
        super().__init__(source, "xz", "unxz", decode_xz, details, layout.size)
        self.layout = layout

    def stream(self, size: int | None, options: OpenOptions) -> tuple[Source, list[Stage]]:
        if not parallel_ok(self.layout, options):
            self.details["decoding"] = "sequential"
            return super().stream(size, options)
        self.details["decoding"] = f"parallel blocks ({max(2, options.threads)} threads)"
        return XzBlockSource(self.source, self.layout, options), []

    def head(self, length: int = 4096) -> bytes:
        blocks = self.layout.block_list
        if blocks and blocks[0].raw_size >= length:
            out = bytearray()
            for piece in decode_block(self.source, blocks[0], max(length, 64 << 10)):
                out += piece
                if len(out) >= length:
                    break
            return bytes(out[:length])
        return super().head(length)

    def random_view(self, options: OpenOptions) -> ByteSource | None:
        blocks = self.layout.block_list
        if not blocks or len(blocks) < 2 or max(b.raw_size for b in blocks) > INDEXED_MAX_BLOCK:
            return None
        source = self.source

        def decode(index: int) -> Buffer:
            # 1 MiB pieces into one buffer: a whole block in one call would briefly
            # need it twice (the decoder's output blocks, then the joined bytes)
            block = blocks[index]
            buf = bytearray(block.raw_size)
            pos = 0
            for piece in decode_block(source, block, 1 << 20):
                buf[pos : pos + len(piece)] = piece
                pos += len(piece)
            return buf

        self.details["random_access"] = f"by block ({len(blocks)} blocks)"
        return IndexedSource(
            f"{source.label} (decoded xz)", "unxz",
            [(b.raw_offset, b.raw_size) for b in blocks], decode, options.threads,
        )


class XzFormat(MagicFormat, CompressionFormat):
    name = "xz"
    magic = XZ_MAGIC
    detect_order = 20

    def open_layer(self, source: ByteSource, options: OpenOptions) -> DecodedLayer:
        if not source.random:
            details: dict[str, object] = {"compression": "xz", "size_from": "counting pass"}
            return StreamLayer(source, self.name, "unxz", decode_xz, details)
        return XzLayer(source, xz_layout(source), options)

"""xz: an xz file (one or more streams, stream padding between/after) in, raw out.

Detect: magic ``fd 37 7a 58 5a 00``.  Size: exact and cheap (< 1 ms): walk
back from the end of the file - skip stream padding, read the 12-byte stream
footer, the index it points to, and sum the index records' uncompressed sizes;
repeat for each earlier concatenated stream until offset 0.  Every footer,
index and header CRC32 is checked, so a corrupt or truncated file is refused
before streaming.  Decoding uses stdlib ``lzma`` one stream at a time (it
stops at stream padding by itself), skipping the padding between streams.
Refused: bad magic, CRC or index, padding not a multiple of 4.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from drivepipe._errors import CorruptImage, ImageError
from drivepipe._stage import ImageFormat, ImageInput, OpenOptions

from ._codec import StreamDecompressor, decode_streams, open_compressed

XZ_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
_HEADER = 12
_FOOTER = 12
_PAD_SCAN = 64 << 10
#: an index this large (millions of blocks) is refused rather than read into memory
_MAX_INDEX = 64 << 20
_CHECKS = {0: "none", 1: "crc32", 4: "crc64", 10: "sha256"}


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
class XzLayout:
    streams: int = 0
    blocks: int = 0
    size: int = 0
    #: integrity check of each stream, in file order
    checks: list[str] = field(default_factory=list)


class _IndexWalker:
    def __init__(self, fd: int, path: str, end: int) -> None:
        self.fd, self.path, self.end = fd, path, end

    def bad(self, why: str, offset: int) -> CorruptImage:
        return CorruptImage(f"{self.path}: corrupt xz file: {why} at offset {offset}")

    def read(self, offset: int, length: int, why: str) -> bytes:
        data = os.pread(self.fd, length, offset) if offset >= 0 else b""
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
        blocks_size, raw, count = self.index(index_at, index_size)
        start = index_at - blocks_size - _HEADER
        header = self.read(start, _HEADER, "stream header")
        if header[:6] != XZ_MAGIC or header[6:8] != flags:
            raise self.bad("stream header does not match its footer", start)
        if struct.unpack("<I", header[8:])[0] != zlib.crc32(header[6:8]):
            raise self.bad("bad stream header CRC", start)
        layout.streams += 1
        layout.blocks += count
        layout.size += raw
        layout.checks.insert(0, _CHECKS.get(flags[1] & 0x0F, str(flags[1] & 0x0F)))
        return start

    def index(self, at: int, size: int) -> tuple[int, int, int]:
        """Parse the index at ``at``: (bytes of blocks, raw bytes, record count)."""
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
        unpadded, raw = values[0::2], values[1::2]
        return sum(_round4(u) for u in unpadded), sum(raw), count

    def walk(self) -> XzLayout:
        layout = XzLayout()
        pos = self.skip_padding(self.end)
        while pos > 0:
            pos = self.skip_padding(self.stream(pos, layout))
        if layout.streams == 0:
            raise self.bad("no xz stream", 0)
        return layout


def xz_layout(path: str) -> XzLayout:
    """Streams, blocks and the exact raw size of ``path`` from its indexes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from exc
    try:
        return _IndexWalker(fd, path, os.fstat(fd).st_size).walk()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)



class XzFormat(ImageFormat):
    name = "xz"
    detect_order = 20

    def detect(self, head: bytes) -> bool:
        return head[:6] == XZ_MAGIC

    def open(self, path: str, options: OpenOptions) -> ImageInput:
        layout = xz_layout(path)
        return open_compressed(
            path, self.name, "unxz", decode_xz, layout.size, options,
            {
                "compression": "xz", "streams": layout.streams, "blocks": layout.blocks,
                "checks": ", ".join(layout.checks), "size_from": "xz index",
            },
        )

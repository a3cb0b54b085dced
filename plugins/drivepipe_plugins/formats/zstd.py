"""zstd: a zstd file (one or more frames, skippable frames anywhere) in, raw out.

Detect: a zstd frame magic ``28 b5 2f fd`` or a skippable frame magic
``5? 2a 4d 18`` at offset 0.  Size: the frames are walked header to header
(block headers give each block's compressed size), summing each frame's
Frame_Content_Size; if any frame lacks one (zstd writing from a pipe) a
counting pass decodes the file.  The walk also proves the file is complete:
zstd's decoder says nothing when a frame is cut short, so a truncated file is
refused there.  Decoding uses ``zstandard``'s stream reader across frames with
bounded reads.  Refused: frames that need a dictionary (UnsupportedFormat);
unknown frame magic, reserved header bits or block types, frames running past
the end of the file (CorruptImage).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, cast

import zstandard

from drivepipe._errors import CorruptImage, UnsupportedFormat
from drivepipe._stage import ByteSource, CompressionFormat, DecodedLayer, OpenOptions
from drivepipe_plugins.formats._codec import (
    INDEXED_MAX_BLOCK,
    BadStream,
    IndexedSource,
    StreamLayer,
)

ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MIN = 0x184D2A50
_SKIPPABLE_MAX = 0x184D2A5F
_BLOCK_HEADER = 3
_RESERVED_BLOCK = 3
_RLE_BLOCK = 1
_DICT_ID_BYTES = (0, 1, 2, 4)
#: frames remembered for random access (each frame is one block of the view)
_MAX_FRAME_LIST = 1 << 18


def _is_skippable(magic: int) -> bool:
    return _SKIPPABLE_MIN <= magic <= _SKIPPABLE_MAX


class _ChunkReader:
    """A file-like ``read(n)`` over compressed chunks, for zstandard's stream reader."""

    def __init__(self, chunks: Iterator[memoryview]) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self._view:
            nxt = next(self._chunks, None)
            if nxt is None:
                return b""
            self._view = nxt
        n = len(self._view) if size < 0 else min(size, len(self._view))
        piece = bytes(self._view[:n])
        self._view = self._view[n:]
        return piece


def decode_zstd(chunks: Iterator[memoryview], out: int) -> Iterator[bytes]:
    """Decode every frame in turn (skippable frames produce nothing)."""
    reader = zstandard.ZstdDecompressor().stream_reader(
        # zstandard only calls read(); a full IO[bytes] would be dead weight
        cast(IO[bytes], _ChunkReader(chunks)),
        read_size=1 << 20, read_across_frames=True, closefd=False,
    )
    try:
        while True:
            piece = reader.read(out)
            if not piece:
                return
            yield piece
    except zstandard.ZstdError as exc:
        raise BadStream(str(exc)) from exc


@dataclass
class FrameWalk:
    """What walking the frame headers found."""

    frames: int = 0
    skippable: int = 0
    #: sum of Frame_Content_Size, None when a frame does not record it
    content_size: int | None = 0
    #: (file offset, file end, content size or None) of every data frame
    frame_list: list[tuple[int, int, int | None]] = field(default_factory=list)


class _Walker:
    def __init__(self, source: ByteSource) -> None:
        self.source, self.path, self.end = source, source.label, source.size

    def read(self, offset: int, length: int, what: str) -> bytes:
        data = self.source.pread(offset, length)
        if len(data) != length:
            raise CorruptImage(
                f"{self.path}: truncated zstd stream at compressed offset {self.end} "
                f"(a {what} at {offset} runs past the end)"
            )
        return data

    def walk(self) -> FrameWalk:
        found = FrameWalk()
        pos = 0
        while pos < self.end:
            (magic,) = struct.unpack("<I", self.read(pos, 4, "frame magic"))
            if _is_skippable(magic):
                (length,) = struct.unpack("<I", self.read(pos + 4, 4, "skippable frame"))
                pos += 8 + length
                self._check_end(pos, "skippable frame")
                found.skippable += 1
                continue
            if magic != ZSTD_MAGIC:
                raise CorruptImage(f"{self.path}: not a zstd frame at compressed offset {pos}")
            start = pos
            pos, fcs = self.frame(pos)
            found.frames += 1
            if len(found.frame_list) < _MAX_FRAME_LIST:
                found.frame_list.append((start, pos, fcs))
            if found.content_size is not None:
                found.content_size = None if fcs is None else found.content_size + fcs
        if found.frames == 0:
            raise CorruptImage(f"{self.path}: no zstd frame in the file")
        return found

    def _check_end(self, pos: int, what: str) -> None:
        if pos > self.end:
            raise CorruptImage(
                f"{self.path}: truncated zstd stream at compressed offset {self.end} "
                f"(a {what} runs past the end)"
            )

    def frame(self, start: int) -> tuple[int, int | None]:
        """Walk one frame; return where it ends and its content size (None: absent)."""
        fhd = self.read(start + 4, 1, "frame header")[0]
        if fhd & 0x08:
            raise CorruptImage(f"{self.path}: reserved bit set in zstd frame at {start}")
        fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        fcs_bytes = (1 if single else 0, 2, 4, 8)[fcs_flag]
        pos = start + 5 + (0 if single else 1)
        dict_id = int.from_bytes(self.read(pos, _DICT_ID_BYTES[did_flag], "frame header"), "little")
        if dict_id:
            raise UnsupportedFormat(
                f"{self.path}: zstd frame at offset {start} needs dictionary {dict_id}, "
                "which drivepipe does not have; decompress it with zstd -D first"
            )
        pos += _DICT_ID_BYTES[did_flag]
        fcs: int | None = None
        if fcs_bytes:
            fcs = int.from_bytes(self.read(pos, fcs_bytes, "frame header"), "little")
            fcs += 256 if fcs_bytes == 2 else 0
        pos = self.blocks(pos + fcs_bytes) + (4 if checksum else 0)
        self._check_end(pos, "frame checksum")
        return pos, fcs

    def blocks(self, pos: int) -> int:
        while True:
            header = int.from_bytes(self.read(pos, _BLOCK_HEADER, "block header"), "little")
            last, btype, bsize = header & 1, (header >> 1) & 3, header >> 3
            if btype == _RESERVED_BLOCK:
                raise CorruptImage(f"{self.path}: reserved zstd block type at offset {pos}")
            pos += _BLOCK_HEADER + (1 if btype == _RLE_BLOCK else bsize)
            self._check_end(pos, "block")
            if last:
                return pos


def walk_frames(source: ByteSource) -> FrameWalk:
    """Walk every frame of ``source`` (a few bytes read per block)."""
    return _Walker(source).walk()


class ZstdLayer(StreamLayer):
    """A zstd file; several frames that record their sizes also read out of order."""

    def __init__(self, source: ByteSource, walk: FrameWalk | None) -> None:
        size = walk.content_size if walk is not None else None
        details: dict[str, object] = {
            "compression": "zstd",
            "size_from": "frame content sizes" if size is not None else "counting pass",
        }
        if walk is not None:
            details.update(frames=walk.frames, skippable_frames=walk.skippable)
        super().__init__(source, "zstd", "unzstd", decode_zstd, details, size)
        self.walk = walk

    def random_view(self, options: OpenOptions) -> ByteSource | None:
        walk = self.walk
        if walk is None or walk.frames < 2 or len(walk.frame_list) != walk.frames:
            return None
        sizes = [fcs for _, _, fcs in walk.frame_list]
        if any(s is None or s > INDEXED_MAX_BLOCK for s in sizes):
            return None
        frames = walk.frame_list
        blocks: list[tuple[int, int]] = []
        pos = 0
        for _, _, fcs in frames:
            assert fcs is not None
            blocks.append((pos, fcs))
            pos += fcs
        label = f"{self.source.label} (decoded zstd)"

        def decode(index: int) -> bytes:
            start, end, fcs = frames[index]
            data = self.source.pread_exact(start, end - start, "zstd frame")
            try:
                out = zstandard.ZstdDecompressor().decompress(data, max_output_size=fcs or 0)
            except zstandard.ZstdError as exc:
                raise CorruptImage(
                    f"{self.source.label}: corrupt zstd frame at compressed offset {start}: "
                    f"{exc}"
                ) from exc
            if len(out) != fcs:
                raise CorruptImage(
                    f"{self.source.label}: zstd frame at compressed offset {start} decodes "
                    f"to {len(out)} bytes, its header says {fcs}"
                )
            return out

        self.details["random_access"] = f"by frame ({walk.frames} frames)"
        return IndexedSource(label, "unzstd", blocks, decode, options.threads)


class ZstdFormat(CompressionFormat):
    name = "zstd"
    detect_order = 20

    def detect(self, head: bytes, source: ByteSource) -> bool:
        if len(head) < 4:
            return False
        magic = int.from_bytes(head[:4], "little")
        return magic == ZSTD_MAGIC or _is_skippable(magic)

    def open_layer(self, source: ByteSource, options: OpenOptions) -> DecodedLayer:
        return ZstdLayer(source, walk_frames(source) if source.random else None)

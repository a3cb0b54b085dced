"""An example drivepipe plugin: a toy image format and a stage, found by entry points.

**The format, "zrle"** (zero-run-length): a file that starts with the magic
``ZRLE\\x00\\x01``, then the raw image's size as a big-endian u64, then records
until that size is covered, each ``kind (1 byte) + length (u64)`` and, for
``kind == 1`` (data), ``length`` bytes; ``kind == 0`` is a run of zeros that
takes no room.  In: a ``.zrle`` file.  Out: the raw image's extents, zero runs
as holes (nothing allocated, nothing read).  Refused: a bad magic, an unknown
record kind, records that do not add up to the size (``CorruptImage``).

**The stage, "zero_runs"**: passes the stream through unchanged and counts
the holes and bytes of zeros it saw - the smallest useful Stage.

**The target, "zrle"**: the other direction.  Takes the raw stream and writes
it as a ``.zrle`` file: holes (and data blocks that are all zeros) become zero
runs, so nothing of them is written.  The file is written under a temporary
name, fsynced and renamed only when complete; on any failure it is removed.

Register them through the entry points (see ``pyproject.toml`` beside this
file, or ``docs/architecture.md``)::

    [project.entry-points."drivepipe.formats"]
    zrle = "drivepipe_example:ZrleFormat"
    [project.entry-points."drivepipe.stages"]
    zero_runs = "drivepipe_example:ZeroRunsStage"
    [project.entry-points."drivepipe.targets"]
    zrle = "drivepipe_example:ZrleTarget"

and every command reads ``.zrle`` files (``drivepipe checksum disk.zrle``) and
writes them (``drivepipe convert disk.qcow2 zrle:disk.zrle``).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator

from drivepipe import (
    ByteSource,
    CorruptImage,
    Extent,
    ImageFormat,
    ImageInput,
    OpenOptions,
    OutputError,
    Sink,
    Source,
    Stage,
    TargetOptions,
    split_zeros,
)

MAGIC = b"ZRLE\x00\x01"
HEADER = struct.Struct(">6sQ")
RECORD = struct.Struct(">BQ")
ZEROS, DATA = 0, 1


class ZrleSource(Source):
    """Reads the records in order: data records as data extents, zero runs as holes.

    It reads its bytes from a :class:`~drivepipe.ByteSource` (a file, or the
    decoded output of an outer compressor: ``disk.zrle.xz`` works too), never
    from a path.
    """

    name = "zrle"

    def __init__(self, file: ByteSource, read_size: int) -> None:
        self.path = file.label
        self.read_size = read_size
        self.file = file
        self.pos = HEADER.size
        magic, self.size = HEADER.unpack(file.pread_exact(0, HEADER.size, "zrle header"))
        if magic != MAGIC:
            raise CorruptImage(f"{self.path}: not a zrle file")

    def _read(self, n: int) -> bytes:
        data = self.file.pread(self.pos, n)
        self.pos += len(data)
        return data

    def extents(self) -> Iterator[Extent]:
        pos = 0
        while pos < self.size:
            kind, length = self._record(pos)
            if kind == ZEROS:
                yield Extent.hole(pos, length)
            else:
                yield from self._data(pos, length)
            pos += length

    def _record(self, pos: int) -> tuple[int, int]:
        head = self._read(RECORD.size)
        if len(head) != RECORD.size:
            raise CorruptImage(f"{self.path}: records end at {pos} of {self.size} bytes")
        kind, length = RECORD.unpack(head)
        if kind not in (ZEROS, DATA) or length == 0 or pos + length > self.size:
            raise CorruptImage(f"{self.path}: bad record at image offset {pos}")
        return kind, length

    def _data(self, pos: int, length: int) -> Iterator[Extent]:
        """A data record in pieces of at most ``read_size`` bytes (bounded memory)."""
        end = pos + length
        while pos < end:
            data = self._read(min(self.read_size, end - pos))
            if not data:
                raise CorruptImage(f"{self.path}: truncated at image offset {pos}")
            yield Extent(pos, len(data), data)
            pos += len(data)

    def close(self) -> None:
        self.file.close()


class ZrleFormat(ImageFormat):
    name = "zrle"
    detect_order = 40  # before raw (1000), the fallback

    def detect(self, head: bytes, source: ByteSource) -> bool:
        return head.startswith(MAGIC)

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        # the ZrleSource closes the byte source it reads: it owns it from here on
        zrle = ZrleSource(source, options.read_size)
        return ImageInput(path=source.label, format=self.name, size=zrle.size, source=zrle,
                          file_size=source.size)


class ZeroRunsStage(Stage):
    """Extents in, the same extents out; counts the holes that went by."""

    name = "zero_runs"

    def __init__(self) -> None:
        self.holes = 0
        self.hole_bytes = 0

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in upstream:
            if ext.data is None:
                self.holes += 1
                self.hole_bytes += ext.length
            yield ext


class ZrleTarget(Sink[str]):
    """The raw stream in, a ``.zrle`` file out (zero runs for holes and zero blocks)."""

    name = "zrle-write"

    def __init__(self, path: str, *, force: bool = False, sync: bool = True) -> None:
        if not force and os.path.lexists(path):
            raise OutputError(f"{path}: already exists")
        self.path = path
        self.sync = sync
        self.tmp = f"{path}.{os.getpid()}.tmp"
        self.file: io.BufferedWriter | None = None

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> ZrleTarget:
        """``zrle:PATH`` as an output."""
        return cls(spec, force=options.force, sync=options.sync)

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self.file.write(HEADER.pack(MAGIC, size))
        run = 0  # zeros not written yet
        for ext in extents:
            pieces = [ext] if ext.data is None else split_zeros(ext)
            for piece in pieces:
                if piece.data is None:
                    run += piece.length
                    continue
                if run:
                    self.file.write(RECORD.pack(ZEROS, run))
                    run = 0
                self.file.write(RECORD.pack(DATA, piece.length))
                self.file.write(piece.data)
        if run:
            self.file.write(RECORD.pack(ZEROS, run))
        self.file.flush()
        if self.sync:
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.abort()


def write_zrle(raw_path: str, out_path: str, block: int = 1 << 20) -> None:
    """Encode a raw image as zrle: all-zero blocks become zero runs."""
    size = os.path.getsize(raw_path)
    with open(raw_path, "rb") as src, open(out_path, "wb") as out:
        out.write(HEADER.pack(MAGIC, size))
        while chunk := src.read(block):
            kind = ZEROS if chunk == bytes(len(chunk)) else DATA
            out.write(RECORD.pack(kind, len(chunk)))
            if kind == DATA:
                out.write(chunk)

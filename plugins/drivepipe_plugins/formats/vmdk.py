"""vmdk: a VMware disk (sparse, streamOptimized, or a descriptor and its extents) in,
the raw virtual disk out (random access).

Detect: magic ``KDMV`` (a sparse extent), ``COWD`` (refused), or a text descriptor
(qemu's rule: the first line that is not a comment or blank is ``version=1|2|3``).
Size: the sparse header's ``capacity`` x 512 (the footer's copy when the grain
directory is at the end), or the sum of a descriptor's extent lines; exact.

Sparse extents (monolithicSparse, twoGbMaxExtentSparse pieces, streamOptimized in
both layouts: qemu's with the grain directory up front and VMware's with it at the
end after a footer): the grain directory is read once, each grain table with one
pread.  Unallocated and zeroed grains (GTE 0, GTE 1) are holes and never read;
host-contiguous grains are coalesced into reads of up to ``read_size``.  Compressed
grains (zlib streams behind grain markers) are read in batches and inflated in a
thread pool of ``threads`` (ISA-L, which releases the GIL); grains written out of
LBA order need nothing special, as the tables say where each one is.  The redundant
grain directory is ignored.  A streamOptimized file is *not* read front to back
(the format's ``sequential`` is False): inside a compressor it is spooled first.

Descriptors (monolithicFlat, twoGbMaxExtentFlat/Sparse, vmfs): FLAT, SPARSE and
ZERO extents in order, extent files opened relative to the descriptor's own
directory and only there (an absolute path, ``..`` or a symlink out of it is
refused: a stranger's descriptor must not upload local files).

Refused with UnsupportedFormat: differencing disks (``parentCID`` other than
ffffffff, ``parentFileNameHint``), ``COWD`` (VMFS sparse), vmfsSparse, seSparse,
raw-device and device types, NOACCESS extents, versions above 3, unknown
compression, encrypted disks (``encryption.*`` keys), grains over 16 MiB, more
than 512 entries a grain table (qemu's limit).  Refused with CorruptImage: a failed
newline check (a file sent through a text-mode transfer), bad header or footer
fields, tables or grains outside the file, grains that do not inflate to the grain.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from isal import isal_zlib

from drivepipe._errors import CorruptImage, ImageError, UnsupportedFormat
from drivepipe._extent import Extent, rechunk, split_zeros
from drivepipe._registry import open_file
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions
from drivepipe_plugins.formats._parallel import Job, LazyPool, in_order
from drivepipe_plugins.formats._ranged import RangedImage
from drivepipe_plugins.formats._tables import COMPRESSED, DATA, HOLE, Piece, Table, coalesce

SECTOR = 512
VMDK4_MAGIC = b"KDMV"
VMDK3_MAGIC = b"COWD"
#: SparseExtentHeader up to compressAlgorithm (offsets in the module docs of more-formats)
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_MARKER = struct.Struct("<QII")  # val, size, type (type only when size == 0)
GD_AT_END = 0xFFFFFFFFFFFFFFFF
NEWLINE_CHECK = b"\n \r\n"

FLAG_NEWLINE_CHECK = 1 << 0
FLAG_REDUNDANT_GD = 1 << 1
FLAG_ZEROED_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17

COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GTE_ZEROED = 1

#: grains up to 16 MiB (qemu allows 1 GiB; nobody writes more than 1 MiB)
_MAX_GRAIN_SECTORS = 32768
#: qemu refuses grain tables of more than 512 entries
_MAX_GTES = 512
#: a 32 MiB grain directory at most (qemu's cap on its L1 table)
_MAX_GD_ENTRIES = 8 << 20
#: descriptors are read up to 1 MiB, as qemu does
MAX_DESCRIPTOR = 1 << 20
#: allocated bytes are counted at open only when the grain tables are this small
_DATA_SIZE_SCAN_LIMIT = 64 << 20

_ISAL_ERROR = cast(type[Exception], isal_zlib.error)



# -- headers -----------------------------------------------------------------------


@dataclass(frozen=True)
class SparseHeader:
    version: int
    flags: int
    capacity: int
    grain_sectors: int
    desc_offset: int
    desc_size: int
    gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    check_bytes: bytes
    compression: int

    @property
    def grain_size(self) -> int:
        return self.grain_sectors * SECTOR

    @property
    def gt_span(self) -> int:
        return self.gtes_per_gt * self.grain_size

    @property
    def compressed(self) -> bool:
        return self.compression == COMPRESSION_DEFLATE

    @property
    def markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def zeroed_grain(self) -> bool:
        return bool(self.flags & FLAG_ZEROED_GRAIN)


def parse_header(data: bytes, label: str) -> SparseHeader:
    """The fields of a KDMV header, or a one-line error."""
    if len(data) < _HEADER.size:
        raise CorruptImage(f"{label}: truncated VMDK header")
    fields = _HEADER.unpack_from(data)
    if fields[0] != VMDK4_MAGIC:
        raise CorruptImage(f"{label}: not a VMDK sparse extent (bad magic)")
    (_, version, flags, capacity, grain, d_off, d_size, gtes, rgd, gd, overhead, _,
     check, compression) = fields
    return SparseHeader(version, flags, capacity, grain, d_off, d_size, gtes, rgd, gd,
                        overhead, check, compression)


def check_header(h: SparseHeader, label: str) -> None:
    """Refusals and sanity checks of a sparse header (after the footer swap)."""
    if h.version > 3 or h.version == 0:
        raise UnsupportedFormat(f"{label}: VMDK version {h.version} is not supported (1..3 are)")
    if h.compression not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
        raise UnsupportedFormat(f"{label}: unknown VMDK compression algorithm {h.compression}")
    if h.flags & FLAG_NEWLINE_CHECK and h.check_bytes != NEWLINE_CHECK:
        raise CorruptImage(
            f"{label}: VMDK newline check failed: the file was damaged by a text-mode "
            "transfer (CR/LF conversion); copy it again in binary mode"
        )
    if not 1 <= h.grain_sectors <= _MAX_GRAIN_SECTORS:
        raise UnsupportedFormat(
            f"{label}: VMDK grain of {h.grain_sectors} sectors is not supported "
            f"(1..{_MAX_GRAIN_SECTORS})"
        )
    if not 1 <= h.gtes_per_gt <= _MAX_GTES:
        raise UnsupportedFormat(
            f"{label}: VMDK grain tables of {h.gtes_per_gt} entries are not supported "
            f"(1..{_MAX_GTES}, as in qemu)"
        )
    if -(-h.capacity // (h.gtes_per_gt * h.grain_sectors)) > _MAX_GD_ENTRIES:
        raise CorruptImage(f"{label}: VMDK capacity of {h.capacity} sectors is absurd")


# -- descriptors -------------------------------------------------------------------

_EXTENT_LINE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)
#: createTypes that are read; the others are refused with the reason
_READ_TYPES = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized", "vmfs", "vmfsPreallocated", "vmfsEagerZeroedThick", "vmfsThin",
}
_REFUSED_TYPES = {
    "vmfsSparse": "a VMFS sparse (differencing) disk",
    "seSparse": "an ESXi space-efficient sparse (seSparse) disk",
    "vmfsRaw": "a raw device mapping", "vmfsRawDeviceMap": "a raw device mapping",
    "vmfsPassthroughRawDeviceMap": "a raw device mapping",
    "fullDevice": "a physical device", "partitionedDevice": "a physical device",
    "custom": "a custom layout",
}
_REFUSED_EXTENTS = {
    "VMFSSPARSE": "VMFS sparse", "SESPARSE": "seSparse", "VMFSRAW": "raw device",
    "VMFSRDM": "raw device mapping", "VMFSPASSTHROUGHRAW": "raw device mapping",
}


@dataclass(frozen=True)
class ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str
    offset: int


@dataclass
class Descriptor:
    keys: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    @property
    def create_type(self) -> str:
        return self.keys.get("createType", "")


def looks_like_descriptor(head: bytes) -> bool:
    """qemu's probe: the first line that is not a comment or blank is ``version=1..3``."""
    for raw in head.split(b"\n"):
        line = raw.rstrip(b"\r")
        if line.startswith(b"#") or not line.strip(b" "):
            continue
        return line in (b"version=1", b"version=2", b"version=3")
    return False


def parse_descriptor(text: str, label: str) -> Descriptor:
    """Keys (quotes stripped) and extent lines of a descriptor; bad extent lines refused."""
    desc = Descriptor()
    for raw in text.replace("\x00", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            m = _EXTENT_LINE.match(line)
            if m is None:
                raise CorruptImage(f"{label}: invalid VMDK extent line: {line[:200]!r}")
            access, sectors, kind, name, offset = m.groups()
            desc.extents.append(
                ExtentLine(access, int(sectors), kind, name or "", int(offset or 0))
            )
            continue
        key, sep, value = line.partition("=")
        if sep:
            desc.keys[key.strip()] = value.strip().strip('"')
    return desc


def check_descriptor(desc: Descriptor, label: str) -> None:
    """Refuse differencing, encrypted and unsupported disk types."""
    parent = desc.keys.get("parentCID", "ffffffff").lower()
    hint = desc.keys.get("parentFileNameHint")
    if parent != "ffffffff" or hint:
        named = f" (parent {hint!r})" if hint else ""
        raise UnsupportedFormat(
            f"{label}: VMDK is a differencing disk{named}; it holds only the changes to "
            "its parent: flatten it first (qemu-img convert -O vmdk child.vmdk flat.vmdk)"
        )
    if any(k.lower().startswith("encryption.") for k in desc.keys):
        raise UnsupportedFormat(
            f"{label}: VMDK is encrypted; decrypt it in VMware first"
        )
    ctype = desc.create_type
    if ctype in _REFUSED_TYPES:
        raise UnsupportedFormat(
            f"{label}: VMDK createType {ctype!r} ({_REFUSED_TYPES[ctype]}) is not supported"
        )
    if ctype and ctype not in _READ_TYPES:
        raise UnsupportedFormat(f"{label}: unknown VMDK createType {ctype!r}")


def _decode_text(data: bytes) -> str:
    return data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


# -- a sparse extent ---------------------------------------------------------------


def little_u32(raw: bytes) -> Table:
    table = array("I", raw)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SparseExtent:
    """One KDMV file mapped at ``base`` of the image: grain directory and tables."""

    def __init__(self, src: ByteSource, base: int = 0, *, read_size: int = 4 << 20) -> None:
        self.src = src
        self.label = src.label
        self.base = base
        self.read_size = max(4096, read_size)
        self.footer = False
        self.embedded: Descriptor | None = None
        head = src.pread_exact(0, SECTOR, "VMDK header") if src.size >= SECTOR else b""
        if head[:4] == VMDK3_MAGIC:
            raise UnsupportedFormat(
                f"{self.label}: VMDK3 'COWD' (VMFS sparse / ESX 2) extents are not supported"
            )
        h = parse_header(head, self.label)
        if h.capacity == 0 and h.desc_offset:
            raise UnsupportedFormat(
                f"{self.label}: VMDK sparse file with an embedded multi-extent descriptor "
                "is not supported"
            )
        if h.gd_offset == GD_AT_END:
            h = self._footer_header(h)
        check_header(h, self.label)
        self.header = h
        self.size = h.capacity * SECTOR
        self.grain = h.grain_size
        self._read_embedded_descriptor(h)
        self.gd = self._load_gd(h)
        self._gt_cache: tuple[int, Table | None] = (-1, None)
        self._bound = self._compressed_bound()

    def _footer_header(self, h: SparseHeader) -> SparseHeader:
        """VMware's stream layout: the real header is the copy in the footer."""
        if not self.src.random:
            raise UnsupportedFormat(
                f"{self.label}: streamOptimized VMDK with its grain directory at the end "
                "cannot be read from a stream; give drivepipe the file"
            )
        if self.src.size < 4 * SECTOR:
            raise CorruptImage(f"{self.label}: VMDK too short for its footer")
        tail = self.src.pread_exact(self.src.size - 3 * SECTOR, 3 * SECTOR, "VMDK footer")
        _, fsize, ftype = _MARKER.unpack_from(tail, 0)
        eval_, esize, etype = _MARKER.unpack_from(tail, 2 * SECTOR)
        if (fsize, ftype) != (0, MARKER_FOOTER) or (eval_, esize, etype) != (0, 0, MARKER_EOS):
            raise CorruptImage(
                f"{self.label}: VMDK grain directory is at the end but the footer and "
                "end-of-stream markers are missing"
            )
        footer = parse_header(tail[SECTOR : 2 * SECTOR], self.label)
        if footer.gd_offset == GD_AT_END:
            raise CorruptImage(f"{self.label}: VMDK footer has no grain directory offset")
        self.footer = True
        return footer

    def _read_embedded_descriptor(self, h: SparseHeader) -> None:
        if not h.desc_offset or not h.desc_size:
            return
        n = min(h.desc_size * SECTOR, MAX_DESCRIPTOR)
        raw = _pread_exact(self.src, h.desc_offset * SECTOR, n, "VMDK embedded descriptor",
                           short_ok=True)
        desc = parse_descriptor(_decode_text(raw), self.label)
        check_descriptor(desc, self.label)
        self.embedded = desc

    def _load_gd(self, h: SparseHeader) -> Table:
        entries = -(-h.capacity // (h.gtes_per_gt * h.grain_sectors))
        raw = _pread_exact(self.src, h.gd_offset * SECTOR, entries * 4, "VMDK grain directory")
        return little_u32(raw)

    def _compressed_bound(self) -> int:
        """Most bytes a grain marker and its zlib stream take (zlib's worst case)."""
        g = self.grain
        return _MARKER.size - 4 + g + (g >> 12) + (g >> 14) + (g >> 25) + 13 + 6

    # -- mapping -------------------------------------------------------------------

    def grain_table(self, index: int) -> Table | None:
        cached = self._gt_cache  # one read: chunk readers may walk in several threads
        if cached[0] == index:
            return cached[1]
        sector = self.gd[index]
        table = None
        if sector:
            n = self.header.gtes_per_gt * 4
            raw = self.src.pread_exact(sector * SECTOR, n, f"VMDK grain table {index}")
            table = little_u32(raw)
        self._gt_cache = (index, table)
        return table

    def pieces(self, lo: int, hi: int) -> Iterator[Piece]:
        """Pieces of ``[lo, hi)`` (extent offsets), in image offsets, runs merged."""
        g, span, gtes = self.grain, self.header.gt_span, self.header.gtes_per_gt
        hi = min(hi, self.size)
        compressed = self.header.compressed
        for index in range(lo // span, -(-hi // span)):
            start = index * span
            table = self.grain_table(index)
            a, b = max(lo, start), min(hi, start + span)
            if table is None:
                yield (HOLE, self.base + a, b - a, 0, 0)
                continue
            i = (a - start) // g
            last = -(-(b - start) // g)
            while i < last:
                entry = table[i]
                gpos = start + i * g
                if entry in (0, GTE_ZEROED):
                    j = i + 1
                    while j < last and table[j] in (0, GTE_ZEROED):
                        j += 1
                    kind, host = HOLE, 0
                elif compressed:
                    j, kind, host = i + 1, COMPRESSED, self._grain_host(entry, gpos)
                else:
                    host = self._grain_host(entry, gpos)
                    j = i + 1
                    while j < last and j < gtes and table[j] == entry + (j - i) * (g // SECTOR):
                        j += 1
                    kind = DATA
                p_lo, p_hi = max(a, gpos), min(b, start + j * g)
                if kind == DATA:
                    host += p_lo - gpos
                yield (kind, self.base + p_lo, p_hi - p_lo, host, self.base + gpos)
                i = j

    def _grain_host(self, entry: int, gpos: int) -> int:
        host = entry * SECTOR
        if host >= self.src.size:
            raise CorruptImage(
                f"{self.label}: VMDK grain for offset {self.base + gpos} points past the "
                f"end of the file (sector {entry})"
            )
        return host

    def jobs(self, lo: int, hi: int) -> Iterator[Job]:
        """Holes merged, host-contiguous data merged and cut at ``read_size``,
        compressed grains batched up to ``read_size`` of output."""
        for work in coalesce(self.pieces(lo, hi), self.grain, self.read_size):
            if isinstance(work, list):
                yield self._inflate_job(work)
            elif work[0] == HOLE:
                yield Extent.hole(work[1], work[2])
            else:
                yield _bind(self._read_data, work[1], work[3], work[2])

    def _read_data(self, offset: int, host: int, length: int) -> list[Extent]:
        # A grain cut short by the end of the file reads as zeros there, as in qemu.
        avail = max(0, min(length, self.src.size - host))
        data = self.src.pread_exact(host, avail, "VMDK grain") if avail else b""
        out = list(split_zeros(Extent(offset, avail, data))) if avail else []
        if avail < length:
            out.append(Extent.hole(offset + avail, length - avail))
        return out

    def _inflate_job(self, batch: list[Piece]) -> Callable[[], list[Extent]]:
        return _bind(self._inflate_batch, batch)

    def _inflate_batch(self, batch: list[Piece]) -> list[Extent]:
        lo = min(p[3] for p in batch)
        hi = min(max(p[3] for p in batch) + self._bound, self.src.size)
        span: bytes | None = None
        if hi - lo <= 2 * len(batch) * self._bound:
            span = self.src.pread_exact(lo, hi - lo, "VMDK compressed grains")
        out = bytearray()
        for _, offset, length, host, gpos in batch:
            if span is not None:
                raw = memoryview(span)[host - lo : host - lo + self._bound]
            else:
                n = min(self._bound, self.src.size - host)
                raw = memoryview(self.src.pread_exact(host, n, "VMDK compressed grain"))
            grain = self.inflate(raw, gpos)
            within = offset - gpos
            if len(grain) < within + length:
                raise CorruptImage(
                    f"{self.label}: VMDK compressed grain for offset {gpos} inflates to "
                    f"{len(grain)} bytes, {within + length} needed"
                )
            out += memoryview(grain)[within : within + length]
        first = batch[0][1]
        return list(rechunk(split_zeros(Extent(first, len(out), out)), self.read_size))

    def inflate(self, raw: memoryview, gpos: int) -> bytes:
        """One grain: its marker (when the extent has markers) and zlib stream."""
        if self.header.markers:
            if len(raw) < 12:
                raise CorruptImage(f"{self.label}: VMDK grain marker for offset {gpos} is cut")
            _, size = struct.unpack_from("<QI", raw)
            if size == 0 or size > len(raw) - 12:
                raise CorruptImage(
                    f"{self.label}: VMDK grain marker for offset {gpos} has an invalid "
                    f"size {size}"
                )
            raw = raw[12 : 12 + size]
        try:
            dec = isal_zlib.decompressobj()
            data = dec.decompress(raw, self.grain + 1)
        except (_ISAL_ERROR, ValueError) as exc:
            raise CorruptImage(
                f"{self.label}: VMDK compressed grain for offset {gpos} is corrupt: {exc}"
            ) from exc
        if len(data) > self.grain or not dec.eof:
            raise CorruptImage(
                f"{self.label}: VMDK compressed grain for offset {gpos} does not inflate "
                f"to one grain of {self.grain} bytes"
            )
        return data

    # -- facts ---------------------------------------------------------------------

    def allocated_bytes(self) -> int | None:
        """Bytes of the extent in allocated grains (tables read when small enough)."""
        tables = [i for i, s in enumerate(self.gd) if s]
        gtes, g = self.header.gtes_per_gt, self.grain
        if len(tables) * gtes * 4 > _DATA_SIZE_SCAN_LIMIT:
            return None
        n_grains = -(-self.size // g)
        total = 0
        last_allocated = False
        for index in tables:
            table = self.grain_table(index)
            assert table is not None
            valid = table[: max(0, min(gtes, n_grains - index * gtes))]
            total += (len(valid) - valid.count(0) - valid.count(GTE_ZEROED)) * g
            if index == (n_grains - 1) // gtes and valid:
                last_allocated = valid[-1] > GTE_ZEROED
        if last_allocated and self.size % g:
            total -= g - self.size % g
        return total


def _pread_exact(
    src: ByteSource, offset: int, length: int, what: str, *, short_ok: bool = False
) -> bytes:
    """``pread_exact`` that refuses offsets past the end before asking the source
    (a header field may hold any 64-bit value)."""
    if offset > src.size or (not short_ok and offset + length > src.size):
        raise CorruptImage(
            f"{src.label}: truncated or corrupt: {what} at offset {offset} lies past the end "
            f"({src.size} bytes)"
        )
    if short_ok:
        return src.pread(offset, min(length, src.size - offset))
    return src.pread_exact(offset, length, what)


def _bind(fn: Callable[..., list[Extent]], *args: object) -> Callable[[], list[Extent]]:
    return lambda: fn(*args)


# -- the image: extents in order ---------------------------------------------------


@dataclass
class Part:
    """One extent line: ``length`` bytes at ``base`` from a sparse extent, a flat
    file (from ``offset``), or zeros."""

    base: int
    length: int
    sparse: SparseExtent | None = None
    flat: ByteSource | None = None
    offset: int = 0


class VmdkImage(RangedImage):
    """The raw disk of a VMDK: its extents in order; a Source and a RandomAccess."""

    name = "vmdk"

    def __init__(self, parts: list[Part], label: str, options: OpenOptions) -> None:
        self.parts = parts
        self.label = label
        self.size = sum(p.length for p in parts)
        self.threads = max(1, options.threads)
        self.read_size = max(4096, options.read_size)
        self._pool = LazyPool(self.threads, "vmdk")

    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        return in_order(self._jobs(offset, end), self._pool)

    def _jobs(self, offset: int, end: int) -> Iterator[Job]:
        for part in self.parts:
            lo, hi = max(offset, part.base), min(end, part.base + part.length)
            if lo >= hi:
                continue
            if part.sparse is not None:
                yield from part.sparse.jobs(lo - part.base, hi - part.base)
            elif part.flat is not None:
                shift = part.base - part.offset
                for ext in part.flat.read_range(lo - shift, hi - lo):
                    yield Extent(ext.offset + shift, ext.length, ext.data)
            else:
                yield Extent.hole(lo, hi - lo)

    def data_size(self) -> int | None:
        total = 0
        for part in self.parts:
            if part.sparse is not None:
                n = part.sparse.allocated_bytes()
                if n is None:
                    return None
                total += min(n, part.length)
            elif part.flat is not None:
                ranges = part.flat.data_ranges(part.offset, part.offset + part.length)
                if ranges is None:
                    return None
                total += sum(hi - lo for lo, hi in ranges)
        return total

    def close(self) -> None:
        self._pool.shutdown()


# -- opening -----------------------------------------------------------------------


def _extent_path(directory: str, name: str, label: str) -> str:
    """The extent file ``name`` inside ``directory``, refusing anything that leaves it."""
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise UnsupportedFormat(
            f"{label}: VMDK extent file {name!r} is not inside the descriptor's directory; "
            "refused (a descriptor may not name other files on this machine)"
        )
    path = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([real_dir, real]) != real_dir:
        raise UnsupportedFormat(
            f"{label}: VMDK extent file {name!r} is a symlink out of the descriptor's "
            "directory; refused"
        )
    if not os.path.exists(path):
        raise ImageError(f"{label}: VMDK extent file {name!r} (named by the descriptor) "
                         f"is missing: no {path}")
    return path


def open_descriptor(
    source: ByteSource, options: OpenOptions
) -> tuple[VmdkImage, dict[str, object], list[ByteSource]]:
    """The image a text descriptor describes; its extent files opened beside it."""
    label = source.label
    text = _decode_text(source.pread(0, min(source.size, MAX_DESCRIPTOR)))
    desc = parse_descriptor(text, label)
    check_descriptor(desc, label)
    if not desc.extents:
        raise CorruptImage(f"{label}: VMDK descriptor lists no extents")
    path = getattr(source, "path", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        raise UnsupportedFormat(
            f"{label}: a VMDK descriptor names extent files; open the descriptor itself "
            "from a file beside them"
        )
    directory = os.path.dirname(os.path.abspath(path))
    parts: list[Part] = []
    opened: list[ByteSource] = []
    base = 0
    try:
        for line in desc.extents:
            parts.append(_open_part(line, base, directory, label, options, opened))
            base += line.sectors * SECTOR
    except BaseException:
        for src in opened:
            src.close()
        raise
    details: dict[str, object] = {
        "subformat": desc.create_type or "descriptor",
        "extents": len(parts),
        "extent_types": sorted({line.kind for line in desc.extents}),
    }
    sparse = [p.sparse for p in parts if p.sparse is not None]
    if sparse:
        details["grain_size"] = sparse[0].grain
    return VmdkImage(parts, label, options), details, opened


def _open_part(
    line: ExtentLine, base: int, directory: str, label: str, options: OpenOptions,
    opened: list[ByteSource],
) -> Part:
    length = line.sectors * SECTOR
    if line.access == "NOACCESS":
        raise UnsupportedFormat(
            f"{label}: VMDK extent {line.filename!r} is NOACCESS (its data is not "
            "available); refused rather than read as zeros"
        )
    if line.kind in _REFUSED_EXTENTS:
        raise UnsupportedFormat(
            f"{label}: VMDK {_REFUSED_EXTENTS[line.kind]} extent {line.filename!r} is not "
            "supported"
        )
    if line.kind == "ZERO":
        return Part(base, length)
    if line.kind not in ("FLAT", "VMFS", "SPARSE"):
        raise UnsupportedFormat(f"{label}: unknown VMDK extent type {line.kind!r}")
    src = open_file(_extent_path(directory, line.filename, label), options)
    opened.append(src)
    if line.kind == "SPARSE":
        sparse = SparseExtent(src, base, read_size=options.read_size)
        if sparse.size < length:
            raise CorruptImage(
                f"{label}: VMDK sparse extent {line.filename!r} holds {sparse.size} bytes, "
                f"the descriptor says {length}"
            )
        return Part(base, length, sparse=sparse)
    need = line.offset * SECTOR + length
    if src.size < need:
        raise CorruptImage(
            f"{label}: VMDK flat extent {line.filename!r} is {src.size} bytes, the "
            f"descriptor needs {need}"
        )
    return Part(base, length, flat=src, offset=line.offset * SECTOR)


def sparse_details(sparse: SparseExtent) -> dict[str, object]:
    h = sparse.header
    if sparse.embedded is not None and sparse.embedded.create_type:
        subformat = sparse.embedded.create_type
    else:
        subformat = "streamOptimized" if h.compressed else "monolithicSparse"
    return {
        "subformat": subformat,
        "vmdk_version": h.version,
        "grain_size": sparse.grain,
        "grain_table_entries": h.gtes_per_gt,
        "compressed": h.compressed,
        "zeroed_grain": h.zeroed_grain,
        "layout": "footer" if sparse.footer else "header",
        "grain_tables": sum(1 for s in sparse.gd if s),
    }


class VmdkFormat(ImageFormat):
    name = "vmdk"
    detect_order = 20

    def detect(self, head: bytes, source: ByteSource) -> bool:
        # A file that calls itself a descriptor but is not one is refused, not sent raw.
        return (
            head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC)
            or head.startswith(b"# Disk DescriptorFile")
            or looks_like_descriptor(head)
        )

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        head = source.head(SECTOR)
        opened: list[ByteSource] = []
        if head[:4] in (VMDK4_MAGIC, VMDK3_MAGIC):
            sparse = SparseExtent(source, read_size=options.read_size)
            image = VmdkImage([Part(0, sparse.size, sparse=sparse)], source.label, options)
            details = sparse_details(sparse)
        else:
            image, details, opened = open_descriptor(source, options)
        try:
            data_size = image.data_size()
        except BaseException:
            image.close()
            for src in opened:
                src.close()
            raise
        return ImageInput(
            path=source.label, format=self.name, size=image.size, source=image,
            data_size=data_size, file_size=source.size + sum(s.size for s in opened),
            random_access=image if source.random else None, details=details,
            resources=[source, *opened],
        )

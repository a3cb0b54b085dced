"""vhd: a VHD (Virtual PC, Hyper-V, Azure) image in, the raw virtual disk out.

qemu calls this format ``vpc``.  Fixed and dynamic disks are read;
differencing disks (type 4), unknown disk types and versions and bad
checksums are refused with one line.

Detect: ``conectix`` at offset 0 (a dynamic disk's footer copy), or in the
last 512 bytes (a fixed disk has its footer only there: ``source.tail``).

Size rule: the footer's ``currentSize``, always.  That is the disk Hyper-V,
Azure and VirtualBox present to the guest.  qemu (``block/vpc.c``) takes the
CHS geometry (cylinders x heads x sectors x 512) instead for some creators:
qemu 7.2 (the qemu-img tests here run) for every creator except ``win ``
(Hyper-V), ``qem2`` (qemu-img with ``force_size=on``), ``d2v `` (Disk2vhd),
``CTXS`` (XenConverter) and ``tap\\0`` (XenServer); qemu 10 only for ``vpc ``
(Virtual PC) and ``qemu``; both use currentSize when the geometry is the
maximum 65535x16x255.  qemu-img's own images agree either way (without
``force_size`` it rounds the size up to a CHS size and writes that as
currentSize too); for an image whose geometry covers less than currentSize
(VirtualBox's ``vbox``, Azure's ``wa\\0\\0`` under an older qemu) qemu's
disk is cut short at the CHS size, ours is not.  ``inspect`` shows both
sizes (``current_size``, ``chs_size``).

Fixed: the first ``currentSize`` bytes of the file are the disk; the footer
is not part of it.  On a sequential source (a stream with a known size) the
disk is streamed and the footer behind it is checked before the disk's last
byte is passed on.  Inside a compressor a fixed VHD is not recognised by its
first bytes (its footer is at the end of the decoded stream): name it in the
chain (``--format zstd,vhd``); the registry then gives it a random view.

Dynamic: the dynamic header (``cxsparse``, its own checksum) gives the block
size and the BAT (big-endian u32 sector offsets; 0xFFFFFFFF unallocated: a
hole, never read).  Each allocated block starts with a sector bitmap (MSB
first); a clear bit reads as zeros, as in VirtualBox and Hyper-V (qemu reads
the sector's bytes whatever the bitmap says; qemu-img only writes full
bitmaps).  Host-contiguous blocks are read together, across the bitmaps
between them, in reads of up to ``read_size``; host-file holes are skipped.

Everything wrong in the file is a one-line CorruptImage; refused features are
UnsupportedFormat.

The block-map reader here (:class:`BlockImage`) is shared with the VDI reader.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

from drivepipe._errors import CorruptImage, ImageError, UnsupportedFormat
from drivepipe._extent import Extent, split_zeros
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions, Source
from drivepipe_plugins.formats._ranged import RangedImage

COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
VERSION_1_0 = 0x00010000
TYPE_FIXED, TYPE_DYNAMIC, TYPE_DIFFERENCING = 2, 3, 4
BAT_FREE = 0xFFFFFFFF
#: the geometry qemu reads as "use currentSize" whatever the creator
MAX_GEOMETRY = 65535 * 16 * 255
#: creators qemu 7.2 sizes by currentSize (all others by the CHS geometry)
QEMU72_CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\x00")

# cookie, features, version, data offset, timestamp, creator app, creator version,
# creator OS, original size, current size, cylinders, heads, sectors/track, type,
# checksum, unique id, saved state
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_FOOTER_CHECKSUM_AT = 64
# cookie, data offset, table offset, version, max table entries, block size, checksum,
# parent unique id, parent timestamp
_DYN = struct.Struct(">8sQQIIII16sI")
_DYN_CHECKSUM_AT = 36
_MIN_BLOCK, _MAX_BLOCK = 512, 1 << 30
#: the largest table (BAT, VDI block map) read into memory at open
MAX_TABLE_BYTES = 64 << 20

Table: TypeAlias = "array[int]"
#: (guest offset, length, host offset or -1 for a hole)
Piece = tuple[int, int, int]
HOLE = -1


def vhd_checksum(raw: bytes, at: int) -> int:
    """One's complement of the byte sum, the 4 checksum bytes at ``at`` counted as 0."""
    total = sum(raw) - sum(raw[at : at + 4])
    return ~total & 0xFFFFFFFF


def big_endian_u32(raw: bytes) -> Table:
    table = array("I", raw)
    if table.itemsize != 4:  # pragma: no cover - every platform we run on
        table = array("L", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def little_endian_u32(raw: bytes) -> Table:
    table = array("I", raw)
    if sys.byteorder == "big":  # pragma: no cover
        table.byteswap()
    return table


@dataclass(frozen=True)
class Footer:
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors * 512

    @property
    def qemu72_size(self) -> int:
        """The size qemu-img 7.2 gives this disk (see the module docstring)."""
        geometry = self.cylinders * self.heads * self.sectors
        if self.creator_app in QEMU72_CURRENT_SIZE_CREATORS or geometry == MAX_GEOMETRY:
            return self.current_size // 512 * 512
        return geometry * 512


def parse_footer(raw: bytes, label: str) -> Footer:
    """The footer's fields; bad checksums, versions and disk types refused in one line."""
    if len(raw) < FOOTER_SIZE or raw[:8] != COOKIE:
        raise CorruptImage(f"{label}: not a VHD image (no 'conectix' footer)")
    fields = _FOOTER.unpack_from(raw)
    footer = Footer(*fields[1:15])
    computed = vhd_checksum(raw[:FOOTER_SIZE], _FOOTER_CHECKSUM_AT)
    if computed != footer.checksum:
        raise CorruptImage(
            f"{label}: VHD footer checksum is {footer.checksum:#010x}, the footer sums to "
            f"{computed:#010x}: the footer is corrupt (if the file is a raw disk, "
            "read it as raw)"
        )
    if footer.version != VERSION_1_0:
        raise UnsupportedFormat(
            f"{label}: VHD version {footer.version >> 16}.{footer.version & 0xFFFF} is not "
            "supported (1.0 is)"
        )
    if footer.disk_type == TYPE_DIFFERENCING:
        raise UnsupportedFormat(
            f"{label}: differencing VHD (its data is only complete with its parent disk) is "
            "not supported; merge it into its parent first (Hyper-V: Merge-VHD)"
        )
    if footer.disk_type not in (TYPE_FIXED, TYPE_DYNAMIC):
        raise UnsupportedFormat(
            f"{label}: VHD disk type {footer.disk_type} is not supported (2 fixed and "
            "3 dynamic are)"
        )
    return footer


@dataclass(frozen=True)
class DynamicHeader:
    table_offset: int
    version: int
    max_table_entries: int
    block_size: int

    @property
    def bitmap_size(self) -> int:
        sectors = self.block_size // 512
        return (-(-sectors // 8) + 511) // 512 * 512


def parse_dynamic_header(raw: bytes, label: str, offset: int) -> DynamicHeader:
    if raw[:8] != DYN_COOKIE:
        raise CorruptImage(
            f"{label}: VHD dynamic header at offset {offset} has no 'cxsparse' cookie"
        )
    _, _, table_offset, version, entries, block_size, checksum, _, _ = _DYN.unpack_from(raw)
    computed = vhd_checksum(raw[:DYN_HEADER_SIZE], _DYN_CHECKSUM_AT)
    if computed != checksum:
        raise CorruptImage(
            f"{label}: VHD dynamic header checksum is {checksum:#010x}, the header sums to "
            f"{computed:#010x}: the header is corrupt"
        )
    if version != VERSION_1_0:
        raise UnsupportedFormat(
            f"{label}: VHD dynamic header version {version >> 16}.{version & 0xFFFF} is not "
            "supported (1.0 is)"
        )
    if not _MIN_BLOCK <= block_size <= _MAX_BLOCK or block_size & (block_size - 1):
        raise CorruptImage(f"{label}: VHD block size {block_size} is invalid")
    return DynamicHeader(table_offset, version, entries, block_size)


# -- the block-map reader (VHD dynamic, VDI) -------------------------------------------


class BlockImage(RangedImage):
    """The guest view of an image made of fixed-size blocks mapped into the file.

    Subclasses give :meth:`block_pieces`: for each guest block, its pieces (data
    at a host offset, or holes).  Here: pieces are clipped to the asked range,
    merged, cut where the host file has holes, grouped into host reads of at
    most ``read_size`` (tolerating gaps up to ``max_gap`` between them, such as
    VHD sector bitmaps), read, and yielded as extents with zero blocks as holes.
    A Source and a RandomAccess in one.
    """

    name = "blocks"

    def __init__(
        self, source: ByteSource, size: int, block_size: int, options: OpenOptions,
        max_gap: int = 0,
    ) -> None:
        self.source = source
        self.label = source.label
        self.size = size
        self.block_size = block_size
        self.read_size = max(4096, options.read_size)
        self.max_gap = max_gap

    def block_pieces(self, block: int) -> Iterator[Piece]:
        """The pieces of guest block ``block`` (unclipped, in guest order)."""
        raise NotImplementedError

    # -- planning ----------------------------------------------------------------------

    def pieces(self, start: int, end: int) -> Iterator[Piece]:
        """Pieces covering ``[start, end)``, clipped; holes merged, host-contiguous
        data merged."""
        bs = self.block_size
        pending: Piece | None = None
        for block in range(start // bs, -(-end // bs)):
            for guest, length, host in self.block_pieces(block):
                lo, hi = max(guest, start), min(guest + length, end)
                if lo >= hi:
                    continue
                piece = (lo, hi - lo, host if host == HOLE else host + lo - guest)
                if pending is not None:
                    if piece[2] == HOLE and pending[2] == HOLE:
                        pending = (pending[0], pending[1] + piece[1], HOLE)
                        continue
                    if HOLE not in (piece[2], pending[2]) and pending[2] + pending[1] == piece[2]:
                        pending = (pending[0], pending[1] + piece[1], pending[2])
                        continue
                    yield pending
                pending = piece
        if pending is not None:
            yield pending

    def _host_split(self, pieces: Iterator[Piece]) -> Iterator[Piece]:
        """Data pieces cut where the host file has holes (those read as zeros)."""
        for piece in pieces:
            guest, length, host = piece
            ranges = None if host == HOLE else self.source.data_ranges(host, host + length)
            if ranges is None:
                yield piece
                continue
            pos = host
            end = host + length
            for range_lo, range_hi in ranges:
                lo, hi = max(range_lo, pos), min(range_hi, end)
                if lo >= hi:
                    continue
                if lo > pos:
                    yield (guest + pos - host, lo - pos, HOLE)
                yield (guest + lo - host, hi - lo, lo)
                pos = hi
            if pos < end:
                yield (guest + pos - host, end - pos, HOLE)

    def jobs(self, start: int, end: int) -> Iterator[tuple[int, int, list[Piece]]]:
        """``(host_lo, host_hi, pieces)``: one host read of ``[host_lo, host_hi)`` that
        serves the pieces (holes among them); ``host_lo == -1``: holes only.  A read
        carries at most ``read_size`` bytes of data, plus the gaps (bitmaps) between."""
        limit = self.read_size
        group: list[Piece] = []
        holes: list[Piece] = []
        lo = hi = data = 0
        for piece in self._host_split(self.pieces(start, end)):
            if piece[2] == HOLE:
                if group:
                    holes.append(piece)
                else:
                    yield (-1, -1, [piece])
                continue
            for guest, length, host in _cut(piece, limit):
                if group and hi <= host <= hi + self.max_gap and data + length <= limit:
                    group.extend(holes)
                    group.append((guest, length, host))
                    holes = []
                    hi = host + length
                    data += length
                    continue
                if group:
                    yield (lo, hi, group)
                for hole in holes:
                    yield (-1, -1, [hole])
                holes = []
                group = [(guest, length, host)]
                lo, hi = host, host + length
                data = length
        if group:
            yield (lo, hi, group)
        for hole in holes:
            yield (-1, -1, [hole])

    # -- reading -----------------------------------------------------------------------

    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        hole_at = hole_len = 0
        for lo, hi, group in self.jobs(offset, end):
            if lo < 0:
                guest, n, _ = group[0]
                if hole_len and hole_at + hole_len == guest:
                    hole_len += n
                else:
                    if hole_len:
                        yield Extent.hole(hole_at, hole_len)
                    hole_at, hole_len = guest, n
                continue
            if hole_len:
                yield Extent.hole(hole_at, hole_len)
                hole_len = 0
            buf = memoryview(self.source.pread_exact(lo, hi - lo, "data block"))
            for guest, n, host in group:
                if host == HOLE:
                    yield Extent.hole(guest, n)
                else:
                    yield from split_zeros(Extent(guest, n, buf[host - lo : host - lo + n]))
        if hole_len:
            yield Extent.hole(hole_at, hole_len)

    def close(self) -> None:
        """The byte source is closed by the input's ``resources``."""


def _cut(piece: Piece, limit: int) -> Iterator[Piece]:
    guest, length, host = piece
    if length <= limit:
        yield piece
        return
    for pos in range(0, length, limit):
        yield (guest + pos, min(limit, length - pos), host + pos)


def bitmap_runs(bitmap: bytes, sectors: int) -> Iterator[tuple[int, int, bool]]:
    """``(first sector, count, set)`` runs of the first ``sectors`` bits, MSB first."""
    bits = int.from_bytes(bitmap, "big") >> (len(bitmap) * 8 - sectors)
    pos = 0
    # bit (sectors - 1 - i) of ``bits`` is sector i
    while pos < sectors:
        shift = sectors - 1 - pos
        value = (bits >> shift) & 1
        # length of the run of ``value`` starting at pos
        rest = bits & ((1 << (shift + 1)) - 1)
        if value:
            rest = ~rest & ((1 << (shift + 1)) - 1)
        # ``rest`` now has a 1 where the run ends (first differing bit), 0s before it
        run_end = sectors - rest.bit_length() if rest else sectors
        yield pos, run_end - pos, bool(value)
        pos = run_end


# -- VHD -------------------------------------------------------------------------------


class DynamicVhd(BlockImage):
    name = "vhd"

    def __init__(self, source: ByteSource, footer: Footer, options: OpenOptions) -> None:
        label = source.label
        if not source.random:
            raise ImageError(
                f"{label}: a dynamic VHD must be read out of order, and this source is a stream"
            )
        offset = footer.data_offset
        if offset % 512 or offset + DYN_HEADER_SIZE > source.size:
            raise CorruptImage(
                f"{label}: VHD dynamic header offset {offset} is misaligned or past the end"
            )
        raw = source.pread_exact(offset, DYN_HEADER_SIZE, "VHD dynamic header")
        self.header = h = parse_dynamic_header(raw, label, offset)
        size = footer.current_size
        super().__init__(source, size, h.block_size, options, max_gap=h.bitmap_size)
        self.footer = footer
        self.bitmap_size = h.bitmap_size
        self.sectors_per_block = h.block_size // 512
        # the bitmap of a block whose every sector is present (bits past the block: 0)
        full = (1 << self.sectors_per_block) - 1
        nbytes = -(-self.sectors_per_block // 8)
        self.full_bitmap = (full << (nbytes * 8 - self.sectors_per_block)).to_bytes(nbytes, "big")
        needed = -(-size // h.block_size)
        if h.max_table_entries < needed:
            raise CorruptImage(
                f"{label}: VHD BAT has {h.max_table_entries} entries, {needed} needed for a "
                f"disk of {size} bytes"
            )
        if needed * 4 > MAX_TABLE_BYTES:
            raise CorruptImage(f"{label}: VHD BAT of {needed} entries is absurd")
        self.bat = big_endian_u32(source.pread_exact(h.table_offset, needed * 4, "VHD BAT"))
        self.allocated = needed - self.bat.count(BAT_FREE)
        record = self.bitmap_size + h.block_size
        last = max((e for e in self.bat if e != BAT_FREE), default=None)
        if last is not None and last * 512 + record > source.size:
            raise CorruptImage(
                f"{label}: truncated: VHD block at offset {last * 512} runs past the end "
                f"({source.size} bytes)"
            )
        if self.allocated * record > source.size:
            # blocks shared (corrupt, and a way to make a small file stream a huge disk)
            raise CorruptImage(
                f"{label}: VHD BAT maps {self.allocated} blocks, the file holds "
                f"{source.size // record}"
            )

    def block_pieces(self, block: int) -> Iterator[Piece]:
        base = block * self.block_size
        entry = self.bat[block]
        if entry == BAT_FREE:
            yield (base, self.block_size, HOLE)
            return
        record = entry * 512
        data = record + self.bitmap_size
        nbytes = -(-self.sectors_per_block // 8)
        bitmap = self.source.pread_exact(record, nbytes, "VHD sector bitmap")
        if bitmap == self.full_bitmap:
            yield (base, self.block_size, data)
            return
        for first, count, present in bitmap_runs(bitmap, self.sectors_per_block):
            if present:
                yield (base + first * 512, count * 512, data + first * 512)
            else:
                yield (base + first * 512, count * 512, HOLE)

    def data_size(self) -> int:
        """Bytes of the disk in allocated blocks (sector bitmaps not looked at)."""
        total = self.allocated * self.block_size
        tail = self.size % self.block_size
        if tail and self.bat[len(self.bat) - 1] != BAT_FREE:
            total -= self.block_size - tail
        return total


class FixedVhd(RangedImage):
    """A fixed VHD's disk: the file's first ``size`` bytes (random sources)."""

    name = "vhd"

    def __init__(self, source: ByteSource, size: int) -> None:
        self.source = source
        self.size = size

    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        for ext in self.source.read_range(offset, end - offset):
            yield from split_zeros(ext)

    def data_size(self) -> int | None:
        ranges = self.source.data_ranges(0, self.size)
        return None if ranges is None else sum(hi - lo for lo, hi in ranges)


class FixedVhdStream(Source):
    """A fixed VHD read front to back: the disk, then the footer checked before the
    disk's last extent is passed on."""

    name = "vhd"

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.label = source.label
        if source.size < FOOTER_SIZE:
            raise CorruptImage(f"{self.label}: too short for a VHD ({source.size} bytes)")
        self.size = source.size - FOOTER_SIZE

    def extents(self) -> Iterator[Extent]:
        size = self.size
        footer = bytearray()
        pending: Extent | None = None
        for ext in self.source.extents():
            if ext.offset < size:
                n = min(ext.end, size) - ext.offset
                part = ext if n == ext.length else Extent(
                    ext.offset, n, None if ext.data is None else memoryview(ext.data)[:n]
                )
                if pending is not None:
                    yield from split_zeros(pending)
                pending = part
            if ext.end > size:
                lo = max(ext.offset, size) - ext.offset
                if ext.data is None:
                    footer += bytes(ext.length - lo)
                else:
                    footer += memoryview(ext.data)[lo:]
        parsed = parse_footer(bytes(footer), self.label)
        if parsed.disk_type != TYPE_FIXED or parsed.current_size != size:
            raise CorruptImage(
                f"{self.label}: the VHD footer at the end of the stream says a "
                f"{'fixed' if parsed.disk_type == TYPE_FIXED else 'dynamic'} disk of "
                f"{parsed.current_size} bytes; {size} bytes of disk came before it"
            )
        if pending is not None:
            yield from split_zeros(pending)


def _details(footer: Footer, subformat: str) -> dict[str, object]:
    return {
        "subformat": subformat,
        "creator": footer.creator_app.decode("latin-1").rstrip("\x00 "),
        "creator_version": f"{footer.creator_version >> 16}.{footer.creator_version & 0xFFFF}",
        "creator_os": footer.creator_os.decode("latin-1").rstrip("\x00 "),
        "current_size": footer.current_size,
        "chs_size": footer.chs_size,
        "geometry": f"{footer.cylinders}/{footer.heads}/{footer.sectors}",
        "size_rule": "currentSize",
    }


class VhdFormat(ImageFormat):
    name = "vhd"
    detect_order = 25

    def detect(self, head: bytes, source: ByteSource) -> bool:
        if head[:8] == COOKIE:
            return True
        tail = source.tail(FOOTER_SIZE)
        return tail is not None and tail[:8] == COOKIE

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        label = source.label
        head = source.head(FOOTER_SIZE)
        if not source.random and head[:8] != COOKIE:
            stream = FixedVhdStream(source)
            return ImageInput(
                path=label, format=self.name, size=stream.size, source=stream,
                file_size=source.size, details={"subformat": "fixed", "size_rule":
                                                "currentSize"},
                resources=[source],
            )
        footer: Footer | None = None
        if head[:8] == COOKIE:
            footer = parse_footer(head, label)
            if footer.disk_type == TYPE_FIXED:
                footer = None  # a fixed disk's data that starts like a footer: use the tail
        if footer is None:
            tail = source.tail(FOOTER_SIZE)
            if tail is None or tail[:8] != COOKIE:
                raise CorruptImage(f"{label}: not a VHD image (no 'conectix' footer)")
            footer = parse_footer(tail, label)
        if footer.disk_type == TYPE_FIXED:
            size = footer.current_size
            if size + FOOTER_SIZE > source.size:
                raise CorruptImage(
                    f"{label}: truncated: fixed VHD of {size} bytes needs a file of "
                    f"{size + FOOTER_SIZE} bytes, it has {source.size}"
                )
            fixed = FixedVhd(source, size)
            return ImageInput(
                path=label, format=self.name, size=size, source=fixed,
                data_size=fixed.data_size(), file_size=source.size, random_access=fixed,
                details=_details(footer, "fixed"), resources=[source],
            )
        image = DynamicVhd(source, footer, options)
        details = _details(footer, "dynamic")
        details.update(
            block_size=image.block_size, blocks=len(image.bat),
            allocated_blocks=image.allocated,
        )
        return ImageInput(
            path=label, format=self.name, size=image.size, source=image,
            data_size=image.data_size(), file_size=source.size, random_access=image,
            details=details, resources=[source],
        )

"""VHDX (Hyper-V): a VHDX file in, the raw virtual disk out (random access).

Detect: ``vhdxfile`` at offset 0.  Size: the metadata item Virtual Disk Size, exact.
Reads dynamic and fixed images with 512- or 4096-byte logical sectors and any
block size from 1 to 256 MiB (MS-VHDX; checked against qemu's block/vhdx.c).

How: both headers (at 64 and 128 KiB) are checked (CRC-32C over 4 KiB with the
checksum field zeroed) and the valid one with the higher sequence number is
used; the region table (192 KiB, copy at 256 KiB) gives the BAT and metadata
regions; the metadata gives the block size, the virtual size and the sector
sizes.  The BAT interleaves one sector-bitmap entry after every *chunk ratio*
payload entries (chunk ratio = 2**23 x logical sector size / block size); it is
read a chunk at a time, so memory stays bounded whatever the disk size.  Blocks
NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED (3, and 5 of pre-1.0 files) are holes
and never read; FULLY_PRESENT blocks are read at their file offset (1 MiB
units), file-contiguous blocks coalesced into reads of up to ``read_size``, the
host file's own holes skipped.  A log with an active sequence (a file Hyper-V did
not close) is replayed in memory, never written back: its data and zero
descriptors overlay the file for every read.  After each range is produced the
headers are read again; if the current header changed (sequence number, file or
data write GUID) the file changed while it was read, and the read fails before
its last extent.

Refused with UnsupportedFormat: differencing disks (HasParent, a parent
locator, PARTIALLY_PRESENT blocks), header versions other than 1, log versions
other than 0, unknown required regions or metadata items, a log too big to
replay in memory.  Refused with CorruptImage: no valid header, no valid region
table, bad metadata, a BAT too small for the disk, blocks inside the header
section, a region or the log, blocks past the end of the file, block state 4.
"""

from __future__ import annotations

import bisect
import struct
import sys
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from drivepipe._errors import CorruptImage, ImageError, UnsupportedFormat
from drivepipe._extent import Extent, split_zeros
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions
from drivepipe_plugins.formats._ranged import MagicFormat, RangedImage

VHDX_MAGIC = b"vhdxfile"
KiB, MiB = 1 << 10, 1 << 20
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
#: the file identifier, the headers and the region tables: nothing else lives here
HEADER_SECTION = 1 * MiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
MIN_BLOCK, MAX_BLOCK = 1 * MiB, 256 * MiB
MAX_VIRTUAL_SIZE = 64 << 40
SECTORS_PER_CHUNK = 1 << 23

BAT_GUID = uuid.UUID("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_GUID = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e")
FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
PAGE83_DATA = uuid.UUID("beca12ab-b2e6-4523-93ef-c309e000c746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141bf1d-a96f-4709-ba47-f233a8faab5f")
PHYSICAL_SECTOR_SIZE = uuid.UUID("cda348c7-445d-4471-9cc9-e9885251c556")
PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
ZERO_GUID = uuid.UUID(int=0)

REGION_REQUIRED = 1
METADATA_REQUIRED = 4
LEAVE_BLOCKS_ALLOCATED = 1
HAS_PARENT = 2

# BAT entry: state in bits 0-2, file offset in MiB in bits 20-63
STATE_MASK = 7
OFFSET_MASK = 0xFFFFFFFFFFF00000
FULLY_PRESENT = 6
PARTIALLY_PRESENT = 7
#: NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, and UNMAPPED as pre-1.0 files wrote it
HOLE_STATES = frozenset({0, 1, 2, 3, 5})
#: each BAT entry's low byte -> 0 hole, 1 data, 2 partially present, 3 invalid
_CLASS = bytes(
    0 if b & STATE_MASK in HOLE_STATES else 1 if b & STATE_MASK == FULLY_PRESENT
    else 2 if b & STATE_MASK == PARTIALLY_PRESENT else 3
    for b in range(256)
)
#: blocks whose BAT entries are read at once (64 KiB of BAT)
_BAT_WINDOW = 8192
#: data bytes are counted from the BAT at open only when it is this small
_DATA_SIZE_SCAN_LIMIT = 64 * MiB

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")  # 80 bytes
_REGION_HEADER = struct.Struct("<4sII")
_REGION_ENTRY = struct.Struct("<16sQII")
_METADATA_HEADER = struct.Struct("<8sHH")
_METADATA_ENTRY = struct.Struct("<16sIII")

LOG_SECTOR = 4096
#: a log is replayed in memory only up to this size (qemu and Hyper-V write 1 MiB logs)
MAX_REPLAY_LOG = 32 * MiB
_LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
_LOG_DESCRIPTOR = struct.Struct("<4s4s8sQQ")  # 32 bytes
#: log entries looked at while looking for the active sequence, at most
_LOG_WALK_BUDGET = 1 << 18
_FIX_LOG = (
    "open and close it once in Hyper-V, or replay the log with "
    "'qemu-img check -r all FILE', then try again"
)


def checksum_ok(block: bytes, crc_offset: int = 4) -> bool:
    """CRC-32C of ``block`` with its 4-byte checksum field zeroed equals that field."""
    stored = int.from_bytes(block[crc_offset : crc_offset + 4], "little")
    import crc32c  # noqa: PLC0415 - loaded when a VHDX is read, not at every start

    crc = crc32c.crc32c(block[:crc_offset])
    crc = crc32c.crc32c(b"\0\0\0\0", crc)
    return crc32c.crc32c(block[crc_offset + 4 :], crc) == stored


def guid(raw: bytes) -> uuid.UUID:
    """A GUID as MS-VHDX stores it (little-endian first three fields)."""
    return uuid.UUID(bytes_le=raw)


@dataclass(frozen=True)
class Header:
    sequence: int
    file_write: uuid.UUID
    data_write: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int

    @property
    def identity(self) -> tuple[int, uuid.UUID, uuid.UUID]:
        """What changes whenever anyone writes to the file."""
        return (self.sequence, self.file_write, self.data_write)


def parse_header(block: bytes) -> Header | None:
    """The header in a 4 KiB block, or None when its signature or CRC is wrong."""
    if len(block) != HEADER_SIZE or block[:4] != b"head" or not checksum_ok(block):
        return None
    _, _, seq, fwg, dwg, lg, log_version, version, log_len, log_off = _HEADER.unpack_from(block)
    return Header(seq, guid(fwg), guid(dwg), guid(lg), log_version, version, log_len, log_off)


def current_header(source: ByteSource, label: str) -> Header:
    """The valid header with the higher sequence number (MS-VHDX 2.2.2.1)."""
    found = [parse_header(source.pread(off, HEADER_SIZE)) for off in HEADER_OFFSETS]
    valid = [h for h in found if h is not None]
    if not valid:
        raise CorruptImage(
            f"{label}: neither VHDX header is valid (bad signature or CRC-32C at 64 KiB "
            "and 128 KiB)"
        )
    if len(valid) == 2 and valid[0].sequence == valid[1].sequence and valid[0] != valid[1]:
        raise CorruptImage(f"{label}: both VHDX headers have sequence number "
                           f"{valid[0].sequence} but differ")
    return max(valid, key=lambda h: h.sequence)


@dataclass(frozen=True)
class Region:
    offset: int
    length: int


def parse_region_table(block: bytes, label: str) -> dict[uuid.UUID, Region] | None:
    """BAT and metadata regions of a 64 KiB table; None when it is not valid."""
    if len(block) != REGION_TABLE_SIZE or block[:4] != b"regi" or not checksum_ok(block):
        return None
    _, _, count = _REGION_HEADER.unpack_from(block)
    if count > MAX_ENTRIES:
        raise CorruptImage(f"{label}: VHDX region table has {count} entries (2047 at most)")
    regions: dict[uuid.UUID, Region] = {}
    for i in range(count):
        raw_id, offset, length, flags = _REGION_ENTRY.unpack_from(block, 16 + 32 * i)
        item = guid(raw_id)
        if item in regions:
            raise CorruptImage(f"{label}: VHDX region {item} appears twice")
        if item not in (BAT_GUID, METADATA_GUID):
            if flags & REGION_REQUIRED:
                raise UnsupportedFormat(
                    f"{label}: VHDX file has a required region drivepipe does not know "
                    f"({item}); convert it with Hyper-V or qemu-img first"
                )
            continue
        regions[item] = Region(offset, length)
    for item, name in ((BAT_GUID, "BAT"), (METADATA_GUID, "metadata")):
        if item not in regions:
            raise CorruptImage(f"{label}: VHDX region table has no {name} region")
    return regions


@dataclass(frozen=True)
class Metadata:
    block_size: int
    flags: int
    size: int
    logical_sector: int
    physical_sector: int | None
    page83: uuid.UUID | None


def _metadata_items(
    source: ByteSource, region: Region, label: str
) -> dict[uuid.UUID, tuple[int, int]]:
    table = source.pread_exact(region.offset, METADATA_TABLE_SIZE, "VHDX metadata table")
    signature, _, count = _METADATA_HEADER.unpack_from(table)
    if signature != b"metadata":
        raise CorruptImage(f"{label}: VHDX metadata region has no 'metadata' signature")
    if count > MAX_ENTRIES:
        raise CorruptImage(f"{label}: VHDX metadata table has {count} entries (2047 at most)")
    items: dict[uuid.UUID, tuple[int, int]] = {}
    known = {FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83_DATA, LOGICAL_SECTOR_SIZE,
             PHYSICAL_SECTOR_SIZE, PARENT_LOCATOR}
    for i in range(count):
        raw_id, offset, length, flags = _METADATA_ENTRY.unpack_from(table, 32 + 32 * i)
        item = guid(raw_id)
        if item in items:
            raise CorruptImage(f"{label}: VHDX metadata item {item} appears twice")
        if item not in known:
            if flags & METADATA_REQUIRED:
                raise UnsupportedFormat(
                    f"{label}: VHDX file has a required metadata item drivepipe does not "
                    f"know ({item}); convert it with Hyper-V or qemu-img first"
                )
            continue
        if length and (offset < METADATA_TABLE_SIZE or offset + length > region.length):
            raise CorruptImage(
                f"{label}: VHDX metadata item {item} at {offset} (+{length}) lies outside "
                "the metadata region"
            )
        items[item] = (region.offset + offset, length)
    return items


def parse_metadata(source: ByteSource, region: Region, label: str) -> Metadata:
    """The metadata items drivepipe needs, checked (MS-VHDX 2.6)."""
    items = _metadata_items(source, region, label)

    def read(item: uuid.UUID, name: str, size: int) -> bytes | None:
        if item not in items:
            return None
        offset, length = items[item]
        if length < size:
            raise CorruptImage(f"{label}: VHDX metadata item {name} is {length} bytes, "
                               f"{size} needed")
        return source.pread_exact(offset, size, f"VHDX {name}")

    def need(item: uuid.UUID, name: str, size: int) -> bytes:
        raw = read(item, name, size)
        if raw is None:
            raise CorruptImage(f"{label}: VHDX metadata has no {name} item")
        return raw

    block_size, flags = struct.unpack("<II", need(FILE_PARAMETERS, "File Parameters", 8))
    if flags & HAS_PARENT or PARENT_LOCATOR in items:
        raise UnsupportedFormat(
            f"{label}: differencing VHDX (it has a parent disk) is not supported; merge it "
            "into its parent first (Hyper-V Edit Disk, or qemu-img convert -O vhdx)"
        )
    (size,) = struct.unpack("<Q", need(VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8))
    (logical,) = struct.unpack("<I", need(LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4))
    phys = read(PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)
    page83 = read(PAGE83_DATA, "Page 83 Data", 16)
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise CorruptImage(f"{label}: VHDX block size {block_size} is not a power of two "
                           "from 1 MiB to 256 MiB")
    if logical not in (512, 4096):
        raise CorruptImage(f"{label}: VHDX logical sector size {logical} (512 or 4096)")
    if size > MAX_VIRTUAL_SIZE or size % logical:
        raise CorruptImage(f"{label}: VHDX virtual size {size} is not a multiple of the "
                           f"{logical}-byte sector up to 64 TiB")
    return Metadata(
        block_size, flags, size, logical,
        struct.unpack("<I", phys)[0] if phys is not None else None,
        guid(page83) if page83 is not None else None,
    )


# -- the log (MS-VHDX 2.3) ---------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    offset: int
    length: int
    tail: int
    sequence: int
    flushed_file_offset: int
    last_file_offset: int
    #: (file offset, 4 KiB of data) or (file offset, zero length)
    writes: tuple[tuple[int, bytes | int], ...]


def _log_bytes(log: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes of the circular log from ``offset``."""
    end = offset + length
    if end <= len(log):
        return log[offset:end]
    return log[offset:] + log[: end - len(log)]


def parse_log_entry(log: bytes, offset: int, log_guid: uuid.UUID) -> LogEntry | None:
    """The valid log entry at ``offset`` of the log, or None (MS-VHDX 2.3.1)."""
    head = _log_bytes(log, offset, _LOG_HEADER.size)
    (signature, _, length, tail, seq, count, _, raw_guid, flushed,
     last) = _LOG_HEADER.unpack(head)
    desc_sectors = -(-(count + 2) // 128)
    if (signature != b"loge" or not 0 < length <= len(log) or length % LOG_SECTOR
            or tail % LOG_SECTOR or tail >= len(log) or seq == 0
            or guid(raw_guid) != log_guid or desc_sectors * LOG_SECTOR > length):
        return None
    entry = _log_bytes(log, offset, length)
    if not checksum_ok(entry):
        return None
    writes = _log_writes(entry, seq, count, desc_sectors * LOG_SECTOR)
    if writes is None:
        return None
    return LogEntry(offset, length, tail, seq, flushed, last, writes)


def _log_writes(
    entry: bytes, seq: int, count: int, data_at: int
) -> tuple[tuple[int, bytes | int], ...] | None:
    """The descriptors of a log entry as writes, or None if one is invalid."""
    writes: list[tuple[int, bytes | int]] = []
    for i in range(count):
        sig, trailing, leading, file_offset, dseq = _LOG_DESCRIPTOR.unpack_from(entry, 64 + 32 * i)
        valid = dseq == seq and not file_offset % LOG_SECTOR
        if valid and sig == b"zero":
            zero_length = int.from_bytes(leading, "little")
            valid = not zero_length % LOG_SECTOR
            writes.append((file_offset, zero_length))
        elif valid and sig == b"desc":
            sector = entry[data_at : data_at + LOG_SECTOR]
            valid = (len(sector) == LOG_SECTOR and sector[:4] == b"data"
                     and int.from_bytes(sector[4:8], "little") == seq >> 32
                     and int.from_bytes(sector[4092:], "little") == seq & 0xFFFFFFFF)
            writes.append((file_offset, leading + sector[8:4092] + trailing))
            data_at += LOG_SECTOR
        else:
            valid = False
        if not valid:
            return None
    return tuple(writes)


def active_sequence(log: bytes, log_guid: uuid.UUID, label: str) -> list[LogEntry]:
    """The entries to replay, oldest first; empty when no sequence is active.

    The head is the valid entry with the highest sequence number whose tail
    leads to it: from the entry at its tail, each next entry follows the one
    before it in the circular log with the next sequence number, up to the
    head.  A head whose chain breaks is passed over for the next highest.
    """
    entries = {off: e for off in range(0, len(log), LOG_SECTOR)
               if (e := parse_log_entry(log, off, log_guid)) is not None}
    budget = _LOG_WALK_BUDGET
    for head in sorted(entries.values(), key=lambda e: e.sequence, reverse=True):
        run = [entries[head.tail]] if head.tail in entries else []
        while run and run[-1] is not head and run[-1].sequence < head.sequence:
            budget -= 1
            if budget < 0:
                raise CorruptImage(f"{label}: VHDX log holds too many broken sequences")
            nxt = entries.get((run[-1].offset + run[-1].length) % len(log))
            if nxt is None or nxt.sequence != run[-1].sequence + 1:
                run = []
                break
            run.append(nxt)
        if run and run[-1] is head:
            return run
    return []


class ReplayedSource(ByteSource):
    """A byte source with a replayed log laid over it; the file itself is never written.

    Later writes win: data sectors are kept in a dict (4 KiB each, bounded by
    the log size), zeroed ranges as sorted disjoint intervals under them.
    """

    def __init__(self, base: ByteSource, entries: list[LogEntry]) -> None:
        self.base = base
        self.label = base.label
        self.random = True
        self.sectors: dict[int, bytes] = {}
        zeros: list[tuple[int, int]] = []
        size = base.size
        for entry in entries:
            for offset, what in entry.writes:
                if isinstance(what, bytes):
                    self.sectors[offset] = what
                    size = max(size, offset + LOG_SECTOR)
                    continue
                for key in [k for k in self.sectors if offset <= k < offset + what]:
                    del self.sectors[key]
                if what:
                    zeros.append((offset, offset + what))
            size = max(size, -(-entry.last_file_offset // MiB) * MiB)
        self.zeros = _merge(zeros)
        self.keys = sorted(self.sectors)
        self.size = size

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(self.base.pread(offset, end - offset))
        out += bytes(end - offset - len(out))
        for lo, hi in self.zeros[max(0, bisect.bisect_right(self.zeros, (offset,)) - 1) :]:
            if lo >= end:
                break
            a, b = max(lo, offset), min(hi, end)
            if a < b:
                out[a - offset : b - offset] = bytes(b - a)
        first = bisect.bisect_left(self.keys, offset - LOG_SECTOR + 1)
        for key in self.keys[first:]:
            if key >= end:
                break
            data = self.sectors[key]
            a, b = max(key, offset), min(key + LOG_SECTOR, end)
            out[a - offset : b - offset] = data[a - key : b - key]
        return bytes(out)

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]] | None:
        base = self.base.data_ranges(offset, min(end, self.base.size))
        if base is None:
            return None
        first = bisect.bisect_left(self.keys, offset - LOG_SECTOR + 1)
        logged = [(max(k, offset), min(k + LOG_SECTOR, end))
                  for k in self.keys[first:] if k < end]
        return iter(_merge([*base, *logged]))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def replay_log(source: ByteSource, header: Header, label: str) -> ByteSource:
    """``source`` with the header's active log sequence replayed over it, if any."""
    if header.log_offset < MiB or header.log_offset % MiB:
        raise CorruptImage(f"{label}: VHDX log offset {header.log_offset} is not a "
                           "multiple of 1 MiB past the header section")
    if header.log_guid == ZERO_GUID or header.log_length == 0:
        return source
    if header.log_length % MiB:
        raise CorruptImage(f"{label}: VHDX log length {header.log_length} is not a "
                           "multiple of 1 MiB")
    if header.log_length > MAX_REPLAY_LOG:
        raise UnsupportedFormat(
            f"{label}: VHDX log of {header.log_length >> 20} MiB may need replay, more "
            f"than drivepipe replays in memory; {_FIX_LOG}"
        )
    log = source.pread_exact(header.log_offset, header.log_length, "VHDX log")
    entries = active_sequence(log, header.log_guid, label)
    if not entries:
        return source
    if entries[-1].flushed_file_offset > source.size:
        raise CorruptImage(
            f"{label}: VHDX log says the file was {entries[-1].flushed_file_offset} bytes, "
            f"it is {source.size}: truncated"
        )
    return ReplayedSource(source, entries)


# -- the image ---------------------------------------------------------------------------


def _bat_u64(raw: bytes) -> array[int]:
    table = array("Q", raw)
    if sys.byteorder != "little":
        table.byteswap()
    return table


class VhdxImage(RangedImage):
    """Reads a VHDX file's virtual disk; a Source and a RandomAccess in one."""

    name = "vhdx"

    def __init__(self, source: ByteSource, options: OpenOptions) -> None:
        self.file = source
        self.label = label = source.label
        self.read_size = max(LOG_SECTOR, options.read_size)
        if not source.random:
            raise ImageError(f"{label}: VHDX needs random access (it cannot be streamed)")
        if source.pread(0, 8) != VHDX_MAGIC:
            raise CorruptImage(f"{label}: not a VHDX file (no 'vhdxfile' at offset 0)")
        creator = source.pread(8, 512).decode("utf-16-le", "replace").split("\0")[0]
        self.creator = "".join(c for c in creator if c.isprintable())  # shown by inspect
        self.header = h = current_header(source, label)
        if h.version != 1:
            raise UnsupportedFormat(f"{label}: VHDX version {h.version} is not supported (1 is)")
        if h.log_version != 0:
            raise UnsupportedFormat(f"{label}: VHDX log version {h.log_version} is not "
                                    "supported (0 is)")
        self.source = replay_log(source, h, label)
        self.log_replayed = self.source is not source
        regions = self._regions()
        self.bat_region = regions[BAT_GUID]
        self.meta = meta = parse_metadata(self.source, regions[METADATA_GUID], label)
        self.size = meta.size
        self.block_size = meta.block_size
        self.chunk_ratio = SECTORS_PER_CHUNK * meta.logical_sector // meta.block_size
        self.blocks = -(-meta.size // meta.block_size)
        entries = self.blocks + (self.blocks - 1) // self.chunk_ratio if self.blocks else 0
        if entries * 8 > self.bat_region.length:
            raise CorruptImage(
                f"{label}: VHDX BAT region of {self.bat_region.length} bytes is too small "
                f"for {entries} entries"
            )
        self.forbidden = sorted(
            [(0, HEADER_SECTION), (h.log_offset, h.log_offset + h.log_length)]
            + [(r.offset, r.offset + r.length) for r in regions.values()]
        )
        for (_, prev_end), (lo, _) in zip(self.forbidden, self.forbidden[1:], strict=False):
            if lo < prev_end:
                raise CorruptImage(f"{label}: VHDX log, BAT and metadata regions overlap "
                                   "each other or the header section")

    def _regions(self) -> dict[uuid.UUID, Region]:
        for offset in REGION_TABLE_OFFSETS:
            block = self.source.pread(offset, REGION_TABLE_SIZE)
            regions = parse_region_table(block, self.label)
            if regions is not None:
                return regions
        raise CorruptImage(
            f"{self.label}: neither VHDX region table is valid (bad signature or CRC-32C at "
            "192 KiB and 256 KiB)"
        )

    # -- the BAT ------------------------------------------------------------------------

    def _payload(self, first: int, count: int) -> bytes:
        """The raw (little-endian) BAT entries of blocks ``[first, first+count)``, read
        in one piece with the sector-bitmap entries between them left out."""
        cr = self.chunk_ratio
        lo = first + first // cr
        last = first + count - 1
        raw = self.source.pread_exact(
            self.bat_region.offset + 8 * lo, 8 * (last + last // cr + 1 - lo), "VHDX BAT"
        )
        if len(raw) == 8 * count:
            return raw
        pieces = []
        for chunk in range(first // cr, last // cr + 1):
            b0, b1 = max(first, chunk * cr), min(last + 1, (chunk + 1) * cr)
            at = b0 + chunk - lo
            pieces.append(raw[8 * at : 8 * (at + b1 - b0)])
        return b"".join(pieces)

    def _windows(self, first: int, last: int) -> Iterator[tuple[int, bytes, array[int]]]:
        """``(first block, state classes, entries)`` for blocks ``[first, last)``, a
        window of the BAT at a time (memory stays bounded for a 64 TiB disk)."""
        for base in range(first, last, _BAT_WINDOW):
            raw = self._payload(base, min(_BAT_WINDOW, last - base))
            yield base, raw[::8].translate(_CLASS), _bat_u64(raw)

    def _block_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int]]:
        """``(first block, block count, file offset or -1 for a hole)`` for blocks
        ``[first, last)``; holes merged, file-contiguous data blocks merged."""
        pending: list[int] | None = None  # [first, count, offset]
        for base, kinds, table in self._windows(first, last):
            i, stop = 0, len(table)
            while i < stop:
                kind = kinds[i]
                if kind == 0:
                    j = _next_non_hole(kinds, i, stop)
                    run = (base + i, j - i, -1)
                else:
                    j = i + 1
                    offset = self._data_offset(table[i], base + i, kind)
                    while j < stop and kinds[j] == 1 and (
                        table[j] & OFFSET_MASK == offset + (j - i) * self.block_size
                    ):
                        self._data_offset(table[j], base + j, 1)
                        j += 1
                    run = (base + i, j - i, offset)
                if pending is not None and _continues(pending, run, self.block_size):
                    pending[1] += run[1]
                else:
                    if pending is not None:
                        yield (pending[0], pending[1], pending[2])
                    pending = list(run)
                i = j
        if pending is not None:
            yield (pending[0], pending[1], pending[2])

    def _data_offset(self, entry: int, block: int, kind: int) -> int:
        state = entry & STATE_MASK
        if kind == 2:
            raise UnsupportedFormat(
                f"{self.label}: VHDX block {block} is PARTIALLY_PRESENT, which only "
                "differencing disks use; merge it into its parent first"
            )
        if kind != 1:
            raise CorruptImage(f"{self.label}: VHDX block {block} has invalid state {state}")
        offset = entry & OFFSET_MASK
        end = offset + self.block_size
        for lo, hi in self.forbidden:
            if offset < hi and lo < end:
                raise CorruptImage(
                    f"{self.label}: VHDX block {block} at file offset {offset} overlaps the "
                    "header section, the log or a region"
                )
        # as qemu: the whole block (the part inside the disk, for the last) must be there
        if offset + min(self.block_size, self.size - block * self.block_size) > self.source.size:
            raise CorruptImage(
                f"{self.label}: truncated: VHDX block {block} at file offset {offset} runs "
                f"past the end of the file ({self.source.size} bytes)"
            )
        return offset

    # -- reading ------------------------------------------------------------------------

    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        """The last extent is held back until the headers are read again and found
        unchanged: a file written to while it was read fails before its end."""
        held: Extent | None = None
        for ext in self._walk(offset, end):
            if held is not None:
                yield held
            held = ext
        if held is not None:
            self._check_unchanged()
            yield held

    def _walk(self, start: int, end: int) -> Iterator[Extent]:
        if start >= end:
            return
        bs = self.block_size
        for first, count, offset in self._block_runs(start // bs, -(-end // bs)):
            lo, hi = max(start, first * bs), min(end, (first + count) * bs)
            if offset < 0:
                yield Extent.hole(lo, hi - lo)
                continue
            yield from self._read_data(lo, offset + lo - first * bs, hi - lo)

    def _read_data(self, guest: int, host: int, length: int) -> Iterator[Extent]:
        """Data blocks in reads of at most ``read_size``; the file's own holes unread."""
        pos = host
        step = self.read_size
        while pos < host + length:
            n = min(step - (guest + pos - host) % step, host + length - pos)
            got = 0
            for ext in self.source.read_range(pos, n):
                got += ext.length
                moved = guest + ext.offset - host
                if ext.data is None:
                    yield Extent.hole(moved, ext.length)
                else:
                    yield from split_zeros(Extent(moved, ext.length, ext.data))
            if got != n:
                raise ImageError(f"{self.label}: file shrank while reading (at offset {pos})")
            pos += n

    def _check_unchanged(self) -> None:
        now = current_header(self.file, self.label)
        if now.identity != self.header.identity:
            raise ImageError(
                f"{self.label}: the VHDX file changed while it was read (its header was "
                "rewritten: is a VM using it?); read it again when nothing writes to it"
            )

    # -- facts --------------------------------------------------------------------------

    def data_size(self) -> int | None:
        """Virtual bytes in FULLY_PRESENT blocks, from the BAT; None for a huge BAT."""
        if self.blocks * 8 > _DATA_SIZE_SCAN_LIMIT:
            return None
        present = 0
        for base, kinds, table in self._windows(0, self.blocks):
            present += kinds.count(1)
            # refuse PARTIALLY_PRESENT and invalid states now, before anything is sent
            bad = _next_bad(kinds)
            if bad >= 0:
                self._data_offset(table[bad], base + bad, kinds[bad])
        total = present * self.block_size
        if self.blocks and self._payload(self.blocks - 1, 1)[0] & STATE_MASK == FULLY_PRESENT:
            total -= self.blocks * self.block_size - self.size
        return total

    def details(self) -> dict[str, object]:
        """Facts for ``inspect``; data and hole bytes come from ``data_size``."""
        meta = self.meta
        return {
            "subformat": "fixed" if meta.flags & LEAVE_BLOCKS_ALLOCATED else "dynamic",
            "block_size": meta.block_size,
            "logical_sector_size": meta.logical_sector,
            "physical_sector_size": meta.physical_sector,
            "chunk_ratio": self.chunk_ratio,
            "log_replayed": self.log_replayed,
            "creator": self.creator,
        }


def _next_non_hole(kinds: bytes, i: int, stop: int) -> int:
    """The first index from ``i`` whose class is not a hole, or ``stop``."""
    found = [p for p in (kinds.find(c, i, stop) for c in b"\x01\x02\x03") if p >= 0]
    return min(found, default=stop)


def _next_bad(kinds: bytes) -> int:
    """The first index whose class is partially present or invalid, or -1."""
    found = [p for p in (kinds.find(2), kinds.find(3)) if p >= 0]
    return min(found, default=-1)


def _continues(pending: list[int], run: tuple[int, int, int], block_size: int) -> bool:
    if pending[2] < 0 or run[2] < 0:
        return pending[2] < 0 and run[2] < 0
    return run[2] == pending[2] + pending[1] * block_size


class VhdxFormat(MagicFormat, ImageFormat):
    name = "vhdx"
    magic = VHDX_MAGIC
    detect_order = 20
    sequential: ClassVar[bool] = False

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        try:
            image = VhdxImage(source, options)
            data_size = image.data_size()
        except struct.error as exc:  # every unpack is bounded; this is a safety net
            raise CorruptImage(f"{source.label}: VHDX structure is truncated ({exc})") from exc
        return ImageInput(
            path=source.label, format=self.name, size=image.size, source=image,
            data_size=data_size, file_size=source.size, random_access=image,
            details=image.details(), resources=[source],
        )

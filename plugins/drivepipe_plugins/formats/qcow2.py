"""qcow2: a qcow2 image file in, the raw virtual disk out (random access).

Detect: magic ``QFI\\xfb``.  Size: the header's virtual size, exact.
Reads versions 2 and 3, cluster sizes 512 B to 2 MiB, zlib and zstd
compressed clusters, extended L2 entries (subclusters), preallocated images
(metadata, falloc, full), images with internal snapshots (the active L1 table
is the disk) and images with the dirty or corrupt bit set (as qemu-img does).

How: the L1 table is read once; each L2 table with one pread; the guest range
is walked in order.  Unallocated and zero clusters become holes and are never
read; host-contiguous data clusters are coalesced into reads of up to
``read_size``, and the host file's own holes (preallocation=metadata/falloc)
are skipped with SEEK_DATA.  Compressed clusters are read in batches and
decompressed in a small thread pool (zlib via ISA-L, zstd; both release the
GIL), with a bounded number of jobs in flight so memory stays bounded.
Decoded all-zero blocks become holes.

Refused with UnsupportedFormat: backing files, encryption, external data
files, unknown incompatible feature bits, unknown compression types, versions
other than 2 and 3.  Refused with CorruptImage: bad header fields, an L1 table
too small for the virtual size, tables or clusters outside the file,
misaligned offsets, invalid subcluster bitmaps, clusters that do not
decompress to exactly one cluster.
"""

from __future__ import annotations

import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import cast

import zstandard
from isal import igzip_lib

from drivepipe._errors import CorruptImage, UnsupportedFormat
from drivepipe._extent import Extent, rechunk, split_zeros
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions
from drivepipe_plugins.formats._parallel import Job, LazyPool, in_order
from drivepipe_plugins.formats._ranged import MagicFormat, RangedImage
from drivepipe_plugins.formats._tables import COMPRESSED, DATA, HOLE, Piece, Table, coalesce

QCOW2_MAGIC = b"QFI\xfb"
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 72..104
_MIN_CLUSTER_BITS, _MAX_CLUSTER_BITS = 9, 21
#: qemu's limits: a 32 MiB L1 table, a virtual size below 2**61 (2 EiB)
_MAX_L1_BYTES = 32 << 20
_MAX_VIRTUAL_SIZE = 1 << 61
_MAX_BACKING_NAME = 1023

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1
SUBCLUSTERS = 32
_ALL_SUBCLUSTERS = (1 << SUBCLUSTERS) - 1

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = 0x1F
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
_CRYPT_METHODS = {1: "AES", 2: "LUKS"}

# isal's stub declares IsalError as an instance (``IsalError: Exception``); it is a class.
_ISAL_ERROR = cast(type[Exception], igzip_lib.IsalError)

#: data bytes counted at open from the L2 tables only when they are this small
_DATA_SIZE_SCAN_LIMIT = 64 << 20



@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    backing_file_offset: int
    backing_file_size: int
    crypt_method: int
    nb_snapshots: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def l1_span(self) -> int:
        """Guest bytes one L1 entry (one L2 table) maps."""
        return self.l2_entries * self.cluster_size

    @property
    def l1_needed(self) -> int:
        return -(-self.size // self.l1_span)


def parse_header(data: bytes, path: str) -> Qcow2Header:
    """The header fields, or a one-line error for what is corrupt or refused."""
    if len(data) < _HEADER_V2.size or data[:4] != QCOW2_MAGIC:
        raise CorruptImage(f"{path}: not a qcow2 image (bad magic or short header)")
    (_, version, backing_off, backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     _, _, nb_snapshots, _) = _HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise UnsupportedFormat(f"{path}: qcow2 version {version} is not supported (2 and 3 are)")
    fields = {
        "version": version, "cluster_bits": cluster_bits, "size": size, "l1_size": l1_size,
        "l1_table_offset": l1_off, "backing_file_offset": backing_off,
        "backing_file_size": backing_size, "crypt_method": crypt, "nb_snapshots": nb_snapshots,
    }
    if version == 3:
        if len(data) < 104:
            raise CorruptImage(f"{path}: truncated qcow2 v3 header")
        incompat, compat, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            data, 72
        )
        if not 104 <= header_length <= 1 << _MAX_CLUSTER_BITS:
            raise CorruptImage(f"{path}: qcow2 header length {header_length} is invalid")
        fields.update(
            incompatible=incompat, compatible=compat, autoclear=autoclear,
            refcount_order=refcount_order, header_length=header_length,
            compression_type=data[104] if header_length > 104 and len(data) > 104 else 0,
        )
    return Qcow2Header(**fields)


def big_endian_u64(raw: bytes) -> Table:
    """A table of big-endian 64-bit entries as a native array."""
    table = array("Q", raw)
    if sys.byteorder == "little":
        table.byteswap()
    return table


def _check_refused(h: Qcow2Header, path: str, backing_name: str) -> None:
    if h.crypt_method:
        method = _CRYPT_METHODS.get(h.crypt_method, str(h.crypt_method))
        raise UnsupportedFormat(
            f"{path}: encrypted qcow2 ({method}) is not supported; decrypt it first with "
            "qemu-img convert"
        )
    if h.backing_file_offset:
        raise UnsupportedFormat(
            f"{path}: qcow2 image has a backing file ({backing_name!r}); flatten it first "
            "(qemu-img convert -O qcow2 image flat.qcow2)"
        )
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise UnsupportedFormat(
            f"{path}: qcow2 image keeps its data in an external data file, which is not "
            "supported; convert it with qemu-img first"
        )
    unknown = h.incompatible & ~_INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedFormat(
            f"{path}: qcow2 image uses unknown incompatible features (bits {unknown:#x})"
        )
    if h.compression_type not in COMPRESSION_TYPES:
        raise UnsupportedFormat(
            f"{path}: unknown qcow2 compression type {h.compression_type}"
        )


def _check_sane(h: Qcow2Header, path: str, file_size: int) -> None:
    if not _MIN_CLUSTER_BITS <= h.cluster_bits <= _MAX_CLUSTER_BITS:
        raise CorruptImage(f"{path}: qcow2 cluster_bits {h.cluster_bits} out of range 9..21")
    if h.size > _MAX_VIRTUAL_SIZE:
        raise CorruptImage(f"{path}: qcow2 virtual size {h.size} is absurd")
    if h.compression_type and not h.incompatible & INCOMPAT_COMPRESSION:
        raise CorruptImage(f"{path}: qcow2 compression type set without its feature bit")
    if h.l1_size < h.l1_needed:
        raise CorruptImage(
            f"{path}: qcow2 L1 table has {h.l1_size} entries, {h.l1_needed} needed for "
            f"a virtual size of {h.size}"
        )
    l1_bytes = h.l1_needed * 8
    if h.l1_size * 8 > _MAX_L1_BYTES:
        raise CorruptImage(f"{path}: qcow2 L1 table of {h.l1_size} entries is absurd")
    if h.l1_needed and (
        h.l1_table_offset % h.cluster_size or h.l1_table_offset + l1_bytes > file_size
    ):
        raise CorruptImage(
            f"{path}: qcow2 L1 table at offset {h.l1_table_offset} is misaligned or past "
            "the end of file"
        )


class ClusterDecoder:
    """Decompresses one compressed cluster to exactly ``cluster_size`` bytes."""

    def __init__(self, compression_type: int, cluster_size: int) -> None:
        self.cluster_size = cluster_size
        self._local = threading.local()
        self.decompress: Callable[[memoryview], bytes] = (
            self._zstd if compression_type == 1 else self._zlib
        )

    def _zlib(self, data: memoryview) -> bytes:
        # qemu writes raw deflate with a 4 KiB window; ISA-L reads any window size.
        dec = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_DEFLATE)
        return dec.decompress(data, self.cluster_size)

    def _zstd(self, data: memoryview) -> bytes:
        dctx = getattr(self._local, "zstd", None)
        if dctx is None:
            dctx = self._local.zstd = zstandard.ZstdDecompressor()
        # A cluster is one or more frames; the last sector may hold the next
        # cluster's bytes, so stop at one cluster of output.
        reader = dctx.stream_reader(data, read_across_frames=True)
        out = bytearray()
        while len(out) < self.cluster_size:
            piece = reader.read(self.cluster_size - len(out))
            if not piece:
                break
            out += piece
        return bytes(out)


class Qcow2Image(RangedImage):
    """Reads a qcow2 file's guest view; a Source and a RandomAccess in one."""

    name = "qcow2"

    def __init__(self, source: ByteSource, options: OpenOptions) -> None:
        self.file = source
        self.path = source.label
        self.read_size = max(4096, options.read_size)
        self.threads = max(1, options.threads)
        self._load()
        self._pool = LazyPool(self.threads, "qcow2")

    # -- opening ---------------------------------------------------------------------

    def _load(self) -> None:
        self.file_size = self.file.size
        head = self._pread(0, 4096, what="header", exact=False)
        self.header = h = parse_header(head, self.path)
        backing = ""
        if h.backing_file_offset:
            n = min(h.backing_file_size, _MAX_BACKING_NAME)
            raw = self._pread(h.backing_file_offset, n, what="backing file name", exact=False)
            backing = raw.decode("utf-8", "replace")
        _check_refused(h, self.path, backing)
        _check_sane(h, self.path, self.file_size)
        self.size = h.size
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        l1_raw = self._pread(h.l1_table_offset, h.l1_needed * 8, what="L1 table")
        self.l1 = big_endian_u64(l1_raw)
        self.decoder = ClusterDecoder(h.compression_type, h.cluster_size)
        # compressed entry layout (qcow2.txt): offset bits, then sector count
        self._c_shift = 62 - (h.cluster_bits - 8)
        self._c_offset_mask = (1 << self._c_shift) - 1
        self._c_sectors_mask = (1 << (h.cluster_bits - 8)) - 1

    def _pread(self, offset: int, length: int, *, what: str, exact: bool = True) -> bytes:
        data = self.file.pread(offset, length)
        if exact and len(data) != length:
            raise CorruptImage(
                f"{self.path}: qcow2 {what} at offset {offset} runs past the end of file"
            )
        return data

    # -- mapping: guest ranges to pieces ---------------------------------------------

    def _l2_table(self, index: int) -> Table | None:
        """The L2 entries of L1 entry ``index``; None when the range is unallocated."""
        offset = self.l1[index] & L1_OFFSET_MASK
        if offset == 0:
            return None
        if offset % self.cluster_size or offset + self.cluster_size > self.file_size:
            raise CorruptImage(
                f"{self.path}: qcow2 L2 table at offset {offset} (guest offset "
                f"{index * self.header.l1_span}) is misaligned or past the end of file"
            )
        raw = self._pread(offset, self.cluster_size, what="L2 table")
        return big_endian_u64(raw)

    def pieces(self, start: int, end: int) -> Iterator[Piece]:
        """Guest-ordered pieces covering ``[start, end)``, clipped to it."""
        span = self.header.l1_span
        for index in range(start // span, -(-end // span)):
            base = index * span
            lo, hi = max(start, base), min(end, base + span, self.size)
            table = self._l2_table(index)
            if table is None:
                yield (HOLE, lo, hi - lo, 0, 0)
                continue
            for kind, guest, length, host, csize in self._table_pieces(table, base, lo, hi):
                cut_lo, cut_hi = max(guest, lo), min(guest + length, hi)
                if cut_lo >= cut_hi:
                    continue
                shift = cut_lo - guest if kind == DATA else 0
                yield (kind, cut_lo, cut_hi - cut_lo, host + shift, csize)

    def _table_pieces(self, table: Table, base: int, lo: int, hi: int) -> Iterator[Piece]:
        cs = self.cluster_size
        first = (lo - base) >> self.cluster_bits
        last = -(-(hi - base) // cs)
        if self.header.extended_l2:
            for i in range(first, last):
                yield from self._extended(table[2 * i], table[2 * i + 1], base + i * cs)
            return
        yield from self._standard_runs(table, base, first, last)

    def _standard_runs(
        self, table: Table, base: int, first: int, last: int
    ) -> Iterator[Piece]:
        """Pieces of standard entries, runs of holes and of host-contiguous data merged.

        The hot loop of the walk: a table has up to 262144 entries, so runs are
        scanned with plain integer tests rather than one tuple per cluster.
        """
        cs = self.cluster_size
        i = first
        while i < last:
            entry = table[i]
            if entry & L2_COMPRESSED:
                yield self._compressed(entry, base + i * cs)
                i += 1
                continue
            j = i + 1
            host = entry & L2_OFFSET_MASK
            if entry & L2_ZERO or host == 0:
                while j < last and _is_hole_entry(table[j]):
                    j += 1
                yield (HOLE, base + i * cs, (j - i) * cs, 0, 0)
            else:
                expect = entry + cs
                while j < last and table[j] & _DATA_ENTRY_BITS == expect & _DATA_ENTRY_BITS:
                    expect += cs
                    j += 1
                self._check_data(host, base + i * cs)
                self._check_data(host + (j - i - 1) * cs, base + (j - 1) * cs)
                yield (DATA, base + i * cs, (j - i) * cs, host, 0)
            i = j

    def _check_data(self, host: int, guest: int) -> int:
        if host % self.cluster_size:
            raise CorruptImage(
                f"{self.path}: qcow2 data cluster for guest offset {guest} is at a "
                f"misaligned host offset {host}"
            )
        if host >= self.file_size:
            raise CorruptImage(
                f"{self.path}: qcow2 data cluster for guest offset {guest} points past "
                f"the end of file (host offset {host})"
            )
        return host

    def _compressed(self, entry: int, guest: int) -> Piece:
        coffset = entry & self._c_offset_mask
        sectors = ((entry >> self._c_shift) & self._c_sectors_mask) + 1
        csize = sectors * 512 - (coffset & 511)
        if coffset >= self.file_size:
            raise CorruptImage(
                f"{self.path}: qcow2 compressed cluster for guest offset {guest} points "
                f"past the end of file (host offset {coffset})"
            )
        # The last sector may be shared and the file may end inside it.
        return (COMPRESSED, guest, self.cluster_size, coffset,
                min(csize, self.file_size - coffset))

    def _extended(self, entry: int, bitmap: int, guest: int) -> Iterator[Piece]:
        if entry & L2_COMPRESSED:
            yield self._compressed(entry, guest)
            return
        alloc, zero = bitmap & _ALL_SUBCLUSTERS, bitmap >> SUBCLUSTERS
        host = entry & L2_OFFSET_MASK
        if alloc & zero or (alloc and host == 0):
            raise CorruptImage(
                f"{self.path}: qcow2 invalid subcluster bitmap for guest offset {guest}"
            )
        if alloc == 0:
            yield (HOLE, guest, self.cluster_size, 0, 0)
            return
        self._check_data(host, guest)
        if alloc == _ALL_SUBCLUSTERS:
            yield (DATA, guest, self.cluster_size, host, 0)
            return
        sub = self.cluster_size // SUBCLUSTERS
        for i in range(SUBCLUSTERS):
            if alloc >> i & 1:
                yield (DATA, guest + i * sub, sub, host + i * sub, 0)
            else:
                yield (HOLE, guest + i * sub, sub, 0, 0)

    # -- jobs: coalesced pieces ------------------------------------------------------

    def jobs(self, start: int, end: int) -> Iterator[Piece | list[Piece]]:
        """Holes merged; host-contiguous data merged, then cut into reads of at most
        ``read_size``; compressed clusters batched up to ``read_size`` of output."""
        return coalesce(self.pieces(start, end), self.cluster_size, self.read_size)

    # -- execution -------------------------------------------------------------------

    def extents_between(self, offset: int, end: int) -> Iterator[Extent]:
        return in_order(self._work(offset, end), self._pool)

    def _work(self, offset: int, end: int) -> Iterator[Job]:
        for job in self.jobs(offset, end):
            if isinstance(job, tuple) and job[0] == HOLE:
                yield Extent.hole(job[1], job[2])
            else:
                yield partial(self._run_job, job)

    def _run_job(self, job: Piece | list[Piece]) -> list[Extent]:
        if isinstance(job, list):
            return self._decompress_batch(job)
        return self._read_data(job[1], job[3], job[2])

    def _read_data(self, guest: int, host: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        pos = 0
        for lo, hi in self._host_data(host, host + length):
            if lo > host + pos:
                out.append(Extent.hole(guest + pos, lo - host - pos))
            data = self._pread(lo, hi - lo, what="data cluster")
            out.extend(split_zeros(Extent(guest + lo - host, hi - lo, data)))
            pos = hi - host
        if pos < length:
            out.append(Extent.hole(guest + pos, length - pos))
        return out

    def _host_data(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Ranges of ``[lo, hi)`` that hold data in the host file (all of it if unknown)."""
        # A last cluster cut short by the end of file reads as zeros there, as in qemu.
        hi = min(hi, self.file_size)
        ranges = self.file.data_ranges(lo, hi)
        if ranges is None:
            yield lo, hi
            return
        yield from ranges

    def _decompress_batch(self, batch: list[Piece]) -> list[Extent]:
        lo = min(p[3] for p in batch)
        hi = max(p[3] + p[4] for p in batch)
        total_c = sum(p[4] for p in batch)
        # One read when the clusters lie together (qemu-img writes them in order).
        span = self._pread(lo, hi - lo, what="compressed clusters") if hi - lo <= 2 * total_c \
            else None
        out = bytearray()
        for _, guest, length, host, csize in batch:
            if span is not None:
                data = memoryview(span)[host - lo : host - lo + csize]
            else:
                data = memoryview(self._pread(host, csize, what="compressed cluster"))
            within = guest % self.cluster_size  # the range may cut the cluster
            out += memoryview(self._cluster(data, guest))[within : within + length]
        # one 2 MiB cluster may exceed a small read_size: cut it
        return list(rechunk(split_zeros(Extent(batch[0][1], len(out), out)), self.read_size))

    def _cluster(self, data: memoryview, guest: int) -> bytes:
        try:
            raw = self.decoder.decompress(data)
        except (_ISAL_ERROR, zstandard.ZstdError, EOFError, ValueError) as exc:
            raise CorruptImage(
                f"{self.path}: qcow2 compressed cluster for guest offset {guest} is corrupt: "
                f"{exc}"
            ) from exc
        if len(raw) != self.cluster_size:
            raise CorruptImage(
                f"{self.path}: qcow2 compressed cluster for guest offset {guest} decodes to "
                f"{len(raw)} bytes, not {self.cluster_size}"
            )
        return raw

    # -- facts -----------------------------------------------------------------------

    def data_size(self) -> int | None:
        """Guest bytes mapped to data or compressed clusters, from the L2 tables.

        None when the tables are too big to read at open (over 64 MiB of them).
        """
        tables = [i for i, e in enumerate(self.l1) if e & L1_OFFSET_MASK]
        if len(tables) * self.cluster_size > _DATA_SIZE_SCAN_LIMIT:
            return None
        total = 0
        for index in tables:
            table = self._l2_table(index)
            assert table is not None
            total += self._allocated_bytes(table)
        return total - self._tail_overshoot()

    def _tail_overshoot(self) -> int:
        """Allocated bytes of the last cluster that lie past the virtual size."""
        cs = self.cluster_size
        tail = self.size - self.size % cs
        if tail == self.size:
            return 0
        index = tail // cs
        table = self._l2_table(index // self.header.l2_entries)
        if table is None:
            return 0
        width = 2 if self.header.extended_l2 else 1
        at = width * (index % self.header.l2_entries)
        whole = self._allocated_bytes(table[at : at + width])
        inside = sum(p[2] for p in self.pieces(tail, self.size) if p[0] != HOLE)
        return max(0, whole - inside)

    def _allocated_bytes(self, table: Table) -> int:
        cs = self.cluster_size
        if not self.header.extended_l2:
            return cs * sum(
                1 for e in table if e & L2_COMPRESSED or (e & L2_OFFSET_MASK and not e & L2_ZERO)
            )
        sub = cs // SUBCLUSTERS
        total = 0
        for entry, bitmap in zip(table[0::2], table[1::2], strict=True):
            if entry & L2_COMPRESSED:
                total += cs
            elif entry & L2_OFFSET_MASK:
                total += sub * (bitmap & _ALL_SUBCLUSTERS).bit_count()
        return total

    def details(self) -> dict[str, object]:
        h = self.header
        return {
            "qcow2_version": h.version,
            "cluster_size": h.cluster_size,
            "compression_type": COMPRESSION_TYPES.get(h.compression_type),
            "extended_l2": h.extended_l2,
            "dirty": bool(h.incompatible & INCOMPAT_DIRTY),
            "corrupt_bit": bool(h.incompatible & INCOMPAT_CORRUPT),
            "snapshots": h.nb_snapshots,
            "refcount_bits": 1 << h.refcount_order,
            "l2_tables": sum(1 for e in self.l1 if e & L1_OFFSET_MASK),
        }

    def close(self) -> None:
        self._pool.shutdown()


#: the bits that must continue a data run: the offset, the compressed and zero flags
_DATA_ENTRY_BITS = L2_OFFSET_MASK | L2_COMPRESSED | L2_ZERO


def _is_hole_entry(entry: int) -> bool:
    """A standard L2 entry that reads as zeros (unallocated or the zero flag)."""
    if entry & L2_COMPRESSED:
        return False
    return bool(entry & L2_ZERO) or not entry & L2_OFFSET_MASK


class Qcow2Format(MagicFormat, ImageFormat):
    name = "qcow2"
    magic = QCOW2_MAGIC
    detect_order = 10

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        image = Qcow2Image(source, options)
        try:
            return ImageInput(
                path=source.label,
                format=self.name,
                size=image.size,
                source=image,
                data_size=image.data_size(),
                file_size=image.file_size,
                random_access=image,
                details=image.details(),
                resources=[source],
            )
        except BaseException:
            image.close()
            raise

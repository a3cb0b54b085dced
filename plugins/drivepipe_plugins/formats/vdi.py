"""vdi: a VirtualBox VDI image in, the raw virtual disk out (random access).

Detect: the signature 0xBEDA107F (little-endian) at offset 64.  Reads
version 1.1 images, dynamic ("normal", type 1) and static ("fixed", type 2).
Size: the header's ``cbDisk``, exact, even when it is not a multiple of 512
(``VBoxManage convertfromraw`` makes such images; qemu rounds them up to a
sector, drivepipe does not add bytes the disk does not have).

Header (qemu ``block/vdi.c`` ``VdiHeader``, VirtualBox ``VDIHEADER1``):
64 signature, 68 version, 72 cbHeader, 76 type, 80 flags, 84 comment,
340 offBlocks, 344 offData, 348 legacy geometry (cylinders, heads, sectors,
cbSector at 360), 368 cbDisk u64, 376 cbBlock, 380 cbBlockExtra, 384 cBlocks,
388 cBlocksAllocated, 392 uuidCreate, 408 uuidModify, 424 uuidLinkage,
440 uuidParentModify; all little-endian.

Block map: ``cBlocks`` u32 at ``offBlocks``; 0xFFFFFFFF (free) and
0xFFFFFFFE (zero) read as zeros and are never read; block ``n`` of the data
area is at ``offData + n * (cbBlock + cbBlockExtra) + cbBlockExtra`` (the extra
bytes lead each block; qemu only writes 0 of them).  Host-contiguous blocks are
read together in reads of up to ``read_size``; host-file holes (qemu's static
images are sparse files) are skipped.

Refused with UnsupportedFormat: undo and differencing images (types 3, 4),
a linkage or parent UUID (a child of another image), other versions, sector
sizes other than 512.  Everything else wrong is a one-line CorruptImage.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from drivepipe._errors import CorruptImage, ImageError, UnsupportedFormat
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions
from drivepipe_plugins.formats.vhd import (
    HOLE,
    MAX_TABLE_BYTES,
    BlockImage,
    Piece,
    little_endian_u32,
)

SIGNATURE = 0xBEDA107F
SIGNATURE_BYTES = struct.pack("<I", SIGNATURE)
VERSION_1_1 = 0x00010001
HEADER_SIZE = 512
TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
SUBFORMATS = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "static"}
BLOCK_FREE, BLOCK_ZERO = 0xFFFFFFFF, 0xFFFFFFFE
#: cbHeader of a version 1.1 header (VDIHEADER1): the fields up to uuidParentModify
_MIN_HEADER_1_1 = 0x180
_MAX_BLOCK = 1 << 30
_MAX_EXTRA = 1 << 30

# signature, version, cbHeader, type, flags
_PRE = struct.Struct("<IIIII")
# offBlocks, offData, cylinders, heads, sectors, cbSector, unused, cbDisk, cbBlock,
# cbBlockExtra, cBlocks, cBlocksAllocated, 4 UUIDs
_MAIN = struct.Struct("<IIIIIIIQIIII16s16s16s16s")


@dataclass(frozen=True)
class VdiHeader:
    image_type: int
    flags: int
    off_blocks: int
    off_data: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks: int
    allocated: int
    uuid: uuid.UUID

    @property
    def needed(self) -> int:
        """Block map entries that cover the disk."""
        return -(-self.disk_size // self.block_size)


def parse_header(raw: bytes, label: str) -> VdiHeader:
    """The header's fields; refused and corrupt ones raise one line."""
    signature, version, header_size, image_type, flags = _PRE.unpack_from(raw, 64)
    if signature != SIGNATURE:
        raise CorruptImage(f"{label}: not a VDI image (bad signature {signature:#010x})")
    if version != VERSION_1_1:
        raise UnsupportedFormat(
            f"{label}: VDI version {version >> 16}.{version & 0xFFFF} is not supported "
            "(1.1 is)"
        )
    (off_blocks, off_data, _, _, _, sector_size, _, disk_size, block_size, extra, blocks,
     allocated, uuid_create, _, uuid_link, uuid_parent) = _MAIN.unpack_from(raw, 340)
    _check_refused(label, image_type, uuid_link, uuid_parent, sector_size)
    if header_size < _MIN_HEADER_1_1 or 72 + header_size > max(off_blocks, HEADER_SIZE):
        raise CorruptImage(f"{label}: VDI header size {header_size} is invalid")
    if not 512 <= block_size <= _MAX_BLOCK or block_size % 512:
        raise CorruptImage(f"{label}: VDI block size {block_size} is invalid")
    if extra > _MAX_EXTRA:
        raise CorruptImage(f"{label}: VDI block extra size {extra} is invalid")
    header = VdiHeader(
        image_type, flags, off_blocks, off_data, disk_size, block_size, extra, blocks,
        allocated, uuid.UUID(bytes_le=uuid_create),
    )
    if blocks < header.needed:
        raise CorruptImage(
            f"{label}: VDI block map has {blocks} entries, {header.needed} needed for a "
            f"disk of {disk_size} bytes"
        )
    if header.needed * 4 > MAX_TABLE_BYTES:
        raise CorruptImage(f"{label}: VDI block map of {header.needed} entries is absurd")
    return header


def _check_refused(
    label: str, image_type: int, uuid_link: bytes, uuid_parent: bytes, sector_size: int
) -> None:
    if image_type in (TYPE_UNDO, TYPE_DIFF):
        kind = "undo" if image_type == TYPE_UNDO else "differencing"
        raise UnsupportedFormat(
            f"{label}: {kind} VDI image (its data is only complete with its parent) is "
            "not supported; clone it to a full image first (VBoxManage clonemedium)"
        )
    if image_type not in SUBFORMATS:
        raise UnsupportedFormat(f"{label}: VDI image type {image_type} is not supported")
    if any(uuid_link) or any(uuid_parent):
        raise UnsupportedFormat(
            f"{label}: VDI image has a parent (linkage or parent UUID set) and is not "
            "supported; clone it to a full image first (VBoxManage clonemedium)"
        )
    if sector_size != 512:
        raise UnsupportedFormat(
            f"{label}: VDI sector size {sector_size} is not supported (512 is)"
        )


class VdiImage(BlockImage):
    name = "vdi"

    def __init__(self, source: ByteSource, options: OpenOptions) -> None:
        label = source.label
        if not source.random:
            raise ImageError(
                f"{label}: a VDI image must be read out of order, and this source is a stream"
            )
        raw = source.pread_exact(0, HEADER_SIZE, "VDI header")
        self.header = h = parse_header(raw, label)
        extra = h.block_extra
        super().__init__(source, h.disk_size, h.block_size, options, max_gap=min(extra, 1 << 16))
        self.image_type = h.image_type
        self.block_extra = extra
        self.stride = h.block_size + extra
        self.off_data = h.off_data
        self.uuid = h.uuid
        needed = h.needed
        blocks = h.blocks
        off_data = h.off_data
        self.map = little_endian_u32(source.pread_exact(h.off_blocks, needed * 4, "VDI block map"))
        holes = self.map.count(BLOCK_FREE) + self.map.count(BLOCK_ZERO)
        self.allocated = needed - holes
        last = max((e for e in self.map if e < BLOCK_ZERO), default=None)
        if last is not None:
            if last >= blocks:
                raise CorruptImage(
                    f"{label}: VDI block map entry {last} is past the {blocks} blocks of "
                    "the image"
                )
            end = off_data + last * self.stride + self.stride
            if end > source.size:
                raise CorruptImage(
                    f"{label}: truncated: VDI block {last} at offset {end - self.stride} "
                    f"runs past the end ({source.size} bytes)"
                )
        if self.allocated * self.stride > max(0, source.size - off_data):
            # more blocks mapped than the file holds: blocks shared (corrupt, and a way
            # to make a small file stream a huge disk of repeated data)
            raise CorruptImage(
                f"{label}: VDI block map maps {self.allocated} blocks, the file holds "
                f"{max(0, source.size - off_data) // self.stride}"
            )

    def block_pieces(self, block: int) -> Iterator[Piece]:
        entry = self.map[block]
        base = block * self.block_size
        if entry >= BLOCK_ZERO:
            yield (base, self.block_size, HOLE)
        else:
            yield (base, self.block_size, self.off_data + entry * self.stride + self.block_extra)

    def data_size(self) -> int:
        """Bytes of the disk in allocated blocks."""
        total = self.allocated * self.block_size
        tail = self.size % self.block_size
        if tail and self.map[len(self.map) - 1] < BLOCK_ZERO:
            total -= self.block_size - tail
        return total

    def details(self) -> dict[str, object]:
        return {
            "subformat": SUBFORMATS[self.image_type],
            "vdi_version": "1.1",
            "block_size": self.block_size,
            "block_extra": self.block_extra,
            "blocks": len(self.map),
            "allocated_blocks": self.allocated,
            "zero_blocks": self.map.count(BLOCK_ZERO),
            "uuid": str(self.uuid),
        }


class VdiFormat(ImageFormat):
    name = "vdi"
    detect_order = 25

    def detect(self, head: bytes, source: ByteSource) -> bool:
        return head[64:68] == SIGNATURE_BYTES

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        image = VdiImage(source, options)
        return ImageInput(
            path=source.label, format=self.name, size=image.size, source=image,
            data_size=image.data_size(), file_size=source.size, random_access=image,
            details=image.details(), resources=[source],
        )

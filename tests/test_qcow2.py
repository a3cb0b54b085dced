"""qcow2 decoding on committed fixtures made by qemu-img (no qemu-img needed).

Each fixture must decode to the raw content the fixture script generated;
corrupt images are derived from them by patching header and table fields
the way a damaged or hostile file would look.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.decode_helpers import FORMATS, copy_fixture, decode
from fixtures.make_fixtures import DISK_SIZE, disk_image, snapshot_image

from drivepipe._errors import CorruptImage, UnsupportedFormat
from drivepipe._extent import ZERO_BLOCK
from drivepipe._registry import detect, open_image
from drivepipe._stage import OpenOptions
from drivepipe_plugins.formats.qcow2 import DATA, HOLE, Qcow2Image
from drivepipe_plugins.sources.file import SparseFileReader

DRIVEPIPE = Path(sys.executable).parent / "drivepipe"
DECODABLE = ["plain.qcow2", "v2.qcow2", "zlib.qcow2", "zstd.qcow2", "extl2.qcow2"]


def patched(tmp_path: Path, name: str, offset: int, fmt: str, value: int) -> Path:
    path = copy_fixture(name, tmp_path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return path


def header_field(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


@pytest.mark.parametrize("name", DECODABLE)
def test_fixture_decodes_to_the_original(name: str) -> None:
    out = decode(FORMATS / name)
    assert out.image.format == "qcow2"
    assert out.image.size == DISK_SIZE
    assert out.content == disk_image()
    # mostly holes, found from the tables rather than from reading zeros
    assert out.hole_bytes > DISK_SIZE // 2


@pytest.mark.parametrize("name", DECODABLE)
def test_holes_are_zero_blocks_and_extents_are_bounded(name: str) -> None:
    out = decode(FORMATS / name, read_size=64 << 10)
    original = disk_image()
    for offset, length, hole in out.extents:
        if hole:
            assert original[offset : offset + length] == bytes(length)
    assert out.largest_data_extent <= 64 << 10
    # no 4 KiB-aligned all-zero block is sent as data
    for offset, length, hole in out.extents:
        if hole:
            continue
        start = -(-offset // ZERO_BLOCK) * ZERO_BLOCK
        for block in range(start, offset + length - ZERO_BLOCK + 1, ZERO_BLOCK):
            assert any(original[block : block + ZERO_BLOCK])


def test_details_describe_the_image() -> None:
    assert decode(FORMATS / "v2.qcow2").image.details["qcow2_version"] == 2
    zstd = decode(FORMATS / "zstd.qcow2").image
    assert zstd.details["compression_type"] == "zstd"
    assert zstd.details["cluster_size"] == 4096
    ext = decode(FORMATS / "extl2.qcow2").image
    assert ext.details["extended_l2"] is True
    assert ext.details["cluster_size"] == 16384


def test_data_size_comes_from_the_tables() -> None:
    image = decode(FORMATS / "plain.qcow2").image
    data = image.data_size
    assert data is not None
    original = disk_image()
    # allocated clusters, the last one clipped to the virtual size
    assert data == sum(
        len(original[c : c + 4096])
        for c in range(0, DISK_SIZE, 4096)
        if any(original[c : c + 4096])
    )


@pytest.mark.parametrize("name", DECODABLE)
def test_data_size_lies_between_the_nonzero_bytes_and_the_size(name: str) -> None:
    data = decode(FORMATS / name).image.data_size
    assert data is not None
    assert sum(1 for b in disk_image() if b) <= data <= DISK_SIZE // 4


def test_extended_l2_fixture_has_partly_allocated_clusters() -> None:
    file = SparseFileReader(str(FORMATS / "extl2.qcow2"))
    image = Qcow2Image(file, OpenOptions())
    try:
        pieces = list(image.pieces(0, image.size))
    finally:
        image.close()
        file.close()
    sub = 16384 // 32
    assert any(kind == DATA and length == sub for kind, _, length, _, _ in pieces)
    assert any(kind == HOLE and length == sub for kind, _, length, _, _ in pieces)


def test_snapshot_fixture_reads_the_active_layer() -> None:
    out = decode(FORMATS / "snapshot.qcow2")
    assert out.image.details["snapshots"] == 1
    assert out.content == snapshot_image()
    assert out.content != disk_image()


@pytest.mark.parametrize("name", ["plain.qcow2", "zlib.qcow2", "extl2.qcow2"])
def test_random_access_ranges_match(name: str) -> None:
    image = open_image(str(FORMATS / name), None, OpenOptions(read_size=8192))
    original = disk_image()
    rng = random.Random(name)
    try:
        assert image.random_access is not None
        for _ in range(40):
            offset = rng.randrange(0, DISK_SIZE)
            length = rng.randrange(1, 300_000)
            got = bytearray()
            pos = offset
            for ext in image.random_access.read_range(offset, length):
                assert ext.offset == pos
                got += bytes(ext.length) if ext.data is None else bytes(ext.data)
                pos = ext.end
            assert bytes(got) == original[offset : offset + length]
    finally:
        image.close()


def test_detected_by_magic_not_by_name(tmp_path: Path) -> None:
    path = copy_fixture("zlib.qcow2", tmp_path)
    renamed = path.rename(tmp_path / "disk.raw")
    assert detect(str(renamed)).name == "qcow2"
    assert decode(renamed).content == disk_image()


# -- refused -----------------------------------------------------------------------------


def test_backing_file_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match=r"backing file \('plain.qcow2'\)"):
        open_image(str(FORMATS / "backing.qcow2"))


def test_external_data_file_is_refused() -> None:
    with pytest.raises(UnsupportedFormat, match="external data file"):
        open_image(str(FORMATS / "datafile.qcow2"))


def test_unknown_incompatible_feature_is_refused(tmp_path: Path) -> None:
    bits = header_field(FORMATS / "plain.qcow2", 72, ">Q")
    path = patched(tmp_path, "plain.qcow2", 72, ">Q", bits | 1 << 9)
    with pytest.raises(UnsupportedFormat, match="unknown incompatible features"):
        open_image(str(path))


@pytest.mark.parametrize(("fixture", "offset", "fmt", "value", "error", "match"), [
    ("plain.qcow2", 32, ">I", 2, UnsupportedFormat, r"encrypted qcow2 \(LUKS\)"),
    ("zstd.qcow2", 104, ">B", 7, UnsupportedFormat, "unknown qcow2 compression type 7"),
    ("plain.qcow2", 4, ">I", 4, UnsupportedFormat, "version 4"),
    # a grown virtual size
    ("plain.qcow2", 24, ">Q", 1 << 40, CorruptImage, "L1 table has"),
    ("plain.qcow2", 24, ">Q", 1 << 62, CorruptImage, "absurd"),
    ("plain.qcow2", 20, ">I", 40, CorruptImage, "cluster_bits 40"),
], ids=["encryption", "unknown-compression-type", "unknown-version", "l1-table-too-small",
        "absurd-virtual-size", "bad-cluster-bits"])
def test_header_field_is_refused_at_open(tmp_path: Path, fixture: str, offset: int, fmt: str,
                                         value: int, error: type[Exception], match: str) -> None:
    path = patched(tmp_path, fixture, offset, fmt, value)
    with pytest.raises(error, match=match):
        open_image(str(path))


def test_dirty_bit_is_read_anyway(tmp_path: Path) -> None:
    bits = header_field(FORMATS / "plain.qcow2", 72, ">Q")
    path = patched(tmp_path, "plain.qcow2", 72, ">Q", bits | 1)
    out = decode(path)
    assert out.image.details["dirty"] is True
    assert out.content == disk_image()


# -- corrupt -----------------------------------------------------------------------------


def first_l2_offset(path: Path) -> tuple[int, int]:
    """(file offset of L1 entry 0, the L2 table offset it holds)."""
    l1_offset = header_field(path, 40, ">Q")
    return l1_offset, header_field(path, l1_offset, ">Q") & 0x00FFFFFFFFFFFE00


def test_l2_table_past_end_of_file_is_corrupt(tmp_path: Path) -> None:
    l1_entry, _ = first_l2_offset(FORMATS / "plain.qcow2")
    path = patched(tmp_path, "plain.qcow2", l1_entry, ">Q", (1 << 40) | (1 << 63))
    with pytest.raises(CorruptImage, match="L2 table at offset 1099511627776"):
        decode(path)


def test_data_cluster_past_end_of_file_is_corrupt(tmp_path: Path) -> None:
    _, l2 = first_l2_offset(FORMATS / "plain.qcow2")
    path = patched(tmp_path, "plain.qcow2", l2, ">Q", (1 << 40) | (1 << 63))
    with pytest.raises(CorruptImage, match="points past the end of file"):
        decode(path)


def test_compressed_cluster_that_does_not_decode_is_corrupt(tmp_path: Path) -> None:
    _, l2 = first_l2_offset(FORMATS / "zlib.qcow2")
    # the first compressed entry (incompressible clusters are stored as they are)
    index = next(
        i for i in range(512) if header_field(FORMATS / "zlib.qcow2", l2 + 8 * i, ">Q") >> 62 & 1
    )
    coffset = header_field(FORMATS / "zlib.qcow2", l2 + 8 * index, ">Q") & ((1 << 58) - 1)
    path = copy_fixture("zlib.qcow2", tmp_path)
    with open(path, "r+b") as f:
        f.seek(coffset)
        f.write(b"\xff" * 64)
    with pytest.raises(CorruptImage, match=f"compressed cluster for guest offset {index * 4096}"):
        decode(path)


@pytest.mark.parametrize("keep", [50, 300, 20_000, 45_000])
def test_truncated_file_is_corrupt_never_a_hang(tmp_path: Path, keep: int) -> None:
    path = copy_fixture("plain.qcow2", tmp_path)
    with open(path, "r+b") as f:
        f.truncate(keep)
    with pytest.raises(CorruptImage):
        decode(path)


def test_cli_prints_one_line_and_exit_code_3(tmp_path: Path) -> None:
    l1_entry, _ = first_l2_offset(FORMATS / "plain.qcow2")
    path = patched(tmp_path, "plain.qcow2", l1_entry, ">Q", 1 << 40)
    proc = subprocess.run(
        [str(DRIVEPIPE), "checksum", "--progress", "none", str(path)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "past the end of file" in lines[0]
    assert "Traceback" not in proc.stderr

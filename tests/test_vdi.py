"""VDI: conformance with qemu-img, block map markers, cbBlockExtra, odd sizes, refusals."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from fixtures.decode_helpers import decode_detected, image_digest, open_with
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_files import write_sparse
from test_vhd import (
    BIG_SIZE,
    QEMU_IMG,
    CountingSource,
    MiB,
    content,
    digest_file,
    make_raw,
    needs_qemu,
    patch,
    qemu,
    qemu_raw,
    read_at,
)

from drivepipe._errors import CorruptImage, DrivepipeError, UnsupportedFormat
from drivepipe._stage import OpenOptions
from drivepipe_plugins.formats.vdi import BLOCK_FREE, BLOCK_ZERO, VdiFormat

#: over 4 GiB, not a multiple of the 1 MiB block
ODD_SIZE = 4 * (1 << 30) + 3 * MiB + 7 * 512


def make_vdi(tmp: Path, size: int, static: bool, name: str = "d") -> tuple[Path, Path]:
    raw = make_raw(tmp / f"{name}.src.raw", size)
    vdi = tmp / f"{name}.vdi"
    qemu("convert", "-f", "raw", "-O", "vdi", *(["-o", "static=on"] if static else []), raw, vdi)
    return raw, vdi


def vdi_of(tmp: Path, size: int, pieces: list[tuple[int, bytes]]) -> tuple[Path, Path]:
    """A dynamic VDI (qemu-img) of a sparse raw disk holding ``pieces``: (raw, vdi)."""
    raw = write_sparse(tmp / "s.raw", size, pieces)
    vdi = tmp / "d.vdi"
    qemu("convert", "-f", "raw", "-O", "vdi", raw, vdi)
    return raw, vdi


def full_vdi(tmp: Path, size: int, seed: int) -> tuple[Path, Path]:
    """:func:`vdi_of` a raw disk of ``size`` random bytes."""
    return vdi_of(tmp, size, [(0, random.Random(seed).randbytes(size))])


def header(path: Path) -> dict[str, int]:
    raw = read_at(path, 0, 512)
    off_blocks, off_data = struct.unpack_from("<II", raw, 340)
    disk, block, extra, blocks, allocated = struct.unpack_from("<QIIII", raw, 368)
    return {"off_blocks": off_blocks, "off_data": off_data, "disk": disk, "block": block,
            "extra": extra, "blocks": blocks, "allocated": allocated}


def block_map(path: Path) -> list[int]:
    h = header(path)
    return list(struct.unpack(f"<{h['blocks']}I", read_at(path, h["off_blocks"], 4 * h["blocks"])))


@needs_qemu
@pytest.mark.parametrize("size", [BIG_SIZE, ODD_SIZE], ids=["5GiB", "odd"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_conformance_with_qemu_img(tmp_path: Path, static: bool, size: int) -> None:
    raw, vdi = make_vdi(tmp_path, size, static)
    image = open_with(VdiFormat(), vdi)
    try:
        assert image.size == size
        assert image.details["subformat"] == ("static" if static else "dynamic")
        assert image.details["block_size"] == MiB
        ours = image_digest(image)
        expected = qemu_raw(vdi, "vdi", tmp_path / "q.raw")
        assert expected.stat().st_size == size
        assert ours == digest_file(expected) == digest_file(raw)
        assert image.data_size is not None
        if static:
            assert image.data_size == size
        else:
            assert 0 < image.data_size < 32 * MiB
            allocated = sum(1 for e in block_map(vdi) if e < BLOCK_ZERO)
            assert image.details["allocated_blocks"] == allocated
    finally:
        image.close()


@needs_qemu
def test_static_image_host_holes_are_not_read(tmp_path: Path) -> None:
    _, vdi = make_vdi(tmp_path, BIG_SIZE, static=True)
    source = CountingSource(vdi)
    image = VdiFormat().open(source, OpenOptions())
    try:
        image_digest(image)
        assert sum(n for _, n in source.reads) < 64 * MiB
    finally:
        image.close()
        source.close()


@needs_qemu
def test_size_not_a_multiple_of_512_is_kept_exact(tmp_path: Path) -> None:
    """qemu rounds cbDisk up to a sector; drivepipe gives exactly cbDisk bytes."""
    size = 8 * MiB
    raw, vdi = full_vdi(tmp_path, size, seed=2)
    odd = size - 100
    patch(vdi, 368, struct.pack("<Q", odd))
    image = open_with(VdiFormat(), vdi)
    try:
        assert image.size == odd
        ours = content(image)
        theirs = qemu_raw(vdi, "vdi", tmp_path / "q.raw").read_bytes()
        assert len(theirs) == size  # rounded up to 512
        assert ours == theirs[:odd] == raw.read_bytes()[:odd]
        assert image.data_size == odd
    finally:
        image.close()


@needs_qemu
def test_zero_and_free_markers_are_holes_never_read(tmp_path: Path) -> None:
    size = 8 * MiB
    raw, vdi = full_vdi(tmp_path, size, seed=4)
    h = header(vdi)
    entries = block_map(vdi)
    assert entries[:8] == list(range(8))
    patch(vdi, h["off_blocks"] + 4 * 2, struct.pack("<I", BLOCK_ZERO))
    patch(vdi, h["off_blocks"] + 4 * 5, struct.pack("<I", BLOCK_FREE))
    expected = bytearray(raw.read_bytes())
    expected[2 * MiB : 3 * MiB] = bytes(MiB)
    expected[5 * MiB : 6 * MiB] = bytes(MiB)
    source = CountingSource(vdi)
    image = VdiFormat().open(source, OpenOptions())
    try:
        assert content(image) == bytes(expected)
        assert image.details["zero_blocks"] == 1
        assert image.data_size == 6 * MiB
        for block in (2, 5):
            lo = h["off_data"] + block * MiB
            assert not any(o < lo + MiB and o + n > lo for o, n in source.reads)
        # host-contiguous blocks 0-1 and 6-7 are read together, 3-4 too
        assert len([n for _, n in source.reads if n > 4096]) == 3
    finally:
        image.close()
        source.close()


@needs_qemu
def test_block_extra_leads_each_block(tmp_path: Path) -> None:
    """cbBlockExtra bytes precede each block's data (VirtualBox); qemu only writes 0."""
    size = 6 * MiB + 4096
    rng = random.Random(6)
    raw, vdi = vdi_of(tmp_path, size, [(0, rng.randbytes(MiB + 5)),
                                       (4 * MiB, rng.randbytes(MiB))])
    h = header(vdi)
    entries = block_map(vdi)
    extra = 4096
    data = vdi.read_bytes()
    out = bytearray(data[: h["off_data"]])
    struct.pack_into("<I", out, 380, extra)
    for n in range(h["allocated"]):
        out += b"\xee" * extra  # service data: must not show in the disk
        out += data[h["off_data"] + n * MiB : h["off_data"] + (n + 1) * MiB]
    crafted = tmp_path / "extra.vdi"
    crafted.write_bytes(bytes(out))
    assert sum(1 for e in entries if e < BLOCK_ZERO) == h["allocated"] == 3
    image = open_with(VdiFormat(), crafted)
    try:
        assert image.details["block_extra"] == extra
        assert content(image) == raw.read_bytes()
        assert content(image, MiB - 10, 30) == read_at(raw, MiB - 10, 30)
    finally:
        image.close()


@needs_qemu
def test_random_access_ranges(tmp_path: Path) -> None:
    size = 24 * MiB + 512
    rng = random.Random(8)
    raw, vdi = vdi_of(tmp_path, size, [(rng.randrange(size - 200_000), rng.randbytes(200_000))
                                       for _ in range(10)])
    expected = raw.read_bytes()
    image = open_with(VdiFormat(), vdi, read_size=512 * 1024)
    try:
        for _ in range(40):
            lo = rng.randrange(size)
            n = min(rng.randint(1, 3 * MiB), size - lo)
            assert content(image, lo, n) == expected[lo : lo + n]
    finally:
        image.close()


@pytest.fixture
def small_vdi(tmp_path: Path) -> Path:
    _, vdi = make_vdi(tmp_path, 4 * MiB, static=False, name="small")
    return vdi


@needs_qemu
@pytest.mark.parametrize(
    ("offset", "value", "error", "match"),
    [
        (76, struct.pack("<I", 3), UnsupportedFormat, "undo VDI"),
        (76, struct.pack("<I", 4), UnsupportedFormat, "differencing VDI"),
        (76, struct.pack("<I", 7), UnsupportedFormat, "type 7"),
        (424, b"\x01" * 16, UnsupportedFormat, "parent"),
        (440, b"\x01" * 16, UnsupportedFormat, "parent"),
        (68, struct.pack("<I", 0x00010000), UnsupportedFormat, r"version 1\.0"),
        (360, struct.pack("<I", 4096), UnsupportedFormat, "sector size 4096"),
        (376, struct.pack("<I", 1000), CorruptImage, "block size 1000"),
        (384, struct.pack("<I", 2), CorruptImage, "2 entries, 4 needed"),
        (72, struct.pack("<I", 16), CorruptImage, "header size"),
    ],
)
def test_refused(
    small_vdi: Path, offset: int, value: bytes, error: type[Exception], match: str
) -> None:
    patch(small_vdi, offset, value)
    with pytest.raises(error, match=match) as info:
        open_with(VdiFormat(), small_vdi)
    assert "\n" not in str(info.value)


@needs_qemu
def test_corrupt_map_and_truncation(small_vdi: Path) -> None:
    h = header(small_vdi)
    original = small_vdi.read_bytes()
    patch(small_vdi, h["off_blocks"], struct.pack("<I", 4))
    with pytest.raises(CorruptImage, match="past the 4 blocks"):
        open_with(VdiFormat(), small_vdi)
    small_vdi.write_bytes(original[: len(original) - 1000])
    with pytest.raises(CorruptImage, match="truncated"):
        open_with(VdiFormat(), small_vdi)


@pytest.fixture(scope="module")
def fuzz_vdis(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, bytes]:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    tmp = tmp_path_factory.mktemp("vdifuzz")
    rng = random.Random(1)
    raw = write_sparse(tmp / "s.raw", 5 * MiB, [(0, rng.randbytes(3000)), (3 * MiB, b"y" * 7000)])
    out = {}
    for static in (False, True):
        vdi = tmp / f"{static}.vdi"
        qemu("convert", "-f", "raw", "-O", "vdi", *(["-o", "static=on"] if static else []),
             raw, vdi)
        out[static] = vdi.read_bytes()
    return out


def test_fuzz_no_traceback_no_hang(fuzz_vdis: dict[bool, bytes], tmp_path: Path) -> None:
    # header fields and the start of the block map, little-endian words hit hard
    interesting = [64, 68, 72, 76, 340, 344, 360, 368, 372, 376, 380, 384, 388, 424, 440]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        static=st.booleans(),
        edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=6),
        words=st.lists(
            st.tuples(st.sampled_from(interesting), st.integers(0, 2**32 - 1)), max_size=3
        ),
        cut=st.integers(0, 3),
    )
    def run(static: bool, edits: list[tuple[int, int]], words: list[tuple[int, int]],
            cut: int) -> None:
        data = bytearray(fuzz_vdis[static])
        for at, value in edits:
            data[at] = value
        for at, value in words:
            struct.pack_into("<I", data, at, value)
        if cut:
            del data[len(data) - cut * 700_000 :]
        path = tmp_path / "f.vdi"
        path.write_bytes(bytes(data))
        result = decode_detected(VdiFormat(), path, read_size=256 * 1024)
        if isinstance(result, DrivepipeError):
            assert "\n" not in str(result)

    run()


def test_detect() -> None:
    head = bytes(64) + struct.pack("<I", 0xBEDA107F) + bytes(100)
    assert VdiFormat().detect(head, None)  # type: ignore[arg-type]
    assert not VdiFormat().detect(bytes(512), None)  # type: ignore[arg-type]

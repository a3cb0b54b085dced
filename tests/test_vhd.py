"""VHD (qemu's vpc): conformance with qemu-img, the size rule, hand-made images, refusals."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from fixtures.decode_helpers import (
    checked,
    decode_detected,
    image_digest,
    open_with,
    stream_digest,
    walk,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_files import write_sparse

from drivepipe._errors import CorruptImage, DrivepipeError, UnsupportedFormat
from drivepipe._extent import Extent
from drivepipe._stage import ByteSource, ImageInput, OpenOptions
from drivepipe.cli import main
from drivepipe.server import RunningServer
from drivepipe_plugins.formats.vhd import (
    BAT_FREE,
    FOOTER_SIZE,
    VhdFormat,
    bitmap_runs,
    parse_footer,
    vhd_checksum,
)
from drivepipe_plugins.sources.file import SparseFileReader

QEMU_IMG = shutil.which("qemu-img")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")

MiB = 1 << 20
GiB = 1 << 30
#: over 4 GiB (sparse), not a multiple of the 2 MiB block or of 1 MiB
ODD_SIZE = 4 * GiB + 3 * MiB + 7 * 512
BIG_SIZE = 5 * GiB


# -- helpers (test_vdi.py imports them) -------------------------------------------------


def make_raw(path: Path, size: int, seed: int = 0) -> Path:
    """A sparse raw disk with data at the start, across 4 GiB, and in the last MiB."""
    rng = random.Random(seed)
    pieces = [
        (0, rng.randbytes(3 * MiB + 1000)),
        (size - MiB - 777, rng.randbytes(MiB + 777)),
    ]
    if size > 4 * GiB + 4 * MiB:
        pieces.append((4 * GiB - 5000, rng.randbytes(2 * MiB + 7)))
    for _ in range(4):
        n = rng.randint(1, 300_000)
        pieces.append((rng.randrange(0, size - n), rng.randbytes(n)))
    return write_sparse(path, size, pieces)


def qemu(*args: str | Path) -> None:
    assert QEMU_IMG is not None
    subprocess.run([QEMU_IMG, *map(str, args)], check=True, capture_output=True)


def qemu_raw(image: Path, qemu_format: str, out: Path) -> Path:
    qemu("convert", "-f", qemu_format, "-O", "raw", image, out)
    return out


def raw_then_zeros(raw: Path, size: int) -> str:
    """The digest of the file ``raw`` followed by zeros up to ``size`` bytes."""
    reader = SparseFileReader(str(raw))
    try:
        extents = list(reader.extents())
        if size > reader.size:
            extents.append(Extent.hole(reader.size, size - reader.size))
    finally:
        reader.close()
    return stream_digest(extents, size)


def digest_file(path: Path, length: int | None = None) -> str:
    reader = SparseFileReader(str(path))
    try:
        n = reader.size if length is None else length
        return stream_digest(reader.read_range(0, n), n)
    finally:
        reader.close()


def content(image: ImageInput, offset: int = 0, length: int | None = None) -> bytes:
    n = image.size - offset if length is None else length
    assert image.random_access is not None
    out = bytearray(n)
    for ext in checked(image.random_access.read_range(offset, n), offset, offset + n):
        if ext.data is not None:
            out[ext.offset - offset : ext.end - offset] = ext.data
    return bytes(out)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class CountingSource(ByteSource):
    """A file source that records every pread."""

    def __init__(self, path: Path) -> None:
        self.inner = SparseFileReader(str(path))
        self.size = self.inner.size
        self.label = str(path)
        self.reads: list[tuple[int, int]] = []

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.inner.pread(offset, length)

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]] | None:
        return self.inner.data_ranges(offset, end)

    def close(self) -> None:
        self.inner.close()


# -- VHD footer helpers ---------------------------------------------------------------


def footer_offsets(path: Path) -> list[int]:
    """Where the footer copies are: the end, and offset 0 for dynamic disks."""
    size = path.stat().st_size
    offsets = [size - FOOTER_SIZE]
    if read_at(path, 0, 8) == b"conectix":
        offsets.append(0)
    return offsets


def patch_footer(path: Path, fix: bool = True, **fields: int | bytes) -> None:
    """Change footer fields (in every copy) and fix the checksum unless ``fix=False``."""
    layout = {
        "version": (12, ">I"), "creator_app": (28, "4s"), "current_size": (48, ">Q"),
        "cylinders": (56, ">H"), "heads": (58, ">B"), "sectors": (59, ">B"),
        "disk_type": (60, ">I"), "timestamp": (24, ">I"),
    }
    for at in footer_offsets(path):
        raw = bytearray(read_at(path, at, FOOTER_SIZE))
        for name, value in fields.items():
            off, fmt = layout[name]
            struct.pack_into(fmt, raw, off, value)
        if fix:
            struct.pack_into(">I", raw, 64, vhd_checksum(bytes(raw), 64))
        patch(path, at, bytes(raw))


def dyn_header_offset(path: Path) -> int:
    return int(struct.unpack(">Q", read_at(path, 16, 8))[0])


def patch_dyn_header(path: Path, offset: int, data: bytes, fix: bool = True) -> None:
    at = dyn_header_offset(path)
    raw = bytearray(read_at(path, at, 1024))
    raw[offset : offset + len(data)] = data
    if fix:
        struct.pack_into(">I", raw, 36, vhd_checksum(bytes(raw), 36))
    patch(path, at, bytes(raw))


def bat(path: Path) -> list[int]:
    at = dyn_header_offset(path)
    table_offset, _, entries = struct.unpack(">QII", read_at(path, at + 16, 16))
    return list(struct.unpack(f">{entries}I", read_at(path, table_offset, 4 * entries)))


def make_vhd(tmp: Path, size: int, subformat: str, force_size: bool, name: str = "d") -> tuple[
    Path, Path
]:
    raw = make_raw(tmp / f"{name}.src.raw", size)
    vhd = tmp / f"{name}.vhd"
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    qemu("convert", "-f", "raw", "-O", "vpc", "-o", opts, raw, vhd)
    return raw, vhd


# -- conformance ------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("size", [BIG_SIZE, ODD_SIZE], ids=["5GiB", "odd"])
@pytest.mark.parametrize("force_size", [False, True], ids=["chs", "force_size"])
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_conformance_with_qemu_img(
    tmp_path: Path, subformat: str, force_size: bool, size: int
) -> None:
    raw, vhd = make_vhd(tmp_path, size, subformat, force_size)
    image = open_with(VhdFormat(), vhd)
    try:
        footer = parse_footer(read_at(vhd, vhd.stat().st_size - 512, 512), "t")
        assert footer.creator_app == (b"qem2" if force_size else b"qemu")
        assert image.details["subformat"] == subformat
        assert image.size == footer.current_size
        # qemu-made images: currentSize and qemu's rule agree, so the outputs are equal
        assert footer.qemu72_size == footer.current_size
        expected = qemu_raw(vhd, "vpc", tmp_path / "q.raw")
        assert expected.stat().st_size == image.size
        ours = image_digest(image)
        assert ours == digest_file(expected)
        if force_size:
            # force_size keeps the size asked for: the disk is the source, exactly
            assert image.size == size
            assert ours == digest_file(raw)
        else:
            # without it qemu-img rounds the size up to a CHS geometry (and writes that as
            # currentSize): the disk is the source plus zeros
            assert image.size == footer.chs_size >= size
            assert ours == raw_then_zeros(raw, image.size)
        assert image.data_size is not None
        assert 0 < image.data_size < 64 * MiB
        assert image.file_size == vhd.stat().st_size
    finally:
        image.close()


def qemu_major() -> int:
    out = subprocess.run(
        [QEMU_IMG or "qemu-img", "--version"], check=True, capture_output=True, text=True
    )
    return int(out.stdout.split()[2].split(".")[0])


def qemu_uses_chs(creator: bytes) -> bool:
    """block/vpc.c: which creators qemu-img sizes by the CHS geometry."""
    if qemu_major() >= 10:
        return creator in (b"vpc ", b"qemu")
    return creator not in (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\x00")


@needs_qemu
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize(
    "creator", [b"vbox", b"qemu", b"wa\x00\x00", b"win "], ids=["vbox", "qemu", "azure", "hyperv"]
)
def test_size_rule_is_current_size(tmp_path: Path, subformat: str, creator: bytes) -> None:
    """A footer whose geometry covers less than currentSize: drivepipe's disk is
    currentSize bytes whatever the creator; qemu-img's is cut at the CHS size for the
    creators it sizes by geometry, and is then exactly ours up to that size."""
    size = 64 * MiB
    raw, vhd = make_vhd(tmp_path, size, subformat, force_size=True)
    # the VHD spec's geometry for 64 MiB is 963/8/17: 67,055,616 bytes, 53,248 short
    patch_footer(vhd, creator_app=creator, cylinders=963, heads=8, sectors=17)
    chs = 963 * 8 * 17 * 512
    assert chs == size - 53248
    image = open_with(VhdFormat(), vhd)
    try:
        assert image.size == size
        assert image.details["chs_size"] == chs
        assert image.details["current_size"] == size
        ours = content(image)
        assert ours == read_at(raw, 0, size)
        theirs = qemu_raw(vhd, "vpc", tmp_path / "q.raw").read_bytes()
        if qemu_uses_chs(creator):
            # exactly the documented difference: qemu's disk is ours cut at the CHS size,
            # and what it drops is the source's data (not zeros)
            assert len(theirs) == chs
            assert theirs == ours[:chs]
            assert ours[chs:] == read_at(raw, chs, size - chs) != bytes(size - chs)
        else:
            assert theirs == ours
    finally:
        image.close()


# -- dynamic VHD internals --------------------------------------------------------------


@needs_qemu
def test_partly_clear_sector_bitmap_reads_zeros(tmp_path: Path) -> None:
    size = 16 * MiB
    rng = random.Random(7)
    data = rng.randbytes(6 * MiB)
    raw = write_sparse(tmp_path / "src.raw", size, [(0, data)])
    vhd = tmp_path / "d.vhd"
    qemu("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", raw, vhd)
    entries = bat(vhd)
    assert entries[:3] != [BAT_FREE] * 3
    expected = bytearray(read_at(raw, 0, size))
    # block 0: clear sectors 8..15 (byte 1), a mixed byte (sectors 24..31), the last 64
    patch(vhd, entries[0] * 512 + 1, b"\x00")
    patch(vhd, entries[0] * 512 + 3, bytes([0b10100101]))
    patch(vhd, entries[0] * 512 + 504, bytes(8))
    for sector in [*range(8, 16), 25, 27, 28, 30, *range(4096 - 64, 4096)]:
        expected[sector * 512 : sector * 512 + 512] = bytes(512)
    # block 1: every bit clear; the block reads as zeros and is not read
    patch(vhd, entries[1] * 512, bytes(512))
    expected[2 * MiB : 4 * MiB] = bytes(2 * MiB)
    source = CountingSource(vhd)
    image = VhdFormat().open(source, OpenOptions())
    try:
        got = content(image)
        assert got == bytes(expected)
        block1 = entries[1] * 512 + 512
        assert not any(lo < block1 + 2 * MiB and lo + n > block1 for lo, n in source.reads)
        # a range inside a block, cut by the bitmap
        assert content(image, 24 * 512 + 100, 4000) == bytes(expected[24 * 512 + 100 :][:4000])
    finally:
        image.close()
        source.close()


def test_bitmap_runs() -> None:
    assert list(bitmap_runs(b"\xff", 8)) == [(0, 8, True)]
    assert list(bitmap_runs(b"\x00\xff", 16)) == [(0, 8, False), (8, 8, True)]
    assert list(bitmap_runs(bytes([0b10100101]), 8)) == [
        (0, 1, True), (1, 1, False), (2, 1, True), (3, 2, False), (5, 1, True),
        (6, 1, False), (7, 1, True),
    ]
    # bits past the block (padding) do not count
    assert list(bitmap_runs(b"\xc0", 2)) == [(0, 2, True)]
    assert list(bitmap_runs(b"\x40", 2)) == [(0, 1, False), (1, 1, True)]


@needs_qemu
def test_dense_reads_are_coalesced_and_holes_never_read(tmp_path: Path) -> None:
    size = 5 * GiB
    rng = random.Random(3)
    raw = write_sparse(
        tmp_path / "src.raw", size, [(0, rng.randbytes(16 * MiB)), (4 * GiB, rng.randbytes(MiB))]
    )
    vhd = tmp_path / "d.vhd"
    qemu("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic", raw, vhd)
    source = CountingSource(vhd)
    image = VhdFormat().open(source, OpenOptions(read_size=4 * MiB))
    try:
        source.reads.clear()
        assert image_digest(image) == raw_then_zeros(raw, image.size)
        big = [n for _, n in source.reads if n > 4096]
        # 4 MiB of data and the 512-byte bitmap between two blocks
        assert max(big) == 4 * MiB + 512
        # 17 MiB of data in 9 blocks: 2 MiB reads would take 9; together, 5 or 6
        assert len(big) <= 6
        read_bytes = sum(n for _, n in source.reads)
        assert read_bytes < 20 * MiB
        assert image.data_size == 9 * 2 * MiB
    finally:
        image.close()
        source.close()


@needs_qemu
def test_random_access_ranges(tmp_path: Path) -> None:
    size = 40 * MiB + 512 * 3
    rng = random.Random(5)
    raw = write_sparse(
        tmp_path / "src.raw", size,
        [(rng.randrange(size - 300_000), rng.randbytes(300_000)) for _ in range(12)],
    )
    vhd = tmp_path / "d.vhd"
    qemu("convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", raw, vhd)
    expected = raw.read_bytes()
    image = open_with(VhdFormat(), vhd, read_size=1 * MiB)
    try:
        for _ in range(40):
            lo = rng.randrange(size)
            n = rng.randint(1, 5 * MiB)
            n = min(n, size - lo)
            assert content(image, lo, n) == expected[lo : lo + n]
    finally:
        image.close()


# -- refusals ---------------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_differencing_refused(tmp_path: Path, subformat: str) -> None:
    _, vhd = make_vhd(tmp_path, 8 * MiB, subformat, force_size=True)
    patch_footer(vhd, disk_type=4)
    with pytest.raises(UnsupportedFormat, match="differencing VHD"):
        open_with(VhdFormat(), vhd)


@needs_qemu
@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"disk_type": 5}, UnsupportedFormat, "disk type 5"),
        ({"disk_type": 1}, UnsupportedFormat, "disk type 1"),
        ({"version": 0x00020000}, UnsupportedFormat, r"version 2\.0"),
    ],
)
def test_unknown_types_and_versions_refused(
    tmp_path: Path, fields: dict[str, int], error: type[Exception], match: str
) -> None:
    _, vhd = make_vhd(tmp_path, 8 * MiB, "dynamic", force_size=True)
    patch_footer(vhd, **fields)
    with pytest.raises(error, match=match) as info:
        open_with(VhdFormat(), vhd)
    assert "\n" not in str(info.value)


@needs_qemu
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_bad_footer_checksum_refused(tmp_path: Path, subformat: str) -> None:
    _, vhd = make_vhd(tmp_path, 8 * MiB, subformat, force_size=True)
    patch_footer(vhd, fix=False, timestamp=12345)
    with pytest.raises(CorruptImage, match="VHD footer checksum") as info:
        open_with(VhdFormat(), vhd)
    assert "\n" not in str(info.value)


@needs_qemu
def test_dynamic_header_checks(tmp_path: Path) -> None:
    _, vhd = make_vhd(tmp_path, 8 * MiB, "dynamic", force_size=True)
    original = vhd.read_bytes()
    patch_dyn_header(vhd, 24, b"\x00\x01\x00\x07", fix=False)
    with pytest.raises(CorruptImage, match="dynamic header checksum"):
        open_with(VhdFormat(), vhd)
    vhd.write_bytes(original)
    patch_dyn_header(vhd, 24, struct.pack(">I", 0x00020000))
    with pytest.raises(UnsupportedFormat, match=r"dynamic header version 2\.0"):
        open_with(VhdFormat(), vhd)
    vhd.write_bytes(original)
    patch_dyn_header(vhd, 32, struct.pack(">I", 3 * MiB))
    with pytest.raises(CorruptImage, match="block size"):
        open_with(VhdFormat(), vhd)
    vhd.write_bytes(original)
    patch_dyn_header(vhd, 28, struct.pack(">I", 3))
    with pytest.raises(CorruptImage, match="BAT has 3 entries, 4 needed"):
        open_with(VhdFormat(), vhd)


@needs_qemu
@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_truncated_refused_at_open(tmp_path: Path, subformat: str) -> None:
    _, vhd = make_vhd(tmp_path, 8 * MiB, subformat, force_size=True)
    with open(vhd, "r+b") as f:
        f.truncate(vhd.stat().st_size - 4096)
    if subformat == "fixed":
        # the footer is gone with the end of the file: what is left is not a VHD
        source = SparseFileReader(str(vhd))
        assert not VhdFormat().detect(source.head(), source)
        source.close()
        return
    with pytest.raises(CorruptImage, match="truncated"):
        open_with(VhdFormat(), vhd)


def test_fixed_stream_checks_the_footer_before_the_last_byte(tmp_path: Path) -> None:
    """A sequential source (a decoded stream): the disk streams, the footer is checked
    before the disk's last extent is passed on."""
    rng = random.Random(1)
    disk = rng.randbytes(3 * MiB)
    footer = bytearray(512)
    struct.pack_into(">8sIIQI4sI4sQQHBBI", footer, 0, b"conectix", 2, 0x10000, 2**64 - 1, 0,
                     b"win ", 0x60001, b"Wi2k", len(disk), len(disk), 0, 0, 0, 2)
    struct.pack_into(">I", footer, 64, vhd_checksum(bytes(footer), 64))

    class Stream(ByteSource):
        random = False

        def __init__(self, data: bytes) -> None:
            self.data, self.size, self.label = data, len(data), "stream"

        def head(self, length: int = 4096) -> bytes:
            return self.data[:length]

        def extents(self) -> Iterator[Extent]:
            for pos in range(0, self.size, 1000_000):
                yield Extent(pos, min(1000_000, self.size - pos), self.data[pos : pos + 1000_000])

    image = VhdFormat().open(Stream(disk + bytes(footer)), OpenOptions())
    assert image.size == len(disk)
    got = b"".join(
        bytes(e.data) if e.data is not None else bytes(e.length)
        for e in checked(image.source.extents(), 0, len(disk))
    )
    assert got == disk
    bad = bytearray(footer)
    struct.pack_into(">Q", bad, 48, len(disk) + 512)
    struct.pack_into(">I", bad, 64, vhd_checksum(bytes(bad), 64))
    image = VhdFormat().open(Stream(disk + bytes(bad)), OpenOptions())
    seen = 0
    with pytest.raises(CorruptImage, match="footer at the end of the stream"):
        for ext in image.source.extents():
            seen = ext.end
    assert seen < len(disk)


# -- fuzz -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vhds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    tmp = tmp_path_factory.mktemp("vhdfuzz")
    out = {}
    rng = random.Random(9)
    raw = write_sparse(tmp / "s.raw", 6 * MiB, [(0, rng.randbytes(5000)), (4 * MiB, b"x" * 9000)])
    for sub in ("dynamic", "fixed"):
        vhd = tmp / f"{sub}.vhd"
        qemu("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub},force_size=on", raw, vhd)
        out[sub] = vhd.read_bytes()
    return out


def _fix_checksums(data: bytearray) -> None:
    for at in (0, len(data) - 512):
        if data[at : at + 8] == b"conectix":
            struct.pack_into(">I", data, at + 64, vhd_checksum(bytes(data[at : at + 512]), 64))
    if data[512:520] == b"cxsparse":
        struct.pack_into(">I", data, 512 + 36, vhd_checksum(bytes(data[512:1536]), 36))


def walk_small(image: ImageInput) -> int:
    assert image.size < 1 << 40
    return walk(image)


def _hypothesis_fuzz(small_vhds: dict[str, bytes], tmp_path: Path) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        sub=st.sampled_from(["dynamic", "fixed"]),
        edits=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), max_size=8),
        tail_edits=st.lists(st.tuples(st.integers(1, 512), st.integers(0, 255)), max_size=4),
        fix=st.booleans(),
        cut=st.integers(0, 3),
    )
    def run(sub: str, edits: list[tuple[int, int]], tail_edits: list[tuple[int, int]],
            fix: bool, cut: int) -> None:
        data = bytearray(small_vhds[sub])
        for at, value in edits:
            data[at] = value
        for back, value in tail_edits:
            data[len(data) - back] = value
        if fix:
            _fix_checksums(data)
        if cut:
            del data[len(data) - cut * 100_000 :]
        path = tmp_path / "f.vhd"
        path.write_bytes(bytes(data))
        result = decode_detected(VhdFormat(), path, walk_small, read_size=256 * 1024)
        if isinstance(result, DrivepipeError):
            assert "\n" not in str(result)

    run()


def test_fuzz_no_traceback_no_hang(small_vhds: dict[str, bytes], tmp_path: Path) -> None:
    _hypothesis_fuzz(small_vhds, tmp_path)


def test_detect() -> None:
    class Fake(ByteSource):
        def __init__(self, data: bytes) -> None:
            self.data, self.size, self.label = data, len(data), "fake"

        def pread(self, offset: int, length: int) -> bytes:
            return self.data[offset : offset + length]

    fmt = VhdFormat()
    assert fmt.detect(b"conectix" + bytes(100), Fake(b"conectix" + bytes(100)))
    fixed = bytes(4096) + b"conectix" + bytes(504)
    assert fmt.detect(fixed[:4096], Fake(fixed))
    assert not fmt.detect(bytes(4096), Fake(bytes(8192)))


# -- through the CLI: checksum, convert, inspect, upload ---------------------------------


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def xxh128_line(path: Path, name: str) -> str:
    return f"{digest_file(path)}  {name}\n"


#: (qemu-img -O, options, drivepipe's format); the size rule does not apply to these
CLI_CASES = {
    "vhd-dynamic": ("vpc", "subformat=dynamic", "vhd"),
    "vhd-fixed-force": ("vpc", "subformat=fixed,force_size=on", "vhd"),
    "vdi": ("vdi", "static=off", "vdi"),
    "vdi-static": ("vdi", "static=on", "vdi"),
}


def _cli_images(tmp: Path, size: int) -> dict[str, tuple[Path, Path]]:
    raw = make_raw(tmp / "src.raw", size, seed=11)
    out = {}
    for case, (qfmt, opts, _) in CLI_CASES.items():
        image = tmp / f"{case}.img"
        qemu("convert", "-f", "raw", "-O", qfmt, "-o", opts, raw, image)
        out[case] = (image, qemu_raw(image, qfmt, tmp / f"{case}.raw"))
    return out


@pytest.fixture(scope="module")
def cli_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each case: (the image, qemu-img's raw of it), a 4 GiB + odd size disk."""
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    return _cli_images(tmp_path_factory.mktemp("cli"), ODD_SIZE)


@pytest.fixture(scope="module")
def small_cli_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """The same, of a 40 MiB + 3.5 KiB disk (for uploads, which send every byte)."""
    if QEMU_IMG is None:
        pytest.skip("qemu-img not installed")
    return _cli_images(tmp_path_factory.mktemp("small-cli"), 40 * MiB + 7 * 512)


@needs_qemu
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_checksum_convert_inspect(
    cli_images: dict[str, tuple[Path, Path]], tmp_path: Path, case: str
) -> None:
    image, expected = cli_images[case]
    code, out, err = run_cli("checksum", "--progress", "none", str(image))
    assert code == 0, err
    assert out == xxh128_line(expected, str(image))
    target = tmp_path / "out.raw"
    code, _, err = run_cli("convert", "--progress", "none", str(image), str(target))
    assert code == 0, err
    assert target.stat().st_size == expected.stat().st_size
    assert digest_file(target) == digest_file(expected)
    assert target.stat().st_blocks * 512 < 64 * MiB  # holes stayed holes
    code, out, err = run_cli("inspect", "--json", str(image))
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == CLI_CASES[case][2]
    assert info["size"] == expected.stat().st_size
    assert info["subformat"] in ("fixed", "dynamic", "static")
    assert info["data_bytes"] + info["hole_bytes"] == info["size"]


@needs_qemu
@pytest.mark.skipif(shutil.which("zstd") is None or shutil.which("xz") is None,
                    reason="needs the zstd and xz CLIs")
def test_cli_nested_images(
    small_cli_images: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """.vhd.zst and .vdi.xz are detected inside the compressor; a fixed VHD inside one
    is only recognised when the chain names it (its footer is at the end)."""
    for case, compressor, fmt in [
        ("vhd-dynamic", ["zstd", "-q", "-3"], "auto"),
        ("vdi", ["xz", "-0", "-T2"], "auto"),
        ("vhd-fixed-force", ["zstd", "-q", "-3"], "zstd,vhd"),
    ]:
        image, expected = small_cli_images[case]
        packed = tmp_path / f"{case}.packed"
        with open(packed, "wb") as f:
            subprocess.run([*compressor, "-c", str(image)], stdout=f, check=True)
        code, out, err = run_cli("checksum", "--progress", "none", "--format", fmt, str(packed))
        assert code == 0, (case, err)
        assert out == xxh128_line(expected, str(packed)), case


@needs_qemu
@pytest.mark.parametrize("chunked", [False, True], ids=["direct", "chunked"])
@pytest.mark.parametrize("case", ["vhd-dynamic", "vdi"])
def test_cli_upload_round_trips(
    small_cli_images: dict[str, tuple[Path, Path]], cli_store: RunningServer, case: str,
    chunked: bool,
) -> None:
    image, expected = small_cli_images[case]
    extra = ["--chunked", "--chunk-size", "8M", "--connections", "2"] if chunked else []
    code, out, err = run_cli("upload", "--endpoint", cli_store.base_url, "--progress", "none",
                             *extra, str(image))
    assert code == 0, err
    uuid = out.strip()
    drive = Path(cli_store.store.raw_path(uuid))
    size = expected.stat().st_size
    assert drive.stat().st_size >= size
    assert digest_file(drive, size) == digest_file(expected)

"""gzip, xz, zstd and bzip2 on committed fixtures made by the real compressors.

Each fixture is multi-member/multi-stream/multi-frame and must decode to the
content the fixture script generated, with its size known before streaming;
damaged copies must fail with one CorruptImage line.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard
from fixtures.decode_helpers import FORMATS, copy_fixture, decode
from fixtures.make_fixtures import stream_image
from isal import isal_zlib

from drivepipe._errors import CorruptImage, UnsupportedFormat
from drivepipe._registry import detect, open_image
from drivepipe._stage import OpenOptions
from drivepipe_plugins.formats._codec import DecodeStage
from drivepipe_plugins.formats.gzip import decode_gzip
from drivepipe_plugins.sources.file import SparseFileReader

STREAMS = {
    "multi.gz": ("gzip", "counting pass"),
    "bgzf.gz": ("gzip", "bgzf member sizes"),
    "multi.xz": ("xz", "xz index"),
    "multi.zst": ("zstd", "counting pass"),  # its second frame has no content size
    "multi.bz2": ("bzip2", "counting pass"),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_fixture_decodes_to_the_original(name: str) -> None:
    fmt, size_from = STREAMS[name]
    out = decode(FORMATS / name)
    assert out.image.format == fmt
    assert out.image.details["size_from"] == size_from
    assert out.image.size == len(stream_image())
    assert out.content == stream_image()
    assert out.hole_bytes > len(stream_image()) // 2  # decoded zeros became holes
    counted = [p for p in out.phases if p[0] == "counting"]
    if size_from == "counting pass":
        assert counted[-1][1] == counted[-1][2] == out.image.file_size
    else:
        assert not counted


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_extents_are_bounded(name: str) -> None:
    out = decode(FORMATS / name, read_size=64 << 10)
    assert 0 < out.largest_data_extent <= 64 << 10


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_detected_by_magic_not_by_name(tmp_path: Path, name: str) -> None:
    path = copy_fixture(name, tmp_path).rename(tmp_path / "disk.img")
    assert detect(str(path)).name == STREAMS[name][0]


def test_xz_layout_details() -> None:
    details = decode(FORMATS / "multi.xz").image.details
    assert details["streams"] == 2
    assert details["checks"] == "crc64, sha256"


@pytest.mark.parametrize(("threads", "how"), [(1, "sequential"), (2, "parallel")])
def test_xz_decodes_sequentially_or_by_blocks(threads: int, how: str) -> None:
    out = decode(FORMATS / "multi.xz", threads=threads)
    assert str(out.image.details["decoding"]).startswith(how)
    assert out.content == stream_image()


@pytest.mark.parametrize("threads", [1, 2])
def test_xz_corrupt_block_is_corrupt(tmp_path: Path, threads: int) -> None:
    path = copy_fixture("multi.xz", tmp_path)
    data = bytearray(path.read_bytes())
    data[200] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="corrupt xz"):
        decode(path, threads=threads)


def test_zstd_frames_counted() -> None:
    details = decode(FORMATS / "multi.zst").image.details
    assert details["frames"] == 2
    assert details["skippable_frames"] == 2


def test_zstd_with_content_sizes_needs_no_counting_pass(tmp_path: Path) -> None:
    data = FORMATS.joinpath("multi.zst").read_bytes()
    first_frame_only = data[: data.index(b"\x28\xb5\x2f\xfd", 20)]  # skippable + frame 1
    path = tmp_path / "one.zst"
    path.write_bytes(first_frame_only)
    out = decode(path)
    assert out.image.details["size_from"] == "frame content sizes"
    assert not out.phases
    assert out.content == stream_image()[: out.image.size]


# -- damaged inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_truncated_is_one_clear_error(tmp_path: Path, name: str, cut: int) -> None:
    path = copy_fixture(name, tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with pytest.raises(CorruptImage) as info:
        decode(path)
    line = info.value.one_line()
    assert line.startswith(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_flipped_byte_is_corrupt(tmp_path: Path, name: str) -> None:
    path = copy_fixture(name, tmp_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x55  # in the first member/stream/frame's compressed random data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage):
        decode(path)


def test_gzip_truncation_names_the_offset(tmp_path: Path) -> None:
    path = copy_fixture("multi.gz", tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    expected = f"truncated gzip stream at compressed offset {size - 3}"
    with pytest.raises(CorruptImage, match=expected):
        decode(path)


def test_xz_corrupt_index_is_refused_before_streaming(tmp_path: Path) -> None:
    path = copy_fixture("multi.xz", tmp_path)
    data = bytearray(path.read_bytes())
    data[-4 - 12 - 6] ^= 0xFF  # inside the last stream's index
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="corrupt xz file"):
        open_image(str(path))


def test_xz_padding_must_be_a_multiple_of_four(tmp_path: Path) -> None:
    path = copy_fixture("multi.xz", tmp_path)
    path.write_bytes(path.read_bytes() + bytes(2))
    with pytest.raises(CorruptImage, match="not a multiple of 4"):
        open_image(str(path))


def test_trailing_garbage_after_gzip_is_corrupt(tmp_path: Path) -> None:
    path = copy_fixture("multi.gz", tmp_path)
    path.write_bytes(path.read_bytes() + b"garbage!")
    with pytest.raises(CorruptImage):
        decode(path)


def test_gzip_that_decodes_to_another_size_than_counted_is_refused(tmp_path: Path) -> None:
    """A file that changes between the counting pass and the stream (a lying length)."""
    path = FORMATS / "multi.gz"
    reader = SparseFileReader(str(path))
    real = len(stream_image())
    try:
        for announced in (real - 1, real + 1):
            stage = DecodeStage("gunzip", str(path), "gzip", decode_gzip, announced, 1 << 20)
            with pytest.raises(CorruptImage, match=str(announced)):
                for _ in stage.process(reader.extents()):
                    pass
    finally:
        reader.close()


def test_unknown_foreign_magic_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "disk.vmdk"
    path.write_bytes(b"KDMV" + bytes(4092))
    with pytest.raises(UnsupportedFormat, match="VMDK"):
        open_image(str(path))


# -- decompression bomb ------------------------------------------------------------------


def gzip_bomb(path: Path, raw_size: int) -> None:
    """A gzip member of ``raw_size`` zero bytes (about 1000:1)."""
    comp = isal_zlib.compressobj(1, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(raw_size >> 20):
            f.write(comp.compress(zeros))
        f.write(comp.flush())


def test_decompression_bomb_keeps_memory_bounded(tmp_path: Path) -> None:
    path = tmp_path / "bomb.gz"
    raw_size = 512 << 20
    gzip_bomb(path, raw_size)
    assert path.stat().st_size < raw_size // 500
    tracemalloc.start()
    image = open_image(str(path), None, OpenOptions(read_size=1 << 20))  # counting pass
    try:
        total = holes = 0
        for ext in image.stages[0].process(image.source.extents()):
            total += ext.length
            holes += ext.length if ext.data is None else 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        image.close()
    assert total == holes == raw_size
    assert peak < 32 << 20


def test_bgzf_sizes_need_every_member_to_be_bgzf(tmp_path: Path) -> None:
    bgzf = FORMATS.joinpath("bgzf.gz").read_bytes()
    plain = FORMATS.joinpath("multi.gz").read_bytes()
    path = tmp_path / "mixed.gz"
    path.write_bytes(bgzf[:-28] + plain)  # drop the BGZF EOF member, append plain gzip
    out = decode(path)
    assert out.image.details["size_from"] == "counting pass"
    assert out.content == stream_image() + stream_image()
    assert struct.unpack("<I", bgzf[-4:])[0] == 0  # the EOF member is empty


def test_zstd_frame_that_needs_a_dictionary_is_refused(tmp_path: Path) -> None:
    samples = [f"sample {i} of a small training set {i * 7919}".encode() * 20 for i in range(400)]
    dictionary = zstandard.train_dictionary(4096, samples)
    compressed = zstandard.ZstdCompressor(dict_data=dictionary).compress(samples[0] * 100)
    path = tmp_path / "dict.zst"
    path.write_bytes(compressed)
    with pytest.raises(UnsupportedFormat, match=f"needs dictionary {dictionary.dict_id()}"):
        open_image(str(path))

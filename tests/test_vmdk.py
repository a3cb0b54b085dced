"""VMDK: conformance with qemu-img for every subformat it writes, VMware's stream
layout and out-of-order grains from a spec-following writer, descriptors, and the
refusals (each one line, never a traceback)."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any, cast

import pytest
import xxhash
from fixtures.decode_helpers import (
    bounded,
    decode_detected,
    file_digest,
    image_digest,
    open_with,
)
from fixtures.vmdk_writer import write_vmdk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_files import scattered_bytes

from drivepipe._errors import CorruptImage, DrivepipeError, ImageError, UnsupportedFormat
from drivepipe._runner import run_pipeline
from drivepipe._stage import ImageInput
from drivepipe.cli import main
from drivepipe_plugins.formats.vmdk import VmdkFormat, looks_like_descriptor
from drivepipe_plugins.targets.sparse_file import SparseFileWriter

HAVE_QEMU = shutil.which("qemu-img") is not None
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-img not installed")
MiB = 1 << 20




def open_vmdk(path: Path, **options: int) -> ImageInput:
    return open_with(VmdkFormat(), path, **options)


def digest_of(path: Path, **options: int) -> str:
    image = open_vmdk(path, **options)
    try:
        return image_digest(image)
    finally:
        image.close()


def qemu_raw(path: Path, tmp: Path) -> Path:
    out = tmp / (path.name + ".ref.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    return out


def assert_conforms(path: Path, tmp: Path) -> ImageInput:
    """checksum == xxh3-128 of qemu-img's raw, and convert is byte-identical."""
    ref = qemu_raw(path, tmp)
    assert digest_of(path) == file_digest(ref)
    image = open_vmdk(path)
    out = tmp / (path.name + ".out.raw")
    try:
        run_pipeline(image.source, image.stages, SparseFileWriter(str(out)), size=image.size)
    finally:
        image.close()
    assert out.stat().st_size == ref.stat().st_size
    assert file_digest(out) == file_digest(ref)
    return image


def make_raw(path: Path, size: int, seed: int = 0, pieces: int = 12) -> Path:
    """Random data pieces, some all-zero pieces, in a sparse file."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(pieces):
            at = rng.randrange(0, size - 1)
            n = min(size - at, rng.randrange(1, 400_000))
            f.seek(at)
            f.write(bytes(n) if i % 4 == 3 else rng.randbytes(n))
        f.seek(size - 700)
        f.write(rng.randbytes(700))  # data in the last, partial grain
    return path


SUBFORMATS = [
    "monolithicSparse", "streamOptimized", "monolithicFlat", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
]


@needs_qemu
@pytest.mark.parametrize("zeroed", [False, True], ids=["plain", "zeroed_grain"])
@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_subformats_conform(tmp_path: Path, subformat: str, zeroed: bool) -> None:
    if zeroed and "Flat" in subformat:
        pytest.skip("qemu-img: flat images cannot have zeroed grains")
    # 9 MiB + 3 sectors: the last grain is partial
    raw = make_raw(tmp_path / "src.raw", 9 * MiB + 3 * 512, seed=len(subformat))
    vmdk = tmp_path / f"{subformat}.vmdk"
    opts = f"subformat={subformat}" + (",zeroed_grain=on" if zeroed else "")
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", opts, str(raw), str(vmdk)],
                   check=True)
    image = assert_conforms(vmdk, tmp_path)
    assert image.size == raw.stat().st_size
    assert image.details["subformat"] == subformat
    if "Sparse" in subformat or subformat == "streamOptimized":
        assert image.details["grain_size"] == 64 * 1024
    assert image.data_size is not None and 0 < image.data_size < image.size


@needs_qemu
def test_zeroed_grains_are_holes(tmp_path: Path) -> None:
    vmdk = tmp_path / "z.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on",
                    str(vmdk), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0xab 0 4M",
                    "-c", "write -z 1M 2M", str(vmdk)], check=True, capture_output=True)
    image = open_vmdk(vmdk)
    try:
        extents = list(image.source.extents())
    finally:
        image.close()
    holes = [(e.offset, e.length) for e in extents if e.data is None]
    assert (1 * MiB, 2 * MiB) in holes or any(
        o <= MiB and o + n >= 3 * MiB for o, n in holes
    )
    assert image.data_size == 2 * MiB
    assert_conforms(vmdk, tmp_path)


@needs_qemu
def test_over_4gib_virtual_size(tmp_path: Path) -> None:
    raw = tmp_path / "big.raw"
    with raw.open("wb") as f:
        f.truncate(5 << 30)
        f.seek((4 << 30) + 12345 * 512)
        f.write(random.Random(5).randbytes(300_000))
        f.seek(100)
        f.write(b"boot")
    for sub in ("monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse",
                "twoGbMaxExtentFlat"):
        vmdk = tmp_path / f"big-{sub}.vmdk"
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={sub}",
                        str(raw), str(vmdk)], check=True)
        image = open_vmdk(vmdk)
        try:
            assert image.size == 5 << 30
            if sub.startswith("twoGb"):
                assert image.details["extents"] == 3  # 2 + 2 + 1 GiB
            got = [(e.offset, bytes(e.data)) for e in image.source.read_range(4 << 30, 1 << 30)
                   if e.data is not None]
        finally:
            image.close()
        with raw.open("rb") as f:
            for offset, data in got:
                f.seek(offset)
                assert f.read(len(data)) == data
        assert sum(len(d) for _, d in got) >= 300_000
        assert digest_of(vmdk) == file_digest(raw)


# -- the spec-following writer: other grain sizes, VMware layout, out-of-order --------


def sample_raw(size: int, seed: int) -> bytes:
    return scattered_bytes(size, seed, pieces=10, max_piece=100_000, tail=600)


WRITER_CASES = {
    "sparse-8k-grains": dict(stream=False, grain_sectors=16, gtes=128),
    "sparse-1k-grains": dict(stream=False, grain_sectors=2, gtes=512),
    "sparse-out-of-order": dict(stream=False, grain_sectors=128, reverse=True),
    "stream-vmware": dict(stream=True, gd_at_end=True),
    "stream-vmware-32k-grains": dict(stream=True, gd_at_end=True, grain_sectors=64, gtes=256),
    "stream-vmware-out-of-order": dict(stream=True, gd_at_end=True, reverse=True),
    "stream-front-out-of-order": dict(stream=True, gd_at_end=False, reverse=True),
}


@needs_qemu
@pytest.mark.parametrize("case", list(WRITER_CASES))
def test_writer_images_conform(tmp_path: Path, case: str) -> None:
    opts = dict(WRITER_CASES[case])
    reverse = opts.pop("reverse", False)
    raw = sample_raw(3 * MiB + 7 * 512, seed=len(case))
    gsize = int(opts.get("grain_sectors", 128)) * 512
    grains = [
        g for g in range(-(-len(raw) // gsize)) if raw[g * gsize : (g + 1) * gsize].strip(b"\0")
    ]
    order = list(reversed(grains)) if reverse else None
    vmdk = write_vmdk(tmp_path / f"{case}.vmdk", raw, order=order, **opts)  # type: ignore[arg-type]
    ref = qemu_raw(vmdk, tmp_path)
    assert ref.read_bytes() == raw  # the writer is right, by qemu's reading
    image = assert_conforms(vmdk, tmp_path)
    assert image.details["grain_size"] == gsize
    if opts.get("gd_at_end"):
        assert image.details["layout"] == "footer"


def test_threads_and_read_sizes_agree(tmp_path: Path) -> None:
    raw = sample_raw(2 * MiB, seed=3)
    vmdk = write_vmdk(tmp_path / "s.vmdk", raw, stream=True, gd_at_end=True)
    want = xxhash.xxh3_128_hexdigest(raw)
    for threads, read_size in ((1, 4096), (4, 1 << 20), (2, 4 << 20)):
        assert digest_of(vmdk, threads=threads, read_size=read_size) == want


def test_random_access_ranges(tmp_path: Path) -> None:
    raw = sample_raw(2 * MiB + 512, seed=4)
    for stream in (True, False):
        vmdk = write_vmdk(tmp_path / f"r{stream}.vmdk", raw, stream=stream)
        image = open_vmdk(vmdk)
        try:
            assert image.random_access is not None
            for lo, n in ((0, 1), (70_000, 200_000), (2 * MiB - 100, 10_000), (12345, 65536)):
                got = bytearray()
                for ext in image.random_access.read_range(lo, n):
                    got += bytes(ext.length) if ext.data is None else ext.data
                assert bytes(got) == raw[lo : lo + n]
        finally:
            image.close()


def test_zeroed_grains_from_writer(tmp_path: Path) -> None:
    raw = bytearray(sample_raw(1 * MiB, seed=6))
    raw[:65536] = bytes(65536)
    vmdk = write_vmdk(tmp_path / "z.vmdk", bytes(raw), stream=False, zeroed=[0])
    assert digest_of(vmdk) == xxhash.xxh3_128_hexdigest(bytes(raw))


# -- descriptors -----------------------------------------------------------------------


def descriptor(tmp: Path, lines: list[str], name: str = "d.vmdk", **keys: str) -> Path:
    head = {"version": "1", "CID": "fffffffe", "parentCID": "ffffffff",
            "createType": '"monolithicFlat"', **keys}
    text = "# Disk DescriptorFile\n" + "".join(f"{k}={v}\n" for k, v in head.items())
    text += "\n# Extent description\n" + "".join(line + "\n" for line in lines)
    path = tmp / name
    path.write_text(text)
    return path


def test_descriptor_flat_zero_sparse_extents(tmp_path: Path) -> None:
    rng = random.Random(9)
    flat = rng.randbytes(300 * 512)
    (tmp_path / "a-flat.bin").write_bytes(flat)
    sparse_raw = sample_raw(1 * MiB, seed=10)
    write_vmdk(tmp_path / "b-s001.vmdk", sparse_raw, stream=False)
    path = descriptor(tmp_path, [
        'RW 100 FLAT "a-flat.bin" 0',
        "RW 50 ZERO",
        'RDONLY 100 FLAT "a-flat.bin" 200',
        f'RW {len(sparse_raw) // 512} SPARSE "b-s001.vmdk"',
    ], createType='"twoGbMaxExtentSparse"')
    want = flat[: 100 * 512] + bytes(50 * 512) + flat[200 * 512 :] + sparse_raw
    image = open_vmdk(path)
    try:
        assert image.size == len(want)
        assert image.details["extents"] == 4
        got = bytearray()
        for ext in image.source.extents():
            got += bytes(ext.length) if ext.data is None else ext.data
        assert bytes(got) == want
    finally:
        image.close()


def test_descriptor_missing_extent_named(tmp_path: Path) -> None:
    path = descriptor(tmp_path, ['RW 100 FLAT "gone-flat.vmdk" 0'])
    with pytest.raises(ImageError, match=r"gone-flat\.vmdk"):
        open_vmdk(path)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.bin", "sub/../../x.bin"])
def test_descriptor_refuses_files_outside(tmp_path: Path, name: str) -> None:
    path = descriptor(tmp_path, [f'RW 1 FLAT "{name}" 0'])
    with pytest.raises(UnsupportedFormat, match="descriptor"):
        open_vmdk(path)


def test_descriptor_refuses_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"x" * 512)
    sub = tmp_path / "d"
    sub.mkdir()
    os.symlink(tmp_path / "secret", sub / "link.bin")
    path = descriptor(sub, ['RW 1 FLAT "link.bin" 0'])
    with pytest.raises(UnsupportedFormat, match="symlink"):
        open_vmdk(path)


def test_descriptor_short_flat_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(512 * 10))
    path = descriptor(tmp_path, ['RW 20 FLAT "a.bin" 0'])
    with pytest.raises(CorruptImage, match=r"a\.bin"):
        open_vmdk(path)


REFUSED_DESCRIPTORS = {
    "noaccess": (['NOACCESS 100 FLAT "a.bin" 0'], {}, "NOACCESS"),
    "parent-cid": (['RW 1 FLAT "a.bin" 0'], {"parentCID": "1234abcd"}, "differencing"),
    "parent-hint": (['RW 1 FLAT "a.bin" 0'], {"parentFileNameHint": '"base.vmdk"'},
                    "differencing"),
    "vmfsSparse": (['RW 1 VMFSSPARSE "a.bin"'], {"createType": '"vmfsSparse"'}, "vmfsSparse"),
    "seSparse": (['RW 1 SESPARSE "a.bin"'], {"createType": '"seSparse"'}, "seSparse"),
    "sesparse-extent": (['RW 1 SESPARSE "a.bin"'], {}, "seSparse"),
    "rdm": (['RW 1 VMFSRDM "a.bin"'], {"createType": '"vmfsRawDeviceMap"'}, "raw device"),
    "encrypted": (['RW 1 FLAT "a.bin" 0'], {"encryption.keySafe": '"vmware:key/list/..."'},
                  "encrypted"),
    "unknown-type": (['RW 1 FLAT "a.bin" 0'], {"createType": '"futureDisk"'}, "futureDisk"),
}


@pytest.mark.parametrize("case", list(REFUSED_DESCRIPTORS))
def test_descriptor_refusals(tmp_path: Path, case: str) -> None:
    lines, keys, match = REFUSED_DESCRIPTORS[case]
    (tmp_path / "a.bin").write_bytes(bytes(100 * 512))
    path = descriptor(tmp_path, lines, **keys)
    with pytest.raises(UnsupportedFormat, match=match) as info:
        open_vmdk(path)
    assert "\n" not in info.value.one_line()


def test_descriptor_bad_extent_line(tmp_path: Path) -> None:
    path = descriptor(tmp_path, ['RW lots FLAT "a.bin" 0'])
    with pytest.raises(CorruptImage, match="extent line"):
        open_vmdk(path)


# -- sparse header refusals ------------------------------------------------------------


def patched(tmp: Path, offset: int, data: bytes, **kw: object) -> Path:
    path = write_vmdk(tmp / "p.vmdk", sample_raw(256 * 1024, seed=1), **kw)  # type: ignore[arg-type]
    buf = bytearray(path.read_bytes())
    buf[offset : offset + len(data)] = data
    path.write_bytes(buf)
    return path


def test_refuses_cowd(tmp_path: Path) -> None:
    path = patched(tmp_path, 0, b"COWD")
    with pytest.raises(UnsupportedFormat, match="COWD"):
        open_vmdk(path)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(version=4), "version 4"),
        (dict(compression=7), "compression"),
        (dict(parent="00c0ffee"), "differencing"),
        (dict(extra='encryption.data = "abc"\n'), "encrypted"),
    ],
)
def test_sparse_refusals(tmp_path: Path, kw: dict[str, object], match: str) -> None:
    path = write_vmdk(tmp_path / "r.vmdk", sample_raw(256 * 1024, seed=2), stream=False,
                      **kw)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedFormat, match=match):
        open_vmdk(path)


def test_newline_check(tmp_path: Path) -> None:
    path = patched(tmp_path, 73, b"\n \n\n", stream=False)
    with pytest.raises(CorruptImage, match="text-mode"):
        open_vmdk(path)


def test_corrupt_grain_is_one_line(tmp_path: Path) -> None:
    raw = random.Random(8).randbytes(65536) + bytes(65536)
    path = write_vmdk(tmp_path / "c.vmdk", raw, stream=True, gd_at_end=False)
    buf = bytearray(path.read_bytes())
    # the first grain's zlib stream, after its 12-byte marker
    first = buf.index(zlib.compress(raw[:65536])[:16])
    buf[first + 2 : first + 64] = bytes(62)
    path.write_bytes(buf)
    with pytest.raises(CorruptImage, match="grain"):
        digest_of(path)


def test_truncated_footer_layout(tmp_path: Path) -> None:
    path = write_vmdk(tmp_path / "t.vmdk", sample_raw(512 * 1024, seed=8), gd_at_end=True)
    data = path.read_bytes()
    path.write_bytes(data[:-512])
    with pytest.raises(CorruptImage, match="footer"):
        open_vmdk(path)


def test_detects_descriptor_like_qemu() -> None:
    assert looks_like_descriptor(b"# Disk DescriptorFile\n\nversion=1\n")
    assert looks_like_descriptor(b"  \r\n# c\r\nversion=3\r\nCID=1\r\n")
    assert not looks_like_descriptor(b"# hello\nversion=4\n")
    assert not looks_like_descriptor(b"\x00" * 512)


# -- through the CLI and a local drive store --------------------------------------------


def run_cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


@needs_qemu
@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized",
                                       "twoGbMaxExtentSparse", "monolithicFlat"])
def test_cli_checksum_convert_upload(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                     cli_store: object, subformat: str) -> None:
    raw = make_raw(tmp_path / "src.raw", 5 * MiB + 512, seed=7)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={subformat}",
                    str(raw), str(vmdk)], check=True)
    ref = qemu_raw(vmdk, tmp_path)
    want = xxhash.xxh3_128_hexdigest(ref.read_bytes())
    code, out, err = run_cli(capfd, "checksum", "--progress", "none", str(vmdk))
    assert code == 0, err
    assert out.split()[0] == want
    out_raw = tmp_path / "out.raw"
    code, _, err = run_cli(capfd, "convert", "--progress", "none", str(vmdk), str(out_raw))
    assert code == 0, err
    assert out_raw.read_bytes() == ref.read_bytes()
    server = cast(Any, cli_store)
    code, out, err = run_cli(capfd, "upload", "--endpoint", server.base_url, "--progress",
                             "none", str(vmdk))
    assert code == 0, err
    uuid = out.strip()
    with open(server.store.raw_path(uuid), "rb") as f:
        assert f.read(ref.stat().st_size) == ref.read_bytes()
    assert server.store.get(uuid).image_size == ref.stat().st_size


@needs_qemu
def test_cli_nested_vmdk_gz(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = make_raw(tmp_path / "src.raw", 3 * MiB, seed=8)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(vmdk)], check=True)
    gz = tmp_path / "disk.vmdk.gz"
    gz.write_bytes(gzip.compress(vmdk.read_bytes()))
    code, out, err = run_cli(capfd, "checksum", "--progress", "none", str(gz))
    assert code == 0, err
    assert out.split()[0] == xxhash.xxh3_128_hexdigest(raw.read_bytes())


# -- hostile input: no traceback, no hang, bounded memory ------------------------------

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
#: header fields: (offset, struct format)
HEADER_FIELDS = {
    "version": (4, "<I"), "flags": (8, "<I"), "capacity": (12, "<Q"), "grain": (20, "<Q"),
    "desc_offset": (28, "<Q"), "desc_size": (36, "<Q"), "gtes": (44, "<I"),
    "rgd": (48, "<Q"), "gd": (56, "<Q"), "overhead": (64, "<Q"), "compression": (77, "<H"),
}
_SAMPLES: dict[str, bytes] = {}


def sample(kind: str, tmp: Path) -> bytes:
    if kind not in _SAMPLES:
        raw = sample_raw(1 * MiB + 1024, seed=99)
        opts = {"stream-vmware": dict(stream=True, gd_at_end=True),
                "stream-front": dict(stream=True, gd_at_end=False),
                "sparse": dict(stream=False, grain_sectors=16, gtes=64)}[kind]
        _SAMPLES[kind] = write_vmdk(tmp / f"sample-{kind}.vmdk", raw, **opts).read_bytes()  # type: ignore[arg-type]
    return _SAMPLES[kind]


def decode_bounded(path: Path) -> int | DrivepipeError:
    return bounded(lambda: decode_detected(VmdkFormat(), path, read_size=MiB), what=path.name)


def interesting(fmt: str, limit: int) -> st.SearchStrategy[int]:
    top = (1 << (8 * struct.calcsize(fmt))) - 1
    return st.one_of(
        st.sampled_from([v for v in (0, 1, 2, 3, 4, 8, 16, 127, 128, 512, 513, 1 << 16,
                                     1 << 31, limit // 512, limit, top, top - 1) if v <= top]),
        st.integers(0, top),
    )


@given(kind=st.sampled_from(["stream-vmware", "stream-front", "sparse"]), data=st.data())
@FUZZ
def test_fuzz_header_fields(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    buf = bytearray(sample(kind, tmp_path))
    fields = data.draw(st.lists(st.sampled_from(sorted(HEADER_FIELDS)), min_size=1, max_size=3))
    footer = kind == "stream-vmware" and data.draw(st.booleans())
    for name in fields:
        offset, fmt = HEADER_FIELDS[name]
        at = offset + (len(buf) - 1024 if footer else 0)
        struct.pack_into(fmt, buf, at, data.draw(interesting(fmt, len(buf))))
    decode_bounded(write_file(tmp_path, "h.vmdk", bytes(buf)))


@given(kind=st.sampled_from(["stream-vmware", "stream-front", "sparse"]), data=st.data())
@FUZZ
def test_fuzz_tables_and_bytes(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    buf = bytearray(sample(kind, tmp_path))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(buf) - 4)) & ~3
        struct.pack_into("<I", buf, at, data.draw(interesting("<I", len(buf))))
    cut = data.draw(st.sampled_from([None, 0, 1, 511, 513, len(buf) // 2, len(buf) - 1]))
    if cut is not None:
        del buf[cut:]
    decode_bounded(write_file(tmp_path, "t.vmdk", bytes(buf)))


EXTENT_LINES = st.one_of(
    st.builds(lambda a, n, t, f, o: f'{a} {n} {t} "{f}" {o}',
              st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw"]),
              st.sampled_from([0, 1, 7, 2048, 1 << 40, -1]),
              st.sampled_from(["FLAT", "SPARSE", "ZERO", "VMFS", "SESPARSE", "BOGUS"]),
              st.sampled_from(["a.bin", "s.vmdk", "", "../a.bin", "/dev/zero", "missing"]),
              st.sampled_from([0, 1, 5, 1 << 40])),
    st.text(max_size=60),
)


@given(lines=st.lists(EXTENT_LINES, max_size=6),
       keys=st.lists(st.sampled_from(['parentCID=abc', 'createType="vmfs"', "version=9",
                                      'createType="x"', "CID", "=", "encryption.x=1"]),
                     max_size=3))
@FUZZ
def test_fuzz_descriptors(tmp_path: Path, lines: list[str], keys: list[str]) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(4096))
    if not (tmp_path / "s.vmdk").exists():
        (tmp_path / "s.vmdk").write_bytes(sample("sparse", tmp_path))
    text = "# Disk DescriptorFile\nversion=1\n" + "\n".join(keys + lines) + "\n"
    path = tmp_path / "d.vmdk"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    decode_bounded(path)


def test_huge_capacity_without_tables_streams_holes_fast(tmp_path: Path) -> None:
    buf = bytearray(sample("sparse", tmp_path))
    struct.pack_into("<Q", buf, 12, 1 << 40)  # 512 TiB: a GD past the end of the file
    result = decode_bounded(write_file(tmp_path, "big.vmdk", bytes(buf)))
    assert isinstance(result, CorruptImage)


def write_file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def test_broken_descriptor_is_refused_not_sent_raw(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    path.write_bytes(b"# Disk DescriptorFile\n" + bytes(4000))
    with pytest.raises(CorruptImage, match="no extents"):
        open_vmdk(path)


@pytest.mark.parametrize("stream", [True, False], ids=["streamOptimized", "monolithicSparse"])
def test_chunked_upload_reads_ranges_in_parallel(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], cli_store: object, stream: bool
) -> None:
    raw = sample_raw(5 * MiB + 512, seed=21)
    vmdk = write_vmdk(tmp_path / "c.vmdk", raw, stream=stream, gd_at_end=stream)
    server = cast(Any, cli_store)
    code, out, err = run_cli(capfd, "upload", "--endpoint", server.base_url, "--progress",
                             "none", "--chunked", "--connections", "3", "--chunk-size", "1M",
                             str(vmdk))
    assert code == 0, err
    with open(server.store.raw_path(out.strip()), "rb") as f:
        assert f.read(len(raw)) == raw


def test_corrupt_grain_uploads_no_drive(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], cli_store: object
) -> None:
    rng = random.Random(22)
    raw = rng.randbytes(2 * MiB) + bytes(MiB) + rng.randbytes(65536)
    path = write_vmdk(tmp_path / "c.vmdk", raw, stream=True, gd_at_end=True)
    buf = bytearray(path.read_bytes())
    last = buf.index(zlib.compress(raw[-65536:])[:16])
    buf[last + 2 : last + 200] = bytes(198)
    path.write_bytes(buf)
    server = cast(Any, cli_store)
    code, out, err = run_cli(capfd, "upload", "--endpoint", server.base_url, "--progress",
                             "none", str(path))
    assert code == 3 and out == ""
    assert "grain" in err and len(err.strip().splitlines()) == 1
    assert server.store.list() == []

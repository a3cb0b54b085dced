"""Nested images (issue: ``disk.qcow2.xz`` became a raw drive of qcow2 bytes).

Every image is made by the real tools (qemu-img, xz, gzip, zstd, bzip2) and
checked against ``qemu-img convert -O raw``: ``checksum`` equal, ``convert``
byte-identical, ``inspect`` naming the chain.  Multi-block xz and multi-frame
zstd must be read through their index (a spool directory that does not exist
proves no spool file was made); the others are spooled, and the spool is gone
after success, failure and SIGINT.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import xxhash
from nested_images import MiB, Nested, build, compress, needs_tools, run, write_disk
from tmpfs import needs_root, small_tmpfs

from drivepipe._errors import UnsupportedFormat
from drivepipe._extent import Extent
from drivepipe._nesting import TailGuard
from drivepipe.cli import main

pytestmark = needs_tools
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
INDEXED = ("xzN", "zstN")


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Nested]:
    return build(tmp_path_factory.mktemp("nested"))


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


NAMES = [f"{v}.qcow2.{k}" for v in ("plain", "zlib", "zstd", "v2")
         for k in ("xz1", "xzN", "gz", "gzN", "zst", "zstN", "bz2")]
NAMES += [f"disk.raw.{k}" for k in ("xz1", "xzN", "gz", "gzN", "zst", "zstN", "bz2")]
NAMES += ["disk.raw.xz.gz"]


@pytest.mark.parametrize("name", NAMES)
def test_checksum_and_convert_match_qemu_img(images: dict[str, Nested], name: str,
                                             tmp_path: Path, spool: Path) -> None:
    image = images[name]
    code, out, err = cli("checksum", "--progress", "none", "--spool-dir", str(spool),
                         str(image.path))
    assert code == 0, err
    assert out == f"{image.digest}  {image.path}\n"
    dst = tmp_path / "out.raw"
    code, _, err = cli("convert", "--progress", "none", "--spool-dir", str(spool),
                       str(image.path), str(dst))
    assert code == 0, err
    assert dst.read_bytes() == image.raw.read_bytes()
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("name", ["plain.qcow2.xz1", "zlib.qcow2.xzN", "v2.qcow2.bz2",
                                  "disk.raw.gz", "disk.raw.xz.gz"])
def test_inspect_shows_the_chain_and_the_raw_size(images: dict[str, Nested],
                                                  name: str) -> None:
    image = images[name]
    code, out, err = cli("inspect", "--json", str(image.path))
    assert code == 0, err
    info = json.loads(out)
    assert info["chain"] == list(image.chain)
    assert info["format"] == " > ".join(image.chain).replace(" > raw", "")
    assert info["size"] == image.raw.stat().st_size
    assert info["file_size"] == image.path.stat().st_size
    code, out, _ = cli("inspect", str(image.path))
    assert f"format:      {info['format']}\n" in out


def test_inspect_of_a_spooled_image_says_how_much_space_the_spool_took(
    images: dict[str, Nested], spool: Path
) -> None:
    image = images["plain.qcow2.gz"]
    code, out, err = cli("inspect", "--json", "--spool-dir", str(spool), str(image.path))
    assert code == 0, err
    info = json.loads(out)
    assert info["spool_dir"] == str(spool)
    # the spool holds the qcow2 file's data blocks (its holes stay holes)
    assert 0 < info["spool_bytes"] <= image.inner.stat().st_size + 65536
    image = images["plain.qcow2.xzN"]
    code, out, err = cli("inspect", "--json", str(image.path))
    assert "spool_bytes" not in json.loads(out)


@pytest.mark.parametrize("kind", INDEXED)
def test_indexed_layers_are_read_in_place_without_a_spool(images: dict[str, Nested],
                                                          kind: str, tmp_path: Path) -> None:
    image = images[f"zlib.qcow2.{kind}"]
    nowhere = tmp_path / "no-such-dir"
    code, out, err = cli("checksum", "--progress", "none", "--spool-dir", str(nowhere),
                         str(image.path))
    assert code == 0, err
    assert out.split()[0] == image.digest
    assert not nowhere.exists()


@pytest.mark.parametrize("kind", ["xz1", "gz", "zst", "bz2"])
def test_unindexed_layers_need_the_spool_dir(images: dict[str, Nested], kind: str,
                                             tmp_path: Path) -> None:
    image = images[f"plain.qcow2.{kind}"]
    nowhere = tmp_path / "no-such-dir"
    code, out, err = cli("checksum", "--progress", "none", "--spool-dir", str(nowhere),
                         str(image.path))
    assert code == 5 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{nowhere}: cannot create a spool file" in err


def test_format_chain_overrides_detection(images: dict[str, Nested]) -> None:
    image = images["plain.qcow2.xzN"]
    code, out, err = cli("checksum", "--progress", "none", "-f", "xz,raw", str(image.path))
    assert code == 0, err
    assert out.split()[0] == xxhash.xxh3_128_hexdigest(image.inner.read_bytes())
    code, out, err = cli("checksum", "--progress", "none", "-f", "xz>qcow2", str(image.path))
    assert code == 0 and out.split()[0] == image.digest
    code, _, err = cli("checksum", "--progress", "none", "-f", "xz,nope", str(image.path))
    assert code == 2 and "unknown format 'nope'" in err


def test_a_single_outer_name_still_detects_what_is_inside(images: dict[str, Nested]) -> None:
    image = images["plain.qcow2.gz"]
    code, out, err = cli("checksum", "--progress", "none", "-f", "gzip", str(image.path))
    assert code == 0, err
    assert out.split()[0] == image.digest


@pytest.mark.parametrize("kind", ["xz1", "xzN", "gz", "zstN"])
def test_truncated_inner_qcow2_is_one_line(images: dict[str, Nested], kind: str,
                                           tmp_path: Path, spool: Path) -> None:
    qcow = images["plain.qcow2.gz"].inner
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(qcow.read_bytes()[: qcow.stat().st_size // 2])
    packed = compress(cut, kind, tmp_path / f"cut.qcow2.{kind}")
    dst = tmp_path / "out.raw"
    code, _, err = cli("convert", "--progress", "none", "--spool-dir", str(spool),
                       str(packed), str(dst))
    assert code == 3, err
    assert err.count("\n") == 1 and "Traceback" not in err and "qcow2" in err
    assert not dst.exists() and list(tmp_path.glob(".out.raw*")) == []
    assert list(spool.iterdir()) == []


def test_corrupt_outer_stream_is_one_line(images: dict[str, Nested], tmp_path: Path,
                                          spool: Path) -> None:
    data = bytearray(images["plain.qcow2.gz"].path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.qcow2.gz"
    bad.write_bytes(bytes(data))
    code, _, err = cli("checksum", "--progress", "none", "--spool-dir", str(spool), str(bad))
    assert code == 3 and "gzip" in err and err.count("\n") == 1
    assert list(spool.iterdir()) == []


def test_qcow2_with_a_backing_file_inside_a_compressor_is_refused(
    images: dict[str, Nested], tmp_path: Path
) -> None:
    base = images["plain.qcow2.gz"].inner
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    for kind in ("xz1", "zstN"):
        packed = compress(top, kind, tmp_path / f"top.qcow2.{kind}")
        code, _, err = cli("checksum", "--progress", "none", str(packed))
        assert code == 3 and "backing file" in err and err.count("\n") == 1


def test_an_image_nested_too_deep_is_refused(tmp_path: Path) -> None:
    raw = write_disk(tmp_path / "d.raw")
    path = raw
    for i in range(5):
        path = compress(path, "gz", tmp_path / f"d{i}.gz")
    code, _, err = cli("checksum", "--progress", "none", "--spool-dir", str(tmp_path),
                       str(path))
    assert code == 3 and "nested layers" in err


def test_spool_is_gone_after_sigint(tmp_path: Path, spool: Path) -> None:
    # big enough that spooling takes a while: 192 MiB of incompressible qcow2 data
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        for _ in range(192):
            f.write(os.urandom(MiB))
    qcow = tmp_path / "big.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow))
    raw.unlink()
    packed = tmp_path / "big.qcow2.gz"
    with open(packed, "wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(qcow)], stdout=out, check=True)
    qcow.unlink()
    proc = subprocess.Popen(
        [DRIVEPIPE, "convert", "--progress", "json", "--spool-dir", str(spool),
         str(packed), str(tmp_path / "out.raw")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if '"spooling"' in line or not line:
                break
        assert '"spooling"' in line, line
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    # 130 and one line, as a rule; a SIGINT that lands while the error line is being
    # written ends the process by the signal itself (-2): interrupted either way
    assert proc.returncode in (130, -signal.SIGINT), err
    assert list(spool.iterdir()) == []
    assert not (tmp_path / "out.raw").exists()


@needs_root
def test_full_spool_dir_is_one_line_naming_it(images: dict[str, Nested],
                                              tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "256k") as small:
        image = images["plain.qcow2.bz2"]
        code, _, err = cli("checksum", "--progress", "none", "--spool-dir", str(small),
                           str(image.path))
        assert code == 5, err
        assert err.count("\n") == 1 and f"{small}: no space left for the spool" in err
        assert list(small.iterdir()) == []


def test_fixed_vhd_inside_a_compressor_is_never_sent_as_raw(tmp_path: Path) -> None:
    # a fixed VHD is raw data plus a footer: from the head it looks raw
    vhd = tmp_path / "f.vhd"
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
        str(write_disk(tmp_path / "d.raw")), str(vhd))
    digest = xxhash.xxh3_128_hexdigest((tmp_path / "d.raw").read_bytes())
    # several frames: the tail is read through the index and the VHD found up front
    code, out, err = cli("checksum", "--progress", "none",
                         str(compress(vhd, "zstN", tmp_path / "f.vhd.zstN")))
    assert code == 0, err
    assert out.split()[0] == digest
    # one stream: the footer is caught before the last bytes leave, in one line
    for kind in ("gz", "zst", "xz1"):
        packed = compress(vhd, kind, tmp_path / f"f.vhd.{kind}")
        dst = tmp_path / "out.raw"
        code, _, err = cli("convert", "--progress", "none", str(packed), str(dst))
        assert code == 3, err
        assert err.count("\n") == 1 and "ends in a vhd footer" in err
        assert not dst.exists()
        outer = {"gz": "gzip", "zst": "zstd", "xz1": "xz"}[kind]
        code, out, err = cli("checksum", "--progress", "none", "--spool-dir", str(tmp_path),
                             "-f", f"{outer},vhd", str(packed))
        assert code == 0, err
        assert out.split()[0] == digest


def test_the_tail_check_reads_only_the_tail_of_a_huge_final_hole(tmp_path: Path) -> None:
    # 16 GiB of which all but the first MiB is a hole, in xz: the footer check must
    # look at the last 512 bytes, not materialise the hole

    size = 16 << 30
    stream = [Extent(0, MiB, os.urandom(MiB)), Extent.hole(MiB, size - MiB)]
    out = list(TailGuard("x", b"", "xz").process(iter(stream)))
    assert [e.length for e in out] == [MiB, size - MiB]
    # a VHD footer's magic in the last sector: refused after everything but the tail
    vhd_tail = Extent(MiB, 512, b"conectix" + bytes(504))
    passed = []
    with pytest.raises(UnsupportedFormat, match="ends in a vhd footer"):
        for ext in TailGuard("x", b"", "xz").process(iter([stream[0], vhd_tail])):
            passed.append(ext)
    assert sum(e.length for e in passed) == MiB

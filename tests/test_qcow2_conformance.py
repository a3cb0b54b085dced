"""qcow2 conformance against qemu-img: random sparse images, many option sets.

Each test makes a sparse raw image with a random layout (fixed seeds, so a
failure reproduces), has ``qemu-img convert -O qcow2`` write it under one set
of options, decodes it with drivepipe into a sparse raw file, and compares
byte for byte with the original.  Skipped where qemu-img is not installed.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.decode_helpers import convert, decode, same_file

from drivepipe._errors import UnsupportedFormat
from drivepipe._registry import open_image
from drivepipe._stage import OpenOptions

pytestmark = [
    pytest.mark.needs_qemu,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed"),
]

#: the ``make_sparse`` fixture of tests/conftest.py (not imported: another conftest.py
#: in a subdirectory can shadow the module name when the whole suite is collected)
MakeImage = Callable[..., Path]

MiB = 1 << 20

OPTION_SETS: dict[str, tuple[list[str], str]] = {
    # name: (extra qemu-img convert arguments, -o options)
    "default": ([], ""),
    "zlib": (["-c"], ""),
    "zstd": (["-c"], "compression_type=zstd"),
    "extended_l2": ([], "extended_l2=on"),
    "extended_l2-zstd-128k": (["-c"], "extended_l2=on,cluster_size=128k,compression_type=zstd"),
    "cluster-512": ([], "cluster_size=512"),
    "cluster-512-zlib": (["-c"], "cluster_size=512"),
    "cluster-2M": ([], "cluster_size=2M"),
    "cluster-2M-zstd": (["-c"], "cluster_size=2M,compression_type=zstd"),
    "cluster-2M-extended_l2": ([], "cluster_size=2M,extended_l2=on"),
    "cluster-16k-extended_l2": ([], "cluster_size=16k,extended_l2=on"),
    "prealloc-metadata": ([], "preallocation=metadata"),
    "prealloc-falloc": ([], "preallocation=falloc"),
    "prealloc-full": ([], "preallocation=full"),
    "compat-0.10": ([], "compat=0.10"),
    "compat-0.10-zlib-4k": (["-c"], "compat=0.10,cluster_size=4k"),
    "refcount-bits-1": ([], "refcount_bits=1,lazy_refcounts=on"),
}


def qemu_img(*args: str) -> None:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"qemu-img {' '.join(args)}: {proc.stderr.strip()}"


def to_qcow2(raw: Path, extra: list[str], opts: str) -> Path:
    target = raw.with_suffix(".qcow2")
    qemu_img("convert", "-O", "qcow2", *extra, *(["-o", opts] if opts else []), str(raw),
             str(target))
    return target


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_decodes_like_the_original(tmp_path: Path, make_sparse: MakeImage, name: str) -> None:
    extra, opts = OPTION_SETS[name]
    seed = sorted(OPTION_SETS).index(name)
    rng = random.Random(seed)
    size = rng.randrange(1 * MiB, 24 * MiB) // 512 * 512
    raw = make_sparse(size, seed=seed, pieces=rng.randint(1, 12), max_piece=2 * MiB,
                      zero_pieces=2)
    qcow = to_qcow2(raw, extra, opts)
    out = tmp_path / "out.raw"
    image = convert(qcow, out)
    assert image.format == "qcow2"
    assert image.size == size
    assert same_file(out, raw)


@pytest.mark.parametrize("seed", range(3))
def test_random_access_matches_the_original(make_sparse: MakeImage, seed: int) -> None:
    raw = make_sparse(8 * MiB, seed=100 + seed, pieces=10, max_piece=512 << 10)
    qcow = to_qcow2(raw, ["-c"] if seed else [], "cluster_size=16k,extended_l2=on")
    original = raw.read_bytes()
    image = open_image(str(qcow), None, OpenOptions(read_size=256 << 10, threads=3))
    rng = random.Random(seed)
    try:
        assert image.random_access is not None
        for _ in range(25):
            offset = rng.randrange(0, len(original))
            length = rng.randrange(1, 3 * MiB)
            got = b"".join(
                bytes(e.length) if e.data is None else bytes(e.data)
                for e in image.random_access.read_range(offset, length)
            )
            assert got == original[offset : offset + length]
    finally:
        image.close()


def test_size_not_a_sector_multiple_matches_qemu(tmp_path: Path, make_sparse: MakeImage) -> None:
    raw = make_sparse(3 * MiB + 777, seed=7, pieces=4, max_piece=300 << 10)
    qcow = to_qcow2(raw, ["-c"], "")
    reference = tmp_path / "qemu.raw"
    qemu_img("convert", "-O", "raw", str(qcow), str(reference))
    out = tmp_path / "out.raw"
    convert(qcow, out)
    assert same_file(out, reference)


def test_internal_snapshot_reads_the_active_layer(
    tmp_path: Path, make_sparse: MakeImage
) -> None:
    raw = make_sparse(6 * MiB, seed=11, pieces=6, max_piece=1 * MiB)
    qcow = to_qcow2(raw, [], "cluster_size=64k")
    qemu_img("snapshot", "-c", "one", str(qcow))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 200k", "-c", "write -z 0 64k",
         "-c", "discard 3M 1M", str(qcow)],
        check=True, capture_output=True,
    )
    qemu_img("snapshot", "-c", "two", str(qcow))
    reference = tmp_path / "qemu.raw"
    qemu_img("convert", "-O", "raw", str(qcow), str(reference))
    out = tmp_path / "out.raw"
    image = convert(qcow, out)
    assert image.details["snapshots"] == 2
    assert same_file(out, reference)
    assert not same_file(out, raw)


def make_luks_qcow2(path: Path) -> None:
    """qemu-img times its PBKDF with per-thread CPU usage, which on a busy machine
    sometimes reads as nothing ("Unable to get accurate CPU usage"): try again."""
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "--object",
            "secret,id=sec0,data=not-a-real-secret", "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=250",
            str(path), "4M"]
    for _ in range(5):
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        assert "accurate CPU usage" in proc.stderr, proc.stderr
    pytest.fail(f"qemu-img could not make a LUKS image: {proc.stderr.strip()}")


def test_luks_encryption_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret.qcow2"
    make_luks_qcow2(path)
    with pytest.raises(UnsupportedFormat, match="encrypted qcow2"):
        open_image(str(path))


def test_backing_file_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    with pytest.raises(UnsupportedFormat, match="backing file"):
        open_image(str(top))


@pytest.mark.parametrize(
    ("fmt", "opts", "label"),
    [
        ("qed", "", "QED"),
        ("qcow", "", "qcow2 version 1"),
    ],
)
def test_formats_we_do_not_decode_are_refused(
    tmp_path: Path, fmt: str, opts: str, label: str
) -> None:
    path = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, *(["-o", opts] if opts else []), str(path), "2M")
    with pytest.raises(UnsupportedFormat, match=label):
        open_image(str(path))


def test_decoded_image_streams_sparsely(make_sparse: MakeImage) -> None:
    raw = make_sparse(16 * MiB, seed=5, pieces=3, max_piece=256 << 10, zero_pieces=3)
    qcow = to_qcow2(raw, [], "preallocation=full")
    out = decode(qcow)
    assert out.content == raw.read_bytes()
    # preallocation=full wrote zeros for every cluster; they still leave as holes
    assert out.hole_bytes >= 16 * MiB - 3 * (256 << 10) - 3 * 4096


def test_preallocated_clusters_in_host_holes_are_never_read(
    make_sparse: MakeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_sparse(64 * MiB, seed=9, pieces=2, max_piece=256 << 10)
    qcow = to_qcow2(raw, [], "preallocation=metadata")
    assert qcow.stat().st_size > 64 * MiB  # every cluster allocated, in host holes
    read: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, length: int, offset: int) -> bytes:
        data = real_pread(fd, length, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", recording_pread)
    out = decode(qcow)
    monkeypatch.undo()
    assert out.content == raw.read_bytes()
    assert sum(read) < 4 * MiB  # the tables and the two data pieces, not 64 MiB of holes

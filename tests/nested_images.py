"""Nested test images made by the real tools: qcow2 by qemu-img, then xz, gzip, zstd, bzip2.

``build(dir)`` returns ``{name: Nested}``; each knows the xxh3-128 and the bytes of
its raw disk as ``qemu-img convert -O raw`` (or the raw file itself) gives them.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import xxhash

MiB = 1 << 20
#: a disk with data and holes, not a multiple of a cluster (ends mid-cluster)
DISK_SIZE = 3 * MiB + 12288

TOOLS = ("qemu-img", "xz", "gzip", "zstd", "bzip2")
needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason="needs qemu-img, xz, gzip, zstd and bzip2",
)

#: qcow2 variants: qemu-img convert options
QCOW2 = {
    "plain": ["-O", "qcow2"],
    "zlib": ["-O", "qcow2", "-c"],
    "zstd": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    "v2": ["-O", "qcow2", "-o", "compat=0.10"],
}


@dataclass(frozen=True)
class Nested:
    path: Path
    #: the inner file before compression (a qcow2 or the raw disk)
    inner: Path
    #: the raw disk as qemu-img convert -O raw gives it
    raw: Path
    chain: tuple[str, ...]

    @property
    def digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.raw.read_bytes())


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def write_disk(path: Path, seed: int = 7) -> Path:
    """Random data in about half of the disk, holes between, data in the last bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
        pos = 0
        while pos < DISK_SIZE - 200_000:
            length = rng.randrange(4096, 200_000)
            f.seek(pos)
            f.write(rng.randbytes(length))
            pos += 2 * length + rng.randrange(0, 65536)
        f.seek(DISK_SIZE - 100)
        f.write(rng.randbytes(100))
    return path


def compress(src: Path, kind: str, out: Path) -> Path:
    """``kind``: xz1 (one block), xzN (blocks of 256 KiB, two threads), gz, gzN (two
    members), zst, zstN (frames of 512 KiB, each with its content size), bz2."""
    data = src.read_bytes()
    if kind == "xz1":
        out.write_bytes(_pipe(["xz", "-T1", "-c"], data))
    elif kind == "xzN":
        out.write_bytes(_pipe(["xz", "-T2", "--block-size=256KiB", "-c"], data))
    elif kind == "gz":
        out.write_bytes(_pipe(["gzip", "-c"], data))
    elif kind == "gzN":
        half = len(data) // 2
        out.write_bytes(_pipe(["gzip", "-c"], data[:half]) + _pipe(["gzip", "-c"], data[half:]))
    elif kind == "zst":
        out.write_bytes(_pipe(["zstd", "-q", "-c"], data))
    elif kind == "zstN":
        step = 512 << 10
        frames = [_pipe(["zstd", "-q", "-c"], data[i : i + step])
                  for i in range(0, len(data), step)]
        out.write_bytes(b"".join(frames))
    elif kind == "bz2":
        out.write_bytes(_pipe(["bzip2", "-c"], data))
    else:
        raise ValueError(kind)
    return out


def _pipe(cmd: list[str], data: bytes) -> bytes:
    # zstd writes no content size when it reads a pipe: give it a file instead
    if cmd[0] == "zstd":
        with tempfile.NamedTemporaryFile() as tmp:
            tmp.write(data)
            tmp.flush()
            return subprocess.run([*cmd, tmp.name], check=True, capture_output=True).stdout
    return subprocess.run(cmd, input=data, check=True, capture_output=True).stdout


WRAPPERS = ("xz1", "xzN", "gz", "gzN", "zst", "zstN", "bz2")
COMPRESSOR = {"xz1": "xz", "xzN": "xz", "gz": "gzip", "gzN": "gzip", "zst": "zstd",
              "zstN": "zstd", "bz2": "bzip2"}


def build(root: Path) -> dict[str, Nested]:
    raw = write_disk(root / "disk.raw")
    images: dict[str, Nested] = {}
    for variant, opts in QCOW2.items():
        qcow = root / f"{variant}.qcow2"
        run("qemu-img", "convert", "-f", "raw", *opts, str(raw), str(qcow))
        back = root / f"{variant}.back.raw"
        run("qemu-img", "convert", "-O", "raw", str(qcow), str(back))
        for kind in WRAPPERS:
            name = f"{variant}.qcow2.{kind}"
            path = compress(qcow, kind, root / name)
            images[name] = Nested(path, qcow, back, (COMPRESSOR[kind], "qcow2"))
    for kind in WRAPPERS:
        name = f"disk.raw.{kind}"
        images[name] = Nested(compress(raw, kind, root / name), raw, raw,
                              (COMPRESSOR[kind], "raw"))
    inner_xz = compress(raw, "xzN", root / "disk.raw.xz")
    images["disk.raw.xz.gz"] = Nested(compress(inner_xz, "gz", root / "disk.raw.xz.gz"), raw,
                                      raw, ("gzip", "xz", "raw"))
    return images

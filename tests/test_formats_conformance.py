"""gzip, xz, zstd, bzip2 conformance: random sparse images through the real tools.

Each test makes a sparse raw image with a random layout (fixed seeds),
compresses it with the real command-line compressor (several members,
streams or frames, with and without recorded sizes), decodes it with
drivepipe into a sparse raw file and compares byte for byte.  Each test is
skipped where its compressor is missing.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.decode_helpers import convert, same_file
from isal import isal_zlib

from drivepipe._extent import ZERO
from drivepipe._registry import open_image
from drivepipe._runner import run_pipeline
from drivepipe._stage import OpenOptions
from drivepipe_plugins.sources.file import SparseFileReader
from drivepipe_plugins.stages.xxh3 import Xxh3Stage
from drivepipe_plugins.targets.discard import DiscardSink

#: the ``make_sparse`` fixture of tests/conftest.py (not imported: another conftest.py
#: in a subdirectory can shadow the module name when the whole suite is collected)
MakeImage = Callable[..., Path]

MiB = 1 << 20
GiB = 1 << 30


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def tool(*args: str, src: Path) -> bytes:
    with open(src, "rb") as f:
        return subprocess.run(args, stdin=f, capture_output=True, check=True).stdout


def split_file(raw: Path, parts: int, rng: random.Random) -> list[Path]:
    """Cut ``raw`` into ``parts`` files at random offsets."""
    data = raw.read_bytes()
    cuts = sorted(rng.randrange(1, len(data)) for _ in range(parts - 1))
    out = []
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True)):
        part = raw.with_name(f"{raw.name}.part{i}")
        part.write_bytes(data[lo:hi])
        out.append(part)
    return out


def gzip_members(parts: list[Path]) -> bytes:
    return b"".join(
        tool("pigz", "-1", "-c", src=p) if i % 2 else tool("gzip", "-6", "-c", src=p)
        for i, p in enumerate(parts)
    )


def xz_streams(parts: list[Path]) -> bytes:
    out = b""
    for i, p in enumerate(parts):
        out += tool("xz", "-0", "-T2", "--block-size=256KiB", "-c", src=p) + bytes(4 * i)
    return out


def zstd_frames(parts: list[Path]) -> bytes:
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"pad"
    out = skippable
    for i, p in enumerate(parts):
        if i % 2:
            out += tool("zstd", "-q", "-1", "-c", src=p)  # from a pipe: no content size
        else:
            out += subprocess.run(["zstd", "-q", "-3", "-c", str(p)], capture_output=True,
                                  check=True).stdout
        out += skippable
    return out


def bzip2_streams(parts: list[Path]) -> bytes:
    return b"".join(tool("bzip2", "-1", "-c", src=p) for p in parts)


CASES: dict[str, tuple[list[str], Callable[[list[Path]], bytes]]] = {
    "gzip": (["gzip", "pigz"], gzip_members),
    "xz": (["xz"], xz_streams),
    "zstd": (["zstd"], zstd_frames),
    "bzip2": (["bzip2"], bzip2_streams),
}


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    "fmt", [pytest.param(f, marks=needs(*CASES[f][0])) for f in sorted(CASES)]
)
def test_decodes_like_the_original(
    tmp_path: Path, make_sparse: MakeImage, fmt: str, seed: int
) -> None:
    rng = random.Random(f"{fmt}{seed}")
    size = rng.randrange(1 * MiB, 12 * MiB) + rng.randrange(0, 4096)
    raw = make_sparse(size, seed=seed, pieces=rng.randint(1, 8), max_piece=1 * MiB,
                      zero_pieces=1)
    compressed = tmp_path / f"image.{fmt}"
    compressed.write_bytes(CASES[fmt][1](split_file(raw, rng.randint(1, 4), rng)))
    out = tmp_path / "out.raw"
    image = convert(compressed, out)
    assert image.format == fmt
    assert image.size == size
    assert same_file(out, raw)


def write_wrapping_gzip(raw: Path, target: Path) -> None:
    """One gzip member of a sparse file, holes fed as zeros (ISA-L level 1: fast)."""
    comp = isal_zlib.compressobj(1, zlib.DEFLATED, 31)
    reader = SparseFileReader(str(raw))
    try:
        with open(target, "wb") as f:
            for ext in reader.extents():
                if ext.data is not None:
                    f.write(comp.compress(ext.data))
                    continue
                for pos in range(0, ext.length, len(ZERO)):
                    f.write(comp.compress(ZERO[: min(len(ZERO), ext.length - pos)]))
            f.write(comp.flush())
    finally:
        reader.close()


def test_gzip_over_4_gib_whose_size_field_wraps(tmp_path: Path) -> None:
    """ISIZE holds the size mod 2**32; the counting pass finds the real one.

    The member is written by ISA-L level 1 (~7 s in all) rather than gzip/pigz,
    which take 30 s or more to compress 4 GiB of holes on a busy 2-core box.
    """
    size = 4 * GiB + 64 * MiB + 4321
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for offset in (0, 2 * GiB + 5, 4 * GiB + 1000):
            f.seek(offset)
            f.write(random.Random(offset).randbytes(300_000))
    gz = tmp_path / "big.gz"
    write_wrapping_gzip(raw, gz)
    with open(gz, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    assert isize == size % (1 << 32)  # the trailer lies about the size

    decoded_size, decoded = checksum(gz)
    assert decoded_size == size
    assert decoded == checksum(raw)[1]


def checksum(path: Path) -> tuple[int, str]:
    image = open_image(str(path), None, OpenOptions())
    hasher = Xxh3Stage()
    run_pipeline(image.source, [*image.stages, hasher], DiscardSink(), size=image.size)
    return image.size, hasher.hexdigest()

"""Decoder throughput: ``drivepipe convert`` of qcow2 and compressed images.

In one run this makes a sparse raw image (default 1 GiB, half of it data: a
mix of incompressible and text-like compressible blocks, the rest holes),
then:

- writes it as qcow2 three ways with qemu-img (plain, zlib-compressed,
  zstd-compressed) and times ``drivepipe convert`` against
  ``qemu-img convert -O raw`` on each (both write a sparse raw file; drivepipe
  also fsyncs it, qemu-img does not, so a second reference adds ``sync FILE``),
  plus ``drivepipe checksum`` alone (decode + hash, nothing written);
- compresses the first ``--stream-size`` of it with gzip, zstd, xz and bzip2
  and times ``drivepipe convert`` (one step: decode while writing) against
  the decompressor CLI writing a file (``gunzip -c > file``), which is the
  first of the two steps of "decompress, then upload"; the upload half of
  that comparison is added by the upload benchmark.

It prints markdown tables: seconds, ratio ours/theirs (below 1.00x means
drivepipe is faster), raw output MB/s, and peak RSS.

    python benchmarks/bench_decoders.py --size 4G --stream-size 1G --repeat 2

Files go to ``--dir`` (default: a fresh directory under /var/tmp, removed at the
end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util

BLOCK = 1 * util.MiB


def mixed_pool(seed: int, blocks: int = 32) -> list[bytes]:
    """1 MiB blocks: a third random, the rest text-like (compress to ~40-60%)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    pool = []
    for i in range(blocks):
        if i % 3 == 0:
            pool.append(rng.randbytes(BLOCK))
            continue
        text = b" ".join(rng.choices(words, k=BLOCK // 6))
        pool.append((text * 2)[:BLOCK])
    return pool


def make_image(path: Path, size: int, data_fraction: float, seed: int = 0) -> Path:
    """A sparse raw image: runs of 1 MiB data blocks separated by holes."""
    rng = random.Random(seed)
    pool = mixed_pool(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for offset in range(0, size - BLOCK + 1, BLOCK):
            if rng.random() < data_fraction:
                os.pwrite(fd, rng.choice(pool), offset)
    finally:
        os.close(fd)
    return path


@dataclass
class Row:
    image: str
    raw_size: int
    ours: util.Timing
    theirs: util.Timing | None
    theirs_label: str

    def cells(self) -> list[object]:
        mbps = self.raw_size / self.ours.best / 1e6
        theirs = self.theirs.best if self.theirs else float("nan")
        return [
            self.image,
            f"{self.ours.best:.2f}",
            f"{mbps:.0f}",
            self.theirs_label,
            f"{theirs:.2f}" if self.theirs else "-",
            util.fmt_ratio(self.ours.best, theirs) if self.theirs else "-",
            util.fmt_size(self.ours.peak_rss),
        ]


HEADERS = ["image", "drivepipe s", "raw MB/s", "reference", "reference s", "ratio", "RSS"]


def fresh(out: Path) -> Callable[[], None]:
    def before() -> None:
        util.remove(out)
        util.settle()

    return before


def shell(cmd: str) -> list[str]:
    return ["sh", "-c", cmd]


def bench_qcow2(raw: Path, work: Path, repeat: int) -> list[Row]:
    qemu = util.tool("qemu-img")
    dp = util.drivepipe_command()
    size = raw.stat().st_size
    out = work / "out.raw"
    rows = []
    for label, extra in [("qcow2", []), ("qcow2 zlib", ["-c"]),
                         ("qcow2 zstd", ["-c", "-o", "compression_type=zstd"])]:
        image = work / (label.replace(" ", "-") + ".qcow2")
        subprocess.run([qemu, "convert", "-O", "qcow2", *extra, str(raw), str(image)], check=True)
        util.warm_cache(image)
        ours = util.time_command([dp, "convert", "--progress", "none", str(image), str(out)],
                                 repeat=repeat, before=fresh(out))
        theirs = util.time_command([qemu, "convert", "-O", "raw", str(image), str(out)],
                                   repeat=repeat, before=fresh(out))
        rows.append(Row(f"{label} convert", size, ours, theirs, "qemu-img convert -O raw"))
        # drivepipe convert fsyncs before renaming into place; qemu-img does not
        synced = util.time_command(
            shell(f"{qemu} convert -O raw {image} {out} && sync {out}"),
            repeat=repeat, before=fresh(out),
        )
        rows.append(Row(f"{label} convert", size, ours, synced, "qemu-img ... && sync"))
        hashed = util.time_command([dp, "checksum", "--progress", "none", str(image)],
                                   repeat=repeat)
        rows.append(Row(f"{label} checksum", size, hashed, None, ""))
        util.remove(image)
    util.remove(out)
    return rows


STREAMS: list[tuple[str, list[str], str]] = [
    # label, compressor argv (stdin -> stdout), decompress-to-file shell command
    ("gzip", ["pigz", "-6"], "gunzip -c {src} > {dst}"),
    ("zstd", ["zstd", "-q", "-3", "-T2"], "zstd -q -d -c {src} > {dst}"),
    ("xz", ["xz", "-3", "-T2"], "xz -d -T2 -c {src} > {dst}"),
    ("bzip2", ["bzip2", "-6"], "bunzip2 -c {src} > {dst}"),
]


def bench_streams(raw: Path, work: Path, stream_size: int, repeat: int) -> list[Row]:
    dp = util.drivepipe_command()
    part = work / "stream.raw"
    with open(raw, "rb") as src, open(part, "wb") as dst:
        left = stream_size
        while left > 0:
            chunk = src.read(min(left, 8 * util.MiB))
            dst.write(chunk)
            left -= len(chunk)
    size = part.stat().st_size
    out = work / "out.raw"
    rows = []
    for label, compressor, decompress in STREAMS:
        if shutil.which(compressor[0]) is None:
            continue
        image = work / f"stream.{label}"
        with open(part, "rb") as src, open(image, "wb") as dst:
            subprocess.run(compressor, stdin=src, stdout=dst, check=True)
        util.warm_cache(image)
        ours = util.time_command([dp, "convert", "--progress", "none", str(image), str(out)],
                                 repeat=repeat, before=fresh(out))
        cmd = decompress.format(src=image, dst=out) + f" && sync {out}"
        theirs = util.time_command(shell(cmd), repeat=repeat, before=fresh(out),
                                   label=decompress)
        rows.append(Row(f"{label} convert", size, ours, theirs, decompress.split()[0] + " to file"))
        hashed = util.time_command([dp, "checksum", "--progress", "none", str(image)],
                                   repeat=repeat)
        rows.append(Row(f"{label} checksum", size, hashed, None, ""))
        util.remove(image)
    util.remove(part)
    util.remove(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="raw size of the qcow2 test image")
    parser.add_argument("--data-fraction", type=float, default=0.5)
    parser.add_argument("--stream-size", default="256M", help="raw size of the compressed files")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", help="where to put the images (default: under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    parser.add_argument("--only", choices=["qcow2", "streams"], help="run one half only")
    args = parser.parse_args()
    size = util.parse_size(args.size)
    stream_size = min(util.parse_size(args.stream_size), size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-decoders-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = make_image(work / "image.raw", size, args.data_fraction)
        rows: list[Row] = []
        if args.only in (None, "qcow2"):
            rows += bench_qcow2(raw, work, args.repeat)
        if args.only in (None, "streams"):
            rows += bench_streams(raw, work, stream_size, args.repeat)
        print(f"raw image: {util.fmt_size(size)}, {args.data_fraction:.0%} data; "
              f"streams: {util.fmt_size(stream_size)}; best of {args.repeat}\n")
        print(util.markdown_table(HEADERS, [r.cells() for r in rows]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

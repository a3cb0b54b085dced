"""VMDK decode: ``drivepipe convert`` of streamOptimized and monolithicSparse VMDKs
against ``qemu-img convert -O raw`` followed by ``sync`` (drivepipe fsyncs its
output; qemu-img does not).

Makes a sparse raw image (default 2 GiB, half of it data, the same mix of random
and text-like blocks as the decoder benchmark), has qemu-img write it as each
subformat, and prints one markdown table: seconds, raw MB/s, the ratio ours /
theirs (below 1.00x drivepipe is faster), and peak RSS.

    python benchmarks/bench_vmdk.py --size 2G --repeat 2 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import drivepipe_command, markdown_table, parse_size, time_command, tool, warm_cache
from bench_decoders import HEADERS, Row, fresh, make_image, shell


def bench(raw: Path, work: Path, repeat: int, threads: int) -> list[Row]:
    qemu = tool("qemu-img")
    dp = drivepipe_command()
    size = raw.stat().st_size
    out = work / "out.raw"
    rows = []
    for sub in ("streamOptimized", "monolithicSparse"):
        image = work / f"{sub}.vmdk"
        subprocess.run([qemu, "convert", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                        str(image)], check=True)
        warm_cache(image)
        ours = time_command(
            [dp, "convert", "--progress", "none", "--threads", str(threads), str(image),
             str(out)],
            repeat=repeat, before=fresh(out),
        )
        theirs = time_command(shell(f"{qemu} convert -O raw {image} {out} && sync {out}"),
                              repeat=repeat, before=fresh(out))
        rows.append(Row(f"vmdk {sub} convert", size, ours, theirs, "qemu-img ... && sync"))
        image.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-vmdk-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = make_image(work / "half.raw", args.size, 0.5)
        rows = bench(raw, work, args.repeat, args.threads)
        print(markdown_table(HEADERS, [r.cells() for r in rows]))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

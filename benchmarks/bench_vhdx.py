"""VHDX decode throughput: ``drivepipe convert`` of a dynamic VHDX vs qemu-img.

Makes a sparse raw image (default 2 GiB, half of it data in 1 MiB blocks, the
rest holes), has qemu-img write it as a dynamic VHDX (1 MiB blocks by default,
``--block-size``), then times
``drivepipe convert`` against ``qemu-img convert -O raw`` + ``sync FILE``
(drivepipe fsyncs its output before renaming it; qemu-img does not), and
``drivepipe checksum`` alone.  Prints a markdown table with the ratio
ours/theirs (below 1.00x: drivepipe is faster).

    python benchmarks/bench_vhdx.py --size 2G --repeat 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util
from bench_decoders import make_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="virtual size of the test disk")
    parser.add_argument("--data-fraction", type=float, default=0.5)
    parser.add_argument("--block-size", default="1M", help="VHDX block size (qemu-img -o)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", help="where to put the images (default: under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args()
    qemu, dp = util.tool("qemu-img"), util.drivepipe_command()
    size = util.parse_size(args.size)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(dir="/var/tmp",
                                                                 prefix="bench-vhdx-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = make_image(work / "disk.raw", size, args.data_fraction)
        image = work / "disk.vhdx"
        subprocess.run([qemu, "convert", "-O", "vhdx", "-o",
                        f"subformat=dynamic,block_size={args.block_size}", str(raw), str(image)],
                       check=True)
        digest = (util.capture(["xxh128sum", str(raw)]).split()[0]
                  if shutil.which("xxh128sum") else "")
        util.remove(raw)
        util.warm_cache(image)
        out = work / "out.raw"

        def fresh() -> None:
            util.remove(out)
            util.settle()

        ours = util.time_command([dp, "convert", "--progress", "none", str(image), str(out)],
                                 repeat=args.repeat, before=fresh)
        theirs = util.time_command(
            ["sh", "-c", f"{qemu} convert -O raw {image} {out} && sync {out}"],
                              repeat=args.repeat, before=fresh)
        hashed = util.time_command([dp, "checksum", "--progress", "none", str(image)],
                                   repeat=args.repeat)
        if digest:
            got = util.capture([dp, "checksum", "--progress", "none", str(image)]).split()[0]
            assert got == digest
        rows = [
            ["vhdx convert", f"{ours.best:.2f}", f"{size / ours.best / 1e6:.0f}",
             "qemu-img convert -O raw && sync", f"{theirs.best:.2f}",
             util.fmt_ratio(ours.best, theirs.best), util.fmt_size(ours.peak_rss)],
            ["vhdx checksum", f"{hashed.best:.2f}", f"{size / hashed.best / 1e6:.0f}", "", "-",
             "-", util.fmt_size(hashed.peak_rss)],
        ]
        print(f"dynamic VHDX, {util.fmt_size(size)} virtual, {args.data_fraction:.0%} data, "
              f"block size {args.block_size}, best of {args.repeat}\n")
        print(util.markdown_table(["image", "drivepipe s", "raw MB/s", "reference", "reference s",
                                   "ratio", "RSS"], rows))
        print(f"\nratio {ours.best / theirs.best:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

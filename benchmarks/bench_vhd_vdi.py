"""VHD and VDI throughput: ``drivepipe convert`` vs ``qemu-img convert -O raw``.

Makes a sparse raw image (default 2 GiB, half of it data in 1 MiB blocks, the
rest holes; the data mixes random and text-like blocks as in
``bench_decoders.py``), writes it with qemu-img as a dynamic VHD
(``-O vpc -o subformat=dynamic,force_size=on``) and a dynamic VDI (``-O vdi``),
then times, on each, ``drivepipe convert`` (decode, write a sparse raw file,
fsync) against ``qemu-img convert -O raw`` followed by ``sync FILE`` (qemu-img
does not fsync; drivepipe does), and against ``qemu-img convert`` alone.  Both
outputs are checked to be the same bytes once.

It prints a markdown table: seconds, ratio ours/theirs (below 1.00x means
drivepipe is faster), raw output MB/s, and peak RSS.

    python benchmarks/bench_vhd_vdi.py --size 2G --repeat 3

Files go to ``--dir`` (default: a fresh directory under /var/tmp, removed at the
end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util
from bench_decoders import HEADERS, Row, fresh, make_image, shell

IMAGES = [
    # label, qemu-img -O, -o options, qemu's format name
    ("vhd dynamic", "vpc", "subformat=dynamic,force_size=on", "vpc"),
    ("vdi dynamic", "vdi", "static=off", "vdi"),
]


def bench(raw: Path, work: Path, repeat: int) -> list[Row]:
    qemu = util.tool("qemu-img")
    dp = util.drivepipe_command()
    size = raw.stat().st_size
    out = work / "out.raw"
    ref = work / "ref.raw"
    rows = []
    for label, fmt, opts, qfmt in IMAGES:
        image = work / (label.replace(" ", "-") + "." + fmt)
        subprocess.run([qemu, "convert", "-f", "raw", "-O", fmt, "-o", opts, str(raw),
                        str(image)], check=True)
        util.warm_cache(image)
        ours = util.time_command([dp, "convert", "--progress", "none", str(image), str(out)],
                                 repeat=repeat, before=fresh(out))
        subprocess.run([qemu, "convert", "-f", qfmt, "-O", "raw", str(image), str(ref)],
                       check=True)
        if not filecmp.cmp(out, ref, shallow=False):
            raise SystemExit(f"{label}: drivepipe's output differs from qemu-img's")
        util.remove(ref)
        synced = util.time_command(
            shell(f"{qemu} convert -f {qfmt} -O raw {image} {out} && sync {out}"),
            repeat=repeat, before=fresh(out),
        )
        rows.append(Row(f"{label} convert", size, ours, synced, "qemu-img ... && sync"))
        bare = util.time_command([qemu, "convert", "-f", qfmt, "-O", "raw", str(image), str(out)],
                                 repeat=repeat, before=fresh(out))
        rows.append(Row(f"{label} convert", size, ours, bare, "qemu-img convert -O raw"))
        hashed = util.time_command([dp, "checksum", "--progress", "none", str(image)],
                                   repeat=repeat)
        rows.append(Row(f"{label} checksum", size, hashed, None, ""))
        util.remove(image)
    util.remove(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="raw size of the test images")
    parser.add_argument("--data-fraction", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", help="where to put the images (default: under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args()
    size = util.parse_size(args.size)
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-vhd-vdi-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = make_image(work / "image.raw", size, args.data_fraction)
        rows = bench(raw, work, args.repeat)
        print(f"raw image: {util.fmt_size(size)}, {args.data_fraction:.0%} data; "
              f"best of {args.repeat}\n")
        print(util.markdown_table(HEADERS, [r.cells() for r in rows]))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

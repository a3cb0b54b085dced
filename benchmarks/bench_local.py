"""Local throughput: ``drivepipe checksum``/``convert`` against xxh128sum and cp.

In one run on one machine this makes a sparse image (default 8 GiB, 10% data in
random 4 MiB extents) and a dense image (default 2 GiB of random data), then
times, best of N with a warm page cache:

- ``drivepipe checksum`` against ``xxh128sum`` (and checks the digests agree);
- ``drivepipe convert`` against ``cp --sparse=always``, and against
  ``cp --sparse=always`` followed by ``sync FILE``, since convert fsyncs its
  output before renaming it into place and plain cp does not.

It prints a markdown table: best wall seconds, the ratio ours/theirs (below
1.00x means drivepipe is faster), best CPU seconds (user+system; steadier than
wall time on a busy machine), and the peak RSS of each process.

    python benchmarks/bench_local.py --sparse-size 8G --dense-size 2G --repeat 3

Files go to ``--dir`` (default: a fresh directory under /var/tmp, removed at the
end unless ``--keep``); it needs room for the images plus one output copy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util


@dataclass
class Comparison:
    image: str
    task: str
    ours: util.Timing
    theirs: util.Timing

    def row(self) -> list[object]:
        return [
            self.image,
            self.task,
            f"{self.ours.best:.2f}",
            f"{self.theirs.best:.2f}",
            util.fmt_ratio(self.ours.best, self.theirs.best),
            f"{self.ours.best_cpu:.2f}",
            f"{self.theirs.best_cpu:.2f}",
            util.fmt_size(self.ours.peak_rss),
            util.fmt_size(self.theirs.peak_rss),
        ]


HEADERS = [
    "image", "task", "drivepipe s", "reference s", "ratio", "drivepipe cpu s", "reference cpu s",
    "drivepipe RSS", "reference RSS",
]


def bench_checksum(name: str, image: Path, repeat: int) -> Comparison:
    dp = util.drivepipe_command()
    ours_argv = [dp, "checksum", "--progress", "none", str(image)]
    theirs_argv = [util.tool("xxh128sum"), str(image)]
    if util.capture(ours_argv) != util.capture(theirs_argv):
        sys.exit(f"checksum of {image} differs from xxh128sum")
    ours = util.time_command(ours_argv, repeat=repeat)
    theirs = util.time_command(theirs_argv, repeat=repeat)
    return Comparison(name, "checksum vs xxh128sum", ours, theirs)


def bench_convert(name: str, image: Path, out: Path, repeat: int) -> list[Comparison]:
    dp = util.drivepipe_command()
    cp = util.tool("cp")

    def clear() -> None:
        util.remove(out)
        util.settle()

    ours = util.time_command(
        [dp, "convert", "--progress", "none", str(image), str(out)], repeat=repeat, before=clear
    )
    ours_alloc = util.allocated(out)
    cp_plain = util.time_command(
        [cp, "--sparse=always", str(image), str(out)], repeat=repeat, before=clear
    )
    cp_alloc = util.allocated(out)
    cp_sync = util.time_command(
        ["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh", str(image), str(out)],
        repeat=repeat,
        before=clear,
    )
    util.remove(out)
    print(
        f"{name}: output allocated: drivepipe {util.fmt_size(ours_alloc)}, "
        f"cp {util.fmt_size(cp_alloc)}",
        file=sys.stderr,
    )
    return [
        Comparison(name, "convert vs cp --sparse=always", ours, cp_plain),
        Comparison(name, "convert vs cp --sparse=always + sync", ours, cp_sync),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparse-size", default="8G", help="size of the sparse image (8G)")
    p.add_argument("--data-fraction", type=float, default=0.1, help="data share of it (0.1)")
    p.add_argument("--dense-size", default="2G", help="size of the dense image (2G)")
    p.add_argument("--repeat", type=int, default=3, help="runs per command; best is kept (3)")
    p.add_argument("--dir", type=Path, default=None, help="where to put the files")
    p.add_argument("--keep", action="store_true", help="keep the images afterwards")
    p.add_argument("--only", choices=["sparse", "dense"], default=None, help="one image only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="drivepipe-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[Comparison] = []
    try:
        empty = workdir / "empty.raw"
        empty.touch()
        startup = util.time_command(
            [util.drivepipe_command(), "checksum", "--progress", "none", str(empty)],
            repeat=args.repeat,
        )
        images: list[tuple[str, Path]] = []
        if args.only in (None, "sparse"):
            size = util.parse_size(args.sparse_size)
            path = util.make_sparse_image(
                workdir / "sparse.raw", size, data_fraction=args.data_fraction
            )
            data = util.fmt_size(util.allocated(path))
            images.append((f"sparse {util.fmt_size(size)} ({data} data)", path))
        if args.only in (None, "dense"):
            size = util.parse_size(args.dense_size)
            path = util.make_dense_image(workdir / "dense.raw", size)
            images.append((f"dense {util.fmt_size(size)}", path))
        for name, path in images:
            util.warm_cache(path)
            print(f"timing {name} ...", file=sys.stderr)
            results.append(bench_checksum(name, path, args.repeat))
            results.extend(bench_convert(name, path, workdir / "out.raw", args.repeat))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"best of {args.repeat}, warm page cache; ratio = drivepipe / reference "
          "(below 1.00x: drivepipe faster)\n")
    print(util.markdown_table(HEADERS, [r.row() for r in results]))
    print(f"\ndrivepipe start-up (checksum of an empty file, included in every drivepipe "
          f"time above): {startup.best:.2f} s wall, {startup.best_cpu:.2f} s cpu")


if __name__ == "__main__":
    main()

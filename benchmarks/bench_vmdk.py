"""VMDK decode: ``drivepipe convert`` of streamOptimized and monolithicSparse VMDKs
against ``qemu-img convert -O raw`` followed by ``sync`` (drivepipe fsyncs its
output; qemu-img does not).

Makes a sparse raw image (default 2 GiB, half of it data, the same mix of random
and text-like blocks as the decoder benchmark), has qemu-img write it as each
subformat, and prints one markdown table: seconds, raw MB/s, the ratio ours /
theirs (below 1.00x drivepipe is faster), and peak RSS.  With ``--upload`` it
also times the one-step upload to a local drive store on disk against
``qemu-img convert -O raw`` then ``curl --upload-file``.

    python benchmarks/bench_vmdk.py --size 2G --repeat 2 --threads 2
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util
from bench_decoders import HEADERS, Row, fresh, make_image, shell
from bench_upload import curl_argv, running_store, throwaway_account


def bench(raw: Path, work: Path, repeat: int, threads: int, upload: bool = False) -> list[Row]:
    qemu = util.tool("qemu-img")
    dp = util.drivepipe_command()
    size = raw.stat().st_size
    out = work / "out.raw"
    rows = []
    for sub in ("streamOptimized", "monolithicSparse"):
        image = work / f"{sub}.vmdk"
        subprocess.run([qemu, "convert", "-O", "vmdk", "-o", f"subformat={sub}", str(raw),
                        str(image)], check=True)
        util.warm_cache(image)
        ours = util.time_command(
            [dp, "convert", "--progress", "none", "--threads", str(threads), str(image),
             str(out)],
            repeat=repeat, before=fresh(out),
        )
        theirs = util.time_command(shell(f"{qemu} convert -O raw {image} {out} && sync {out}"),
                                   repeat=repeat, before=fresh(out))
        rows.append(Row(f"vmdk {sub} convert", size, ours, theirs, "qemu-img ... && sync"))
        if upload:
            rows.append(bench_upload(image, work, repeat, threads, sub, size))
        image.unlink()
    return rows


def bench_upload(image: Path, work: Path, repeat: int, threads: int, sub: str,
                 size: int) -> Row:
    """One-step upload vs qemu-img to a raw file, then curl, against the local store."""
    password, netrc = throwaway_account(work)
    with running_store(work / "store", password, netrc) as store:
        def clean() -> None:
            store.delete_drives()
            util.remove(work / "tmp.raw")

        ours = util.time_command(
            [util.drivepipe_command(), "upload", "--progress", "none", "--threads",
                             str(threads), "--endpoint", store.base_url, str(image)],
                            repeat=repeat, before=clean)
        tmp = work / "tmp.raw"
        two = shell(f"{util.tool('qemu-img')} convert -O raw {image} {tmp} && "
                    + shlex.join(curl_argv(store, tmp)) + " > /dev/null")
        theirs = util.time_command(two, repeat=repeat, before=clean)
    return Row(f"vmdk {sub} upload", size, ours, theirs, "qemu-img to raw + curl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=util.parse_size, default=util.parse_size("2G"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--upload", action="store_true",
                        help="also time the one-step upload against qemu-img + curl")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-vmdk-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        raw = make_image(work / "half.raw", args.size, 0.5)
        rows = bench(raw, work, args.repeat, args.threads, args.upload)
        print(util.markdown_table(HEADERS, [r.cells() for r in rows]))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

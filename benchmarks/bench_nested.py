"""One-step upload of a compressed qcow2 vs decompress + qemu-img convert + curl.

Makes a sparse raw image (default 2 GiB, half of it data: a mix of random and
text-like blocks), writes it as qcow2 with qemu-img, compresses that with
``xz -T2`` (several blocks: read in place by drivepipe) and with ``gzip``
(one stream: drivepipe spools it), then times, alternately, against a local
drive store on disk:

- ``drivepipe upload disk.qcow2.xz`` (one step: decode, qcow2, hash, send), and
- ``unxz -T2 -k`` then ``qemu-img convert -O raw`` then ``curl --upload-file``
  (what a user does without drivepipe: two temporary files, three tools),

and the same with gzip / gunzip.  Prints a markdown table: seconds, ratio
(ours / theirs; below 1.00x drivepipe is faster) and drivepipe's peak RSS.

    python benchmarks/bench_nested.py --size 2G --repeat 2
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
from bench_decoders import make_image
from bench_upload import curl_argv, running_store, throwaway_account

HEADERS = ["image", "drivepipe s", "unpack+qemu-img+curl s", "ratio", "drivepipe RSS",
           "spooled"]


def shell(cmd: str) -> list[str]:
    return ["sh", "-c", cmd]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args(argv)
    size = util.parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-nested-", dir=args.dir))
    try:
        run(work, size, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size: int, repeat: int) -> None:
    qemu = util.tool("qemu-img")
    raw = make_image(work / "disk.raw", size, 0.5)
    qcow = work / "disk.qcow2"
    subprocess.run([qemu, "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    util.remove(raw)
    packed = {
        "qcow2.xz (xz -T2)": (work / "disk.qcow2.xz", ["xz", "-T2", "-k", "-c"], "unxz -T2 -c"),
        "qcow2.gz (gzip)": (work / "disk.qcow2.gz", ["gzip", "-c"], "gunzip -c"),
    }
    for path, cmd, _ in packed.values():
        with open(path, "wb") as out:
            subprocess.run([*cmd, str(qcow)], stdout=out, check=True)
    util.remove(qcow)
    password, netrc = throwaway_account(work)
    rows = []
    with running_store(work / "store", password, netrc) as store:
        for label, (path, _, unpack) in packed.items():
            ours, theirs = util.Timing("drivepipe"), util.Timing("three steps")
            tmp_q, tmp_raw = work / "tmp.qcow2", work / "tmp.raw"
            # the three steps must all succeed (an exit status that hid a failed curl
            # would time a shorter job); the temporary files go between runs, untimed
            two_step = shell(
                f"{unpack} {path} > {tmp_q} && {qemu} convert -O raw {tmp_q} {tmp_raw} && "
                + shlex.join(curl_argv(store, tmp_raw)) + " > /dev/null"
            )
            one_step = [util.drivepipe_command(), "upload", str(path), "--endpoint", store.base_url,
                        "--progress", "none", "--spool-dir", str(work)]
            for _ in range(repeat):  # alternately, so both see the same machine
                for timing, cmd in ((ours, one_step), (theirs, two_step)):
                    store.delete_drives()
                    util.remove(tmp_q)
                    util.remove(tmp_raw)
                    util.settle()
                    usage = util.run_measured(cmd)
                    timing.seconds.append(usage.wall)
                    timing.peak_rss = max(timing.peak_rss, usage.peak_rss)
            spooled = "no" if "xz" in label else "yes"
            rows.append([label, f"{ours.best:.2f}", f"{theirs.best:.2f}",
                         util.fmt_ratio(ours.best, theirs.best),
                         util.fmt_size(ours.peak_rss), spooled])
    print(f"\n### One-step upload of a compressed qcow2 ({util.fmt_size(size)} disk, half data)\n")
    print(util.markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()

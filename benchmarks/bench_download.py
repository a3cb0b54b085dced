"""Download throughput: ``drivepipe download UUID`` against ``curl -o`` from the local store.

In one run on one machine this starts the local drive store (in a thread of
this process, on 127.0.0.1), puts two drives in it straight through its Python
API - a dense drive of random data (default 1 GiB) and a sparse drive with 10%
data in random 4 MiB extents (default 4 GiB) - with the checksum our upload
would store in their meta, then times, best of N with a warm page cache:

- ``drivepipe download UUID`` (probe, redirect, parallel ranges, sparse write,
  verification against the meta, fsync, rename);
- ``curl -sSfL -o FILE`` of the same download link (one stream, dense write, no
  verification, no fsync), and ``curl ... && sync FILE`` for the fsync part.

It prints a markdown table: seconds, the ratio drivepipe/curl (below 1.00x
means drivepipe is faster), the output file's allocated bytes, and peak RSS.

    python benchmarks/bench_download.py --dense-size 4G --sparse-size 16G --repeat 3

Files go to ``--dir`` (default: a fresh directory under /var/tmp, removed at
the end unless ``--keep``); it needs room for the images, the store's copies
and one output.  The curl password goes through a ``-K`` config file, not argv.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xxhash
from _util import (
    Timing,
    allocated,
    drivepipe_command,
    fmt_ratio,
    fmt_size,
    make_dense_image,
    make_sparse_image,
    markdown_table,
    parse_size,
    remove,
    time_command,
    tool,
)

from drivepipe.server import RunningServer, serve_in_thread
from drivepipe_plugins.sources.file import SparseFileReader

USER = "bench@example.com"


@dataclass
class Row:
    image: str
    tool: str
    timing: Timing
    reference: Timing
    allocated: int

    def cells(self) -> list[object]:
        return [self.image, self.tool, f"{self.timing.best:.2f}",
                fmt_ratio(self.timing.best, self.reference.best), fmt_size(self.allocated),
                fmt_size(self.timing.peak_rss)]


HEADERS = ["drive", "command", "seconds", "vs curl -o", "output allocated", "peak RSS"]


def put_drive(server: RunningServer, image: Path) -> str:
    """Store ``image`` as a finished drive (holes stay holes) with our upload's meta."""
    reader = SparseFileReader(str(image))
    digest = xxhash.xxh3_128()
    incoming = server.store.begin_direct(reader.size)
    try:
        for ext in reader.extents():
            data = ext.data if ext.data is not None else bytes(ext.length)
            incoming.write(data)
            digest.update(data)
    finally:
        reader.close()
    rec = incoming.finish()
    server.store.update(rec.uuid, name=rec.name, size=rec.size, media=rec.media,
                        meta={"drivepipe_xxh128": digest.hexdigest(),
                              "drivepipe_size": str(reader.size)})
    return rec.uuid


def curl_config(workdir: Path, password: str) -> Path:
    path = workdir / "curl.conf"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'user = "{USER}:{password}"\n')
    return path


def bench_drive(name: str, uuid: str, server: RunningServer, workdir: Path,
                repeat: int, connections: int) -> list[Row]:
    out = workdir / "out.raw"
    url = f"{server.base_url}drives/{uuid}/download/"
    conf = curl_config(workdir, server.password)
    curl = [tool("curl"), "-sSfL", "-K", str(conf), "-o", str(out), url]

    def clear() -> None:
        remove(out)

    curl_t = time_command(curl, repeat=repeat, before=clear, label="curl -o")
    curl_alloc = allocated(out)
    sync_t = time_command(["sh", "-c", '"$@" && sync "$0"', str(out), *curl], repeat=repeat,
                          before=clear, label="curl -o + sync")
    ours = [drivepipe_command(), "download", uuid, "--endpoint", server.base_url, "-o",
            str(out), "--progress", "none", "--connections", str(connections)]
    ours_t = time_command(ours, repeat=repeat, before=clear, label="drivepipe download")
    ours_alloc = allocated(out)
    remove(out)
    return [
        Row(name, "curl -o", curl_t, curl_t, curl_alloc),
        Row(name, "curl -o + sync", sync_t, curl_t, curl_alloc),
        Row(name, f"drivepipe download (verified, {connections} conn.)", ours_t, curl_t,
            ours_alloc),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense-size", default="1G", help="size of the dense drive (1G)")
    p.add_argument("--sparse-size", default="4G", help="size of the 10%%-data drive (4G)")
    p.add_argument("--data-fraction", type=float, default=0.1, help="data share (0.1)")
    p.add_argument("--connections", type=int, default=4, help="drivepipe connections (4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per command; best is kept (3)")
    p.add_argument("--dir", type=Path, default=None, help="where to put the files")
    p.add_argument("--keep", action="store_true", help="keep the files afterwards")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="drivepipe-bench-dl-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    env_backup = dict(os.environ)
    os.environ.update(CLOUDSIGMA_USERNAME=USER, CLOUDSIGMA_PASSWORD=password)
    rows: list[Row] = []
    server = serve_in_thread(str(workdir / "store"), username=USER, password=password,
                             min_size=1 << 20)
    try:
        dense_size, sparse_size = parse_size(args.dense_size), parse_size(args.sparse_size)
        drives = [
            (f"dense {fmt_size(dense_size)}", make_dense_image(workdir / "dense.raw", dense_size)),
            (f"sparse {fmt_size(sparse_size)}, {args.data_fraction:.0%} data",
             make_sparse_image(workdir / "sparse.raw", sparse_size,
                               data_fraction=args.data_fraction)),
        ]
        for name, image in drives:
            uuid = put_drive(server, image)
            remove(image)  # the store holds its own copy
            print(f"timing {name} ...", file=sys.stderr)
            rows.extend(bench_drive(name, uuid, server, workdir, args.repeat, args.connections))
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(env_backup)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"best of {args.repeat}, local store on 127.0.0.1, warm page cache; ratio = "
          "seconds / curl -o seconds (below 1.00x: faster than curl)\n")
    print(markdown_table(HEADERS, [r.cells() for r in rows]))


if __name__ == "__main__":
    main()

"""Upload throughput: ``drivepipe upload`` against ``curl --upload-file`` to the local store.

In one run this starts the local drive store (``drivepipe serve --port 0`` in
its own process, drives under the work directory, so on the same disk as the
images), makes a dense image (default 1 GiB of random data) and a sparse one
(default 4 GiB with 10% data in random 4 MiB extents), and times, best of N
with a warm page cache and the store's drives deleted between runs:

- ``drivepipe upload`` (which also hashes the image with xxh3-128 and stores
  the digest in the drive's meta: one extra small PUT);
- ``curl --request POST --upload-file IMAGE`` with the same headers
  (``Content-Type: application/octet-stream``, no ``Expect: 100-continue``)
  and the credentials from a netrc file, as the seed's documented command does
  (with ``--user`` on its command line there);
- with ``--sweep``, ``drivepipe upload --buffer-size B`` for each B given, on
  the dense image.

It prints a markdown table: seconds, GB/s of raw image, the ratio
drivepipe/curl (below 1.00x: drivepipe faster) and the peak RSS of each
client process.  Both clients talk to the same store process, so the store's
own speed (a Python server writing a sparse file) caps both.  With
``--nginx`` (needs nginx on PATH) the same uploads also go to an nginx that
reads and discards the body and answers a fixed UUID: the client's own cost,
without the store's disk writes (drivepipe runs with ``--no-meta`` there).

    python benchmarks/bench_upload.py                      # 1 GiB dense, 4 GiB sparse
    python benchmarks/bench_upload.py --dense-size 4G --sparse-size 16G
    python benchmarks/bench_upload.py --sweep 64K,512K,1M,2M --only dense --nginx

Files go to ``--dir`` (default: a fresh directory under /var/tmp, removed at
the end unless ``--keep``); it needs room for the images plus one drive.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    settle,
    time_command,
    tool,
    warm_cache,
)

from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint

USER = "bench@localhost"


@dataclass
class Target:
    """Where the uploads go and what a client needs to reach it."""

    name: str
    base_url: str
    password: str
    netrc: Path
    #: extra drivepipe options for this target
    options: tuple[str, ...] = ()

    def delete_drives(self) -> None:
        """Undo the runs' effects between runs (untimed)."""


@dataclass
class Store(Target):
    """A ``drivepipe serve`` process."""

    def delete_drives(self) -> None:
        """Remove every drive (untimed, between runs) so the disk does not fill up."""
        ep = Endpoint(self.base_url, self.base_url)
        with ApiClient(ep, Credentials(USER, self.password)) as api:
            listing = api.get_json("drives/", {"limit": 0})
            for drive in listing.get("objects", []):
                api.request("DELETE", api.url(f"drives/{drive['uuid']}/"))


def throwaway_account(workdir: Path) -> tuple[str, Path]:
    """A random password, put in the environment and in a netrc file for curl."""
    password = secrets.token_urlsafe(16)
    netrc = workdir / "bench.netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {password}\n")
    netrc.chmod(0o600)
    # The store and every timed drivepipe run take the account from the environment.
    os.environ.update({"CLOUDSIGMA_USERNAME": USER, "CLOUDSIGMA_PASSWORD": password})
    os.environ.pop("CLOUDSIGMA_CONFIG", None)
    return password, netrc


@contextmanager
def running_store(root: Path, password: str, netrc: Path) -> Iterator[Store]:
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [drivepipe_command(), "serve", "--root", str(root), "--port", "0", "--quiet",
         "--min-size", "1M"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        if not base_url.startswith("http"):
            sys.exit("drivepipe serve did not start")
        yield Store("store", base_url, password, netrc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_max_body_size 0;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 201 "00000000-0000-4000-8000-000000000000\\n"; }}
    # the account check drivepipe makes before it sends anything
    location = /api/2.0/drives/ {{
      default_type application/json;
      return 200 '{{"meta": {{"total_count": 0}}, "objects": []}}';
    }}
    # the drive's name and meta, written after the upload (GET then PUT)
    location ~ ^/api/2.0/drives/[0-9a-f-]+/$ {{
      default_type application/json;
      return 200 '{{"uuid": "00000000-0000-4000-8000-000000000000", "name": "bench",
                   "size": 1, "media": "disk", "status": "unmounted", "meta": {{}}}}';
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_nginx(workdir: Path, password: str, netrc: Path) -> Iterator[Target]:
    """An nginx that reads and discards request bodies: no server-side cost to speak of."""
    conf_dir = workdir / "nginx"
    conf_dir.mkdir(exist_ok=True)
    port = free_port()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, port=port))
    proc = subprocess.Popen([tool("nginx"), "-c", str(conf), "-p", str(conf_dir)],
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield Target("nginx (discard)", f"http://127.0.0.1:{port}/api/2.0/", password, netrc,
                     ("--no-meta",))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_listening(port: int, tries: int = 100) -> None:
    for _ in range(tries):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nginx did not listen on {port}")


@dataclass
class Row:
    image: str
    target: str
    size: int
    ours: Timing
    theirs: Timing | None
    label: str = "drivepipe upload"

    def cells(self) -> list[object]:
        theirs = self.theirs
        return [
            self.image,
            self.target,
            self.label,
            f"{self.ours.best:.2f}",
            f"{self.size / self.ours.best / 1e9:.2f}",
            f"{theirs.best:.2f}" if theirs else "",
            f"{self.size / theirs.best / 1e9:.2f}" if theirs else "",
            fmt_ratio(self.ours.best, theirs.best) if theirs else "",
            fmt_size(self.ours.peak_rss),
            fmt_size(theirs.peak_rss) if theirs else "",
        ]


HEADERS = ["image", "to", "drivepipe run", "drivepipe s", "GB/s", "curl s", "curl GB/s",
           "ratio", "drivepipe RSS", "curl RSS"]


def drivepipe_argv(store: Target, image: Path, *extra: str) -> list[str]:
    return [drivepipe_command(), "upload", str(image), "--endpoint", store.base_url,
            "--progress", "none", *store.options, *extra]


def curl_argv(store: Target, image: Path) -> list[str]:
    return [tool("curl"), "--silent", "--show-error", "--fail", "--request", "POST",
            "--netrc-file", str(store.netrc),
            "--header", "Content-Type: application/octet-stream", "--header", "Expect:",
            "--upload-file", str(image), f"{store.base_url}drives/upload/"]


def timed(store: Target, argv: list[str], repeat: int) -> Timing:
    def clean() -> None:
        store.delete_drives()
        settle()

    return time_command(argv, repeat=repeat, before=clean)


def bench_image(store: Target, name: str, image: Path, repeat: int) -> Row:
    ours = timed(store, drivepipe_argv(store, image), repeat)
    theirs = timed(store, curl_argv(store, image), repeat)
    return Row(name, store.name, image.stat().st_size, ours, theirs)


def sweep(store: Target, name: str, image: Path, sizes: list[str], repeat: int) -> list[Row]:
    rows = []
    for size in sizes:
        timing = timed(store, drivepipe_argv(store, image, "--buffer-size", size), repeat)
        rows.append(Row(name, store.name, image.stat().st_size, timing, None,
                        f"--buffer-size {size}"))
    return rows


def bench_target(
    store: Target, images: list[tuple[str, Path]], args: argparse.Namespace
) -> list[Row]:
    rows: list[Row] = []
    for name, path in images:
        warm_cache(path)
        print(f"timing {name} -> {store.name} ...", file=sys.stderr)
        rows.append(bench_image(store, name, path, args.repeat))
        if args.sweep and name.startswith("dense"):
            rows.extend(sweep(store, name, path, args.sweep.split(","), args.repeat))
    store.delete_drives()
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense-size", default="1G", help="size of the dense image (1G)")
    p.add_argument("--sparse-size", default="4G", help="size of the sparse image (4G)")
    p.add_argument("--data-fraction", type=float, default=0.1, help="data share (0.1)")
    p.add_argument("--repeat", type=int, default=3, help="runs per command; best kept (3)")
    p.add_argument("--sweep", default="", help="buffer sizes to try on the dense image, "
                   "comma-separated (e.g. 64K,512K,1M,2M)")
    p.add_argument("--dir", type=Path, default=None, help="where to put images and drives")
    p.add_argument("--keep", action="store_true", help="keep the images afterwards")
    p.add_argument("--only", choices=["sparse", "dense"], default=None, help="one image only")
    p.add_argument("--store-dir", type=Path, default=None,
                   help="the store's root (default: in --dir, on the images' disk)")
    p.add_argument("--nginx", action="store_true",
                   help="also upload to an nginx that discards the body (client cost only)")
    return p.parse_args(argv)


def make_images(args: argparse.Namespace, workdir: Path) -> list[tuple[str, Path]]:
    images: list[tuple[str, Path]] = []
    if args.only in (None, "dense"):
        size = parse_size(args.dense_size)
        images.append((f"dense {fmt_size(size)}",
                       make_dense_image(workdir / "dense.raw", size)))
    if args.only in (None, "sparse"):
        size = parse_size(args.sparse_size)
        path = make_sparse_image(workdir / "sparse.raw", size, data_fraction=args.data_fraction)
        images.append((f"sparse {fmt_size(size)} ({fmt_size(allocated(path))} data)", path))
    return images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="drivepipe-bench-up-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    try:
        images = make_images(args, workdir)
        password, netrc = throwaway_account(workdir)
        with running_store(args.store_dir or workdir / "store", password, netrc) as store:
            rows.extend(bench_target(store, images, args))
        if args.nginx:
            with running_nginx(workdir, password, netrc) as nginx:
                rows.extend(bench_target(nginx, images, args))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"best of {args.repeat}, warm page cache, servers on 127.0.0.1; "
          "ratio = drivepipe / curl (below 1.00x: drivepipe faster)\n")
    print(markdown_table(HEADERS, [r.cells() for r in rows]))


if __name__ == "__main__":
    main()

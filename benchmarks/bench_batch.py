"""Batch throughput: ``drivepipe batch --jobs 1`` vs ``--jobs 4`` vs a shell loop of uploads.

In one run this starts the local drive store (``drivepipe serve --port 0``),
makes ``--count`` dense images of ``--size`` (default 16 of 256 MiB), and
uploads all of them three ways, the store's drives deleted between runs:

- a shell loop, ``for i in images; do drivepipe upload $i; done``;
- ``drivepipe batch PLAN --jobs 1``;
- ``drivepipe batch PLAN --jobs 4``.

A real migration goes over a WAN, where each TCP connection is capped (by the
round trip time, a per-flow shaper), not the host's link.  The store has no
bandwidth limit of its own, so with ``--rate-per-connection R`` (default 16M,
0 for none) the uploads go through a proxy in this process that lets each
connection send at most R bytes/s: then running items side by side is what
gains, as it would there.  Without it, on loopback, one upload already uses
what the two cores give.

It prints a markdown table: seconds, MB/s of raw image, and the ratio to the
shell loop (below 1.00x: faster).

    python benchmarks/bench_batch.py                               # 16 x 256 MiB
    python benchmarks/bench_batch.py --count 16 --size 16M --rate-per-connection 4M
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _util as util
from bench_upload import running_store, throwaway_account


class ThrottlingProxy:
    """Forwards 127.0.0.1:port to the store; each connection's upload capped at ``rate``."""

    def __init__(self, target: tuple[str, int], rate: int) -> None:
        self.target = target
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, self.rate),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, 0),
                             daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, rate: int) -> None:
        started, sent = time.monotonic(), 0
        try:
            while data := src.recv(256 << 10 if not rate else min(256 << 10, rate // 20 or 1)):
                dst.sendall(data)
                sent += len(data)
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@contextmanager
def endpoint(base_url: str, rate: int) -> Iterator[str]:
    if not rate:
        yield base_url
        return
    host_port = base_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    proxy = ThrottlingProxy((host, int(port)), rate)
    try:
        yield f"http://127.0.0.1:{proxy.port}/api/2.0/"
    finally:
        proxy.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--size", type=util.parse_size, default=util.parse_size("256M"))
    p.add_argument("--rate-per-connection", type=util.parse_size, default=util.parse_size("16M"),
                   help="bytes/s each connection may send (0: no cap)")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench-batch-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, workdir)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    password, netrc = throwaway_account(workdir)
    images = [util.make_dense_image(workdir / f"disk{n}.raw", args.size, seed=n)
              for n in range(args.count)]
    plan = workdir / "plan.jsonl"
    plan.write_text("".join(json.dumps({"op": "upload", "image": str(p), "name": p.stem})
                            + "\n" for p in images))
    dp = util.drivepipe_command()
    with running_store(workdir / "store", password, netrc) as store, \
            endpoint(store.base_url, args.rate_per_connection) as url:
        loop = " ".join(f"{dp} upload --progress none --endpoint {url} {p} >/dev/null;"
                        for p in images)
        runs = {
            "shell loop of uploads": ["bash", "-c", f"set -e; {loop}"],
            "batch --jobs 1": [dp, "batch", str(plan), "--jobs", "1", "--progress", "none",
                               "--endpoint", url],
            f"batch --jobs {args.jobs}": [dp, "batch", str(plan), "--jobs", str(args.jobs),
                                          "--progress", "none", "--endpoint", url],
        }
        seconds: dict[str, float] = {}
        for name, argv in runs.items():
            store.delete_drives()
            for state in workdir.glob("plan.jsonl.state.json*"):
                if state.is_dir():
                    shutil.rmtree(state)
                else:
                    state.unlink()
            seconds[name] = util.run_measured(argv).wall
    total = args.count * args.size
    base = seconds["shell loop of uploads"]
    rows = [[name, f"{s:.1f}", f"{total / s / 1e6:.0f}", util.fmt_ratio(s, base)]
            for name, s in seconds.items()]
    cap = (f"{util.fmt_size(args.rate_per_connection)}/s per connection"
           if args.rate_per_connection else "no cap")
    print(f"{args.count} images of {util.fmt_size(args.size)} (dense), store on 127.0.0.1, {cap}")
    print(util.markdown_table(["run", "seconds", "MB/s", "vs shell loop"], rows))


if __name__ == "__main__":
    main()

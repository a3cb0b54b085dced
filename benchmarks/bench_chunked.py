"""Chunked vs direct upload, and what a resume after a kill at 50% sends again.

In one run this starts the local drive store (``drivepipe serve --port 0`` in
its own process, drives under the work directory), makes a dense image of
random data (default 1 GiB; ``--size 4G`` for the issue's figure) and times,
best of N with a warm page cache and the store's drives deleted between runs:

- ``drivepipe upload IMAGE`` (direct: one POST);
- ``drivepipe upload --chunked --connections N`` for each N of ``--connections``
  (default 1,2,4), chunk size ``--chunk-size`` (default 64M).

Then it starts a chunked upload (the largest N), kills it with SIGKILL once
the journal confirms half of the chunks, reads which chunks the store holds,
and times the same command run again (it reads and hashes the whole image, the
digest covers every byte, but sends only the chunks the store lacks).  *Re-sent*
is what the resume pushed
to the network beyond the chunks the store lacked at the kill (libcurl's
body bytes, failed attempts included, from the ``--progress json`` summary).

It prints two markdown tables: seconds, GB/s of raw image, the ratio
chunked/direct (below 1.00x: chunked faster) and the peak RSS of each client;
and the resume figures.  The store is a Python process on the same 2 cores,
so it caps every run; the ratios say what chunking costs or gains against it.

    python benchmarks/bench_chunked.py                       # 1 GiB
    python benchmarks/bench_chunked.py --size 4G
    python benchmarks/bench_chunked.py --size 64M --chunk-size 4M --repeat 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import (
    Timing,
    drivepipe_command,
    fmt_ratio,
    fmt_size,
    make_dense_image,
    markdown_table,
    parse_size,
    settle,
    time_command,
    warm_cache,
)

from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint

USER = "bench@localhost"


@dataclass
class Store:
    """A ``drivepipe serve`` process and what a client needs to reach it."""

    base_url: str
    password: str
    root: Path

    def api(self) -> ApiClient:
        ep = Endpoint(self.base_url, self.base_url)
        return ApiClient(ep, Credentials(USER, self.password))

    def delete_drives(self) -> None:
        """Remove every drive (untimed, between runs) so the disk does not fill up."""
        with self.api() as api:
            for drive in api.get_json("drives/", {"limit": 0}).get("objects", []):
                api.request("DELETE", api.url(f"drives/{drive['uuid']}/"))

    def received(self, uuid: str) -> set[int]:
        """Chunks the store holds for ``uuid``, from its own record on disk."""
        record = json.loads((self.root / "drives" / f"{uuid}.json").read_text())
        return {n for first, end in record.get("received", []) for n in range(first, end)}


@contextmanager
def running_store(root: Path) -> Iterator[Store]:
    password = secrets.token_urlsafe(16)
    # The store and every timed drivepipe run take the throwaway account from here.
    os.environ.update({"CLOUDSIGMA_USERNAME": USER, "CLOUDSIGMA_PASSWORD": password,
                       "XDG_CACHE_HOME": str(root.parent / "cache")})
    os.environ.pop("CLOUDSIGMA_CONFIG", None)
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
        yield Store(base_url, password, root)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def upload_argv(store: Store, image: Path, *extra: str) -> list[str]:
    return [drivepipe_command(), "upload", str(image), "--endpoint", store.base_url,
            "--progress", "none", *extra]


def chunked_argv(store: Store, image: Path, connections: int, chunk_size: str) -> list[str]:
    return upload_argv(store, image, "--chunked", "--connections", str(connections),
                       "--chunk-size", chunk_size)


def timed(store: Store, argv: list[str], repeat: int, label: str) -> Timing:
    def clean() -> None:
        store.delete_drives()
        settle()

    return time_command(argv, repeat=repeat, before=clean, label=label)


@dataclass
class Resume:
    chunks: int
    journal_at_kill: int
    store_at_kill: int
    missing_bytes: int
    seconds: float
    wire_bytes: int

    @property
    def resent(self) -> int:
        return max(0, self.wire_bytes - self.missing_bytes)


def journal_confirmed(cache: Path) -> tuple[str, set[int]] | None:
    for path in cache.rglob("*.json"):
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        return data["uuid"], {n for a, b in data["confirmed"] for n in range(a, b)}
    return None


def kill_at_half(argv: list[str], cache: Path, chunks: int) -> str:
    """Start ``argv``, SIGKILL it once the journal confirms half the chunks; the drive UUID."""
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        while True:
            found = journal_confirmed(cache)
            if found is not None and len(found[1]) >= chunks // 2:
                proc.send_signal(signal.SIGKILL)
                return found[0]
            if proc.poll() is not None:
                sys.exit("the upload finished before half of it was confirmed; use a larger "
                         "--size or a smaller --chunk-size")
            time.sleep(0.002)


def summary_of(stderr: str) -> dict[str, Any]:
    for line in reversed(stderr.splitlines()):
        if line.startswith("{"):
            event: dict[str, Any] = json.loads(line)
            if event.get("event") == "summary":
                return event
    raise RuntimeError(f"no JSON summary in: {stderr[-500:]}")


def bench_resume(store: Store, image: Path, connections: int, chunk_size: str) -> Resume:
    size = image.stat().st_size
    nominal = parse_size(chunk_size)
    chunks = max(1, size // nominal)
    store.delete_drives()
    cache = Path(os.environ["XDG_CACHE_HOME"])
    shutil.rmtree(cache, ignore_errors=True)
    argv = chunked_argv(store, image, connections, chunk_size)
    uuid = kill_at_half(argv, cache, chunks)
    found = journal_confirmed(cache)
    at_kill = store.received(uuid)
    missing = sum(min(nominal, size - n * nominal) if n < chunks - 1 else size - n * nominal
                  for n in set(range(chunks)) - at_kill)
    argv[argv.index("none")] = "json"
    settle()  # the killed run's writes are flushed untimed, as before every timed run
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"resume failed: {proc.stderr.strip()[-500:]}")
    send = summary_of(proc.stderr)["stages"][-1]
    return Resume(chunks, len(found[1]) if found else 0, len(at_kill), missing, seconds,
                  int(send.get("wire_bytes", 0)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="size of the dense image (1G; 4G for the issue)")
    p.add_argument("--chunk-size", default="64M", help="chunk size (64M)")
    p.add_argument("--connections", default="1,2,4", help="connection counts (1,2,4)")
    p.add_argument("--repeat", type=int, default=2, help="runs per command; best kept (2)")
    p.add_argument("--dir", type=Path, default=None, help="where to put the image and drives")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-chunked-", dir=args.dir or "/var/tmp"))
    try:
        run(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    size = parse_size(args.size)
    counts = [int(n) for n in args.connections.split(",")]
    image = make_dense_image(workdir / "dense.raw", size)
    warm_cache(image)
    with running_store(workdir / "store") as store:
        direct = timed(store, upload_argv(store, image), args.repeat, "direct (one POST)")
        rows = [direct] + [
            timed(store, chunked_argv(store, image, n, args.chunk_size), args.repeat,
                  f"chunked, {n} connection{'s' if n > 1 else ''}")
            for n in counts
        ]
        resume = bench_resume(store, image, max(counts), args.chunk_size)
        store.delete_drives()
    print(f"## Chunked vs direct upload: dense {fmt_size(size)}, chunks of {args.chunk_size}, "
          f"best of {args.repeat}\n")
    print(markdown_table(
        ["run", "seconds", "GB/s", "vs direct", "peak RSS"],
        [[t.label, f"{t.best:.2f}", f"{size / t.best / 1e9:.2f}", fmt_ratio(t.best, direct.best),
          fmt_size(t.peak_rss)] for t in rows],
    ))
    full = rows[-1].best
    print(f"\n## Resume after SIGKILL at 50% ({max(counts)} connections)\n")
    print(markdown_table(
        ["chunks", "confirmed in journal at kill", "held by store at kill", "resume s",
         "resume vs full run", "sent by resume", "re-sent"],
        [[resume.chunks, resume.journal_at_kill, resume.store_at_kill, f"{resume.seconds:.2f}",
          fmt_ratio(resume.seconds, full), fmt_size(resume.wire_bytes),
          f"{fmt_size(resume.resent)} ({100 * resume.resent / size:.1f}% of the image)"]],
    ))


if __name__ == "__main__":
    main()

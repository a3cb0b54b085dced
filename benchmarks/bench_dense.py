"""Issue 16's targets: the dense path against curl, qemu-img and xxh128sum, and capped links.

Every comparison runs as alternating pairs (reference, drivepipe, reference,
drivepipe, ...) in one run, so a pair shares the machine's noise; the ratio
printed is the median of the per-pair ratios (drivepipe / reference: below
1.00x drivepipe is faster), with median seconds and the peak RSS of each side
(GNU time around the child).  Areas (``--only``, comma-separated):

- ``upload-nginx``: ``drivepipe upload --no-meta`` (xxh3 still computed) vs
  ``curl --upload-file`` to an nginx that reads and discards the body;
- ``upload-store``: the same to the local store (``drivepipe serve`` in its own
  process, store root on disk in ``--dir``), drives deleted between runs;
- ``download``: ``drivepipe download URL --expect HEX`` (verified, fsynced,
  renamed) vs ``curl -o`` from nginx (sendfile), and vs
  ``curl -o && sync && xxh128sum``;
- ``qcow2``: ``drivepipe convert`` of a plain qcow2 (half data) vs
  ``qemu-img convert -O raw && sync``;
- ``checksum``: ``drivepipe checksum`` vs ``xxh128sum``;
- ``capped-download``: nginx with ``limit_rate`` per connection (default 50m),
  ``drivepipe download --connections N`` for each N of ``--connections``;
- ``capped-chunked``: ``drivepipe upload --chunked --connections N`` to a local
  store whose every connection receives at most ``--rate`` (ServerConfig
  ``rate_limit``);
- ``shaped-chunked``: the same uploads shaped by the kernel instead: the client
  runs in a network namespace the benchmark creates (a veth pair with
  loopback addresses, nothing leaves the machine), whose egress gives every
  TCP flow its own token bucket of ``--rate`` (256 htb classes, rate = ceil,
  picked by a u32 hash of the source port's low byte; the namespace's
  ephemeral ports narrowed to 256, one per class), so a flow is capped by the
  kernel as a WAN flow is, queueing and all; the store is uncapped.  Needs
  root, ``ip`` and ``tc``; otherwise skipped with one line.

The capped areas print seconds per N and the speed-up over 1 connection.

    python benchmarks/bench_dense.py --size 1G --pairs 3            # shared machine
    python benchmarks/bench_dense.py --size 4G --pairs 5            # the issue's size
    python benchmarks/bench_dense.py --only capped-download,capped-chunked --capped-size 512M
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import (
    Pair,
    alternate,
    capture,
    drivepipe_command,
    fmt_size,
    make_dense_image,
    markdown_table,
    median,
    parse_size,
    remove,
    run_measured,
    settle,
    tool,
    warm_cache,
)
from bench_decoders import make_image as make_half_data_image
from bench_upload import (
    USER,
    Store,
    Target,
    curl_argv,
    drivepipe_argv,
    free_port,
    running_nginx,
    running_store,
    throwaway_account,
    wait_listening,
)

AREAS = ("upload-nginx", "upload-store", "download", "qcow2", "checksum", "capped-download",
         "capped-chunked", "shaped-chunked")

FILES_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location /files/ {{ alias {root}/; }}
    location /capped/ {{ alias {root}/; limit_rate {rate}; }}
  }}
}}
"""


@contextmanager
def file_server(workdir: Path, root: Path, rate: str) -> Iterator[str]:
    """nginx serving ``root`` at /files/ (sendfile) and /capped/ (limit_rate per connection)."""
    conf_dir = workdir / "nginx-files"
    conf_dir.mkdir(exist_ok=True)
    port = free_port()
    conf = conf_dir / "nginx.conf"
    root.chmod(0o755)  # mkdtemp's 0700 would keep nginx's workers (nobody) out
    conf.write_text(FILES_CONF.format(dir=conf_dir, port=port, root=root, rate=rate))
    proc = subprocess.Popen([tool("nginx"), "-c", str(conf), "-p", str(conf_dir)],
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def row(pair: Pair) -> list[object]:
    return [pair.label, f"{median(pair.reference.seconds):.2f}", f"{median(pair.ours.seconds):.2f}",
            f"{pair.ratio:.2f}x", " ".join(f"{r:.2f}" for r in pair.ratios),
            fmt_size(pair.ours.peak_rss), fmt_size(pair.reference.peak_rss)]


HEADERS = ["comparison", "reference s (median)", "drivepipe s (median)",
           "ratio (median of pairs)", "ratio of each pair", "drivepipe RSS", "reference RSS"]


def sh(cmd: str, *args: str) -> list[str]:
    return ["sh", "-c", cmd, "sh", *args]


def cleaner(store: Target | None, *paths: Path) -> Callable[[], None]:
    def clean() -> None:
        if store is not None:
            store.delete_drives()
        for p in paths:
            remove(p)
        settle()

    return clean


def bench_upload(args: argparse.Namespace, image: Path, workdir: Path) -> list[Pair]:
    password, netrc = throwaway_account(workdir)
    pairs = []
    name = f"dense {fmt_size(image.stat().st_size)}"
    if "upload-nginx" in args.only:
        with running_nginx(workdir, password, netrc) as nginx:
            pairs.append(alternate(
                f"{name} · upload vs curl --upload-file, nginx discarding",
                curl_argv(nginx, image), drivepipe_argv(nginx, image), pairs=args.pairs,
                before=settle))
    if "upload-store" in args.only:
        with running_store(args.store_dir or workdir / "store", password, netrc) as store:
            pairs.append(alternate(
                f"{name} · upload vs curl --upload-file, local store on disk",
                curl_argv(store, image), drivepipe_argv(store, image), pairs=args.pairs,
                before=cleaner(store)))
            store.delete_drives()
    return pairs


def digest_of(image: Path) -> str:
    return capture([tool("xxh128sum"), str(image)]).split()[0]


def download_outputs(out: Path) -> list[Path]:
    return [out, out.with_name(out.name + ".part"), out.with_name(out.name + ".part.journal")]


def bench_download(args: argparse.Namespace, image: Path, workdir: Path, base: str,
                   digest: str) -> list[Pair]:
    out = workdir / "out.raw"
    url = f"{base}files/{image.name}"
    curl = [tool("curl"), "-sSf", "-o", str(out), url]
    ours = [drivepipe_command(), "download", url, "-o", str(out), "--expect", digest,
            "--progress", "none", "--connections", str(args.download_connections)]
    clean = cleaner(None, *download_outputs(out))

    def check() -> None:
        if allocated_size(out) == 0 or out.stat().st_size != image.stat().st_size:
            sys.exit("drivepipe download left no full output")

    name = f"dense {fmt_size(image.stat().st_size)}"
    synced = ["sh", "-c", '"$@" && sync "$0" && xxh128sum "$0" >/dev/null', str(out), *curl]
    pairs = [
        alternate(f"{name} · download (verified, fsynced) vs curl -o", curl, ours,
                  pairs=args.pairs, before=clean, after_ours=check),
        alternate(f"{name} · download vs curl -o && sync && xxh128sum",
                  synced, ours,
                  pairs=args.pairs, before=clean, after_ours=check),
    ]
    clean()
    return pairs


def allocated_size(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def bench_qcow2(args: argparse.Namespace, workdir: Path) -> list[Pair]:
    size = parse_size(args.size)
    raw = make_half_data_image(workdir / "half.raw", size, 0.5)
    image = workdir / "plain.qcow2"
    subprocess.run([tool("qemu-img"), "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    remove(raw)
    warm_cache(image)
    out = workdir / "out.raw"
    ours = [drivepipe_command(), "convert", "--progress", "none", str(image), str(out)]
    qemu = sh('qemu-img convert -O raw "$1" "$2" && sync "$2"', str(image), str(out))
    plain = [tool("qemu-img"), "convert", "-O", "raw", str(image), str(out)]
    clean = cleaner(None, out)
    name = f"plain qcow2 ({fmt_size(size)} raw, half data)"
    pairs = [alternate(f"{name} · convert vs qemu-img convert -O raw && sync", qemu, ours,
                       pairs=args.pairs, before=clean)]
    if args.unsynced:
        pairs.append(alternate(f"{name} · convert vs qemu-img convert -O raw (no sync)", plain,
                               ours, pairs=args.pairs, before=clean))
    clean()
    remove(image)
    return pairs


def bench_checksum(args: argparse.Namespace, image: Path) -> list[Pair]:
    # as a script would call it (stderr is not a terminal here: no live view either way)
    ours = [drivepipe_command(), "checksum", str(image)]
    theirs = [tool("xxh128sum"), str(image)]
    if capture(ours).split()[0] != capture(theirs).split()[0]:
        sys.exit("drivepipe checksum differs from xxh128sum")
    return [alternate(f"dense {fmt_size(image.stat().st_size)} · checksum vs xxh128sum",
                      theirs, ours, pairs=args.pairs)]


def capped_table(title: str, seconds: dict[int, list[float]], size: int) -> str:
    one = median(seconds[min(seconds)])
    rows = [[n, " ".join(f"{s:.2f}" for s in runs), f"{median(runs):.2f}",
             f"{size / median(runs) / 1e6:.0f}", f"{one / median(runs):.2f}x"]
            for n, runs in sorted(seconds.items())]
    return f"{title}\n\n" + markdown_table(
        ["connections", "seconds of each run", "median s", "MB/s", "speed-up over 1"], rows)


def bench_capped_download(args: argparse.Namespace, image: Path, workdir: Path, base: str,
                          digest: str) -> str:
    out = workdir / "out.raw"
    url = f"{base}capped/{image.name}"
    counts = [int(n) for n in args.connections.split(",")]
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    clean = cleaner(None, *download_outputs(out))
    for _ in range(args.capped_repeat):
        for n in counts:  # interleaved: each round runs every count once
            clean()
            argv = [drivepipe_command(), "download", url, "-o", str(out), "--expect", digest,
                    "--progress", "none", "--connections", str(n)]
            if args.range_size:
                argv += ["--range-size", args.range_size]
            seconds[n].append(run_measured(argv).wall)
    clean()
    ranges = f"--range-size {args.range_size}" if args.range_size else "automatic ranges"
    return capped_table(f"Download from nginx, limit_rate {args.rate} per connection, "
                        f"{ranges}, {fmt_size(image.stat().st_size)} dense", seconds,
                        image.stat().st_size)


def chunked_rounds(args: argparse.Namespace, image: Path, workdir: Path, store_root: str,
                   prefix: tuple[str, ...] = (), **serve: Any) -> dict[int, list[float]]:
    """Seconds of ``upload --chunked`` per connection count, ``--capped-repeat`` rounds,
    to a store served from ``store_root`` (``serve``: its rate limit or host); ``prefix``
    runs the client through another command (``ip netns exec NS``)."""
    from drivepipe.server import serve_in_thread  # noqa: PLC0415 - only these areas need it

    password, _ = throwaway_account(workdir)
    cache = workdir / "cache"
    os.environ["XDG_CACHE_HOME"] = str(cache)
    counts = [int(n) for n in args.connections.split(",")]
    seconds: dict[int, list[float]] = {n: [] for n in counts}
    with serve_in_thread(store_root, username=USER, password=password, min_size=1 << 20,
                         **serve) as srv:
        store = Store("chunked store", srv.base_url, password, workdir / "unused")
        for _ in range(args.capped_repeat):
            for n in counts:
                store.delete_drives()
                shutil.rmtree(cache, ignore_errors=True)
                settle()
                argv = [*prefix, *drivepipe_argv(store, image, "--chunked", "--connections",
                                                 str(n), "--chunk-size", args.chunk_size)]
                seconds[n].append(run_measured(argv).wall)
        store.delete_drives()
    return seconds


def bench_capped_chunked(args: argparse.Namespace, image: Path, workdir: Path) -> str:
    seconds = chunked_rounds(args, image, workdir, str(workdir / "capped-store"),
                             rate_limit=parse_size(args.rate))
    return capped_table(f"Chunked upload to the local store, {args.rate}/s per connection, "
                        f"chunks of {args.chunk_size}, {fmt_size(image.stat().st_size)} dense",
                        seconds, image.stat().st_size)


#: the namespace's ephemeral ports: 256 of them, one per shaping class (the low byte)
SHAPED_PORTS = (40192, 40447)
#: loopback addresses on the veth pair (route_localnet on its two ends): the account goes
#: over plain http only to loopback, and nothing can route them off the machine
SHAPED_HOST, SHAPED_CLIENT = "127.203.0.1", "127.203.0.2"


def shaping_commands(dev: str, rate: int) -> str:
    """``tc -batch`` lines: an htb root whose 256 classes (one per low byte of the TCP
    source port) each let ``rate`` bytes a second through (rate = ceil: a token bucket
    per flow: one flow ran at 50.2 MB/s of the 52.4 asked, as under a plain ``tbf`` root or
    with a ``tbf`` leaf under its class; 4 flows at once at 50.2 MB/s each)."""
    lines = [f"qdisc add dev {dev} root handle 1: htb default 1",
             f"class add dev {dev} parent 1: classid 1:1 htb rate 10gbit quantum 60000",
             f"filter add dev {dev} parent 1: prio 1 handle 2: protocol ip u32 divisor 256",
             f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 800:: "
             "match ip protocol 6 0xff hashkey mask 0x00ff0000 at 20 link 2:"]
    for low in range(256):
        cls = f"{0x100 + low:x}"
        lines += [f"class add dev {dev} parent 1: classid 1:{cls} htb rate {rate * 8}bit "
                  f"ceil {rate * 8}bit burst 256kb cburst 256kb quantum 60000",
                  f"filter add dev {dev} parent 1: prio 1 protocol ip u32 ht 2:{low:x}: "
                  f"match u32 0 0 flowid 1:{cls}"]
    return "\n".join(lines) + "\n"


@contextmanager
def shaped_namespace(workdir: Path, rate: int) -> Iterator[str | None]:
    """A network namespace whose every TCP flow out is capped at ``rate``; its name, or
    None (after one line saying why) where it cannot be made."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        print("shaped-chunked: skipped (needs root, ip and tc)", file=sys.stderr)
        yield None
        return
    name, host_dev, ns_dev = f"dpbench{os.getpid()}", f"dpb{os.getpid()}a", f"dpb{os.getpid()}b"
    batch = workdir / "shaping.tc"
    batch.write_text(shaping_commands(ns_dev, rate))
    steps = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev],
        ["ip", "link", "set", ns_dev, "netns", name],
        ["ip", "addr", "add", f"{SHAPED_HOST}/30", "dev", host_dev],
        ["ip", "link", "set", host_dev, "up"],
        ["sysctl", "-q", "-w", f"net.ipv4.conf.{host_dev}.route_localnet=1"],
        ["ip", "netns", "exec", name, "sysctl", "-q", "-w",
         f"net.ipv4.conf.{ns_dev}.route_localnet=1"],
        ["ip", "-n", name, "addr", "add", f"{SHAPED_CLIENT}/30", "dev", ns_dev],
        ["ip", "-n", name, "link", "set", ns_dev, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "netns", "exec", name, "sysctl", "-q", "-w",
         f"net.ipv4.ip_local_port_range={SHAPED_PORTS[0]} {SHAPED_PORTS[1]}"],
        ["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"],
        ["tc", "-n", name, "-batch", str(batch)],
    ]
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"shaped-chunked: skipped ({' '.join(step[:4])}: "
                      f"{done.stderr.strip().splitlines()[-1:] or done.returncode})",
                      file=sys.stderr)
                yield None
                return
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def bench_shaped_chunked(args: argparse.Namespace, image: Path, workdir: Path) -> str | None:
    with shaped_namespace(workdir, parse_size(args.rate)) as namespace:
        if namespace is None:
            return None
        seconds = chunked_rounds(args, image, workdir, str(workdir / "shaped-store"),
                                 ("ip", "netns", "exec", namespace), host=SHAPED_HOST)
    return capped_table(f"Chunked upload from a network namespace, every TCP flow shaped "
                        f"by the kernel (htb) to {args.rate}/s, chunks of {args.chunk_size}, "
                        f"{fmt_size(image.stat().st_size)} dense", seconds,
                        image.stat().st_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="dense image size (1G; the issue's: 4G)")
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs per comparison (3)")
    p.add_argument("--only", default=",".join(AREAS), help=f"areas: {','.join(AREAS)}")
    p.add_argument("--dir", type=Path, default=None, help="work directory (on disk)")
    p.add_argument("--store-dir", type=Path, default=None, help="the store's root (in --dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--unsynced", action="store_true",
                   help="also compare qcow2 convert with qemu-img without sync")
    p.add_argument("--download-connections", type=int, default=4,
                   help="drivepipe download connections in the uncapped runs (4)")
    p.add_argument("--rate", default="50M", help="per-connection cap of the capped areas (50M)")
    p.add_argument("--capped-size", default="1G", help="image size of the capped areas (1G)")
    p.add_argument("--connections", default="1,2,4,8", help="connection counts, capped areas")
    p.add_argument("--capped-repeat", type=int, default=2, help="rounds of the capped areas")
    p.add_argument("--chunk-size", default="16M", help="chunk size, capped chunked upload")
    p.add_argument("--range-size", default="",
                   help="range size, capped download (default: drivepipe's own)")
    args = p.parse_args(argv)
    args.only = set(args.only.split(","))
    if args.only - set(AREAS):
        p.error(f"unknown areas: {', '.join(sorted(args.only - set(AREAS)))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench-dense-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%H:%M", time.gmtime())
    pairs: list[Pair] = []
    capped: list[str] = []
    try:
        needs_dense = args.only & {"upload-nginx", "upload-store", "download", "checksum"}
        image = workdir / "dense.raw"
        if needs_dense:
            make_dense_image(image, parse_size(args.size))
            warm_cache(image)
            print(f"{started} UTC: dense image of {fmt_size(image.stat().st_size)} made",
                  file=sys.stderr)
        if "checksum" in args.only:
            pairs += bench_checksum(args, image)
        if args.only & {"upload-nginx", "upload-store"}:
            pairs += bench_upload(args, image, workdir)
        if "download" in args.only:
            digest = digest_of(image)
            with file_server(workdir, workdir, args.rate) as base:
                pairs += bench_download(args, image, workdir, base, digest)
        if "qcow2" in args.only:
            pairs += bench_qcow2(args, workdir)
        if args.only & {"capped-download", "capped-chunked", "shaped-chunked"}:
            small = workdir / "capped.raw"
            make_dense_image(small, parse_size(args.capped_size), seed=3)
            warm_cache(small)
            if "capped-download" in args.only:
                with file_server(workdir, workdir, args.rate.lower()) as base:
                    capped.append(bench_capped_download(args, small, workdir, base,
                                                        digest_of(small)))
            if "capped-chunked" in args.only:
                capped.append(bench_capped_chunked(args, small, workdir))
            if "shaped-chunked" in args.only:
                shaped = bench_shaped_chunked(args, small, workdir)
                if shaped is not None:
                    capped.append(shaped)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if pairs:
        print(f"{len(pairs[0].ours.seconds)} alternating pairs each (reference first), warm "
              "page cache, writeback flushed before every run; ratio = drivepipe / reference\n")
        print(markdown_table(HEADERS, [row(p) for p in pairs]))
    for table in capped:
        print(f"\n{table}")


if __name__ == "__main__":
    main()

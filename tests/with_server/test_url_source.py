"""Images at http(s) URLs: the ``url`` byte source against a real nginx and a small
threaded server, through the real CLI commands and the real local drive store.

nginx (the download tests' fixture, on 127.0.0.1) serves a tmp directory at
``/files/`` (ranges, ETag) and ``/noranges/`` (``max_ranges 0``: a sequential
source), logs every request with its user (so the requests a qcow2 costs are
counted, and credentials seen) and redirects ``/api/2.0/redir`` to
``127.0.0.2:other_port/image.raw``, where a recording server of this file shows
on the wire whether credentials crossed to another origin.  The threaded server
of this file misbehaves on purpose: it cuts a body after N bytes, replaces a file
(new ETag) while it is read, or answers without a Content-Length.  Images are made by qemu-img, gzip
and xz themselves.
"""

from __future__ import annotations

import http.server
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash
from sparse_files import random_layout, write_sparse
from test_download_nginx import Nginx, digest
from test_download_nginx import nginx as download_nginx  # noqa: F401 - a fixture, by this name
from test_stdin_size import upload

from drivepipe._errors import AuthError, SizeMismatch, TransferError, UsageError
from drivepipe._registry import open_image
from drivepipe._stage import OpenOptions
from drivepipe.cli import main
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.transport.curl import TlsOptions
from drivepipe.transport.retry import RetryPolicy
from drivepipe_plugins.sources.url import UrlSource

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
QEMU_IMG = shutil.which("qemu-img")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(NGINX), reason="needs nginx"),
    pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img"),
    pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz"),
]

MiB = 1 << 20
FAST_RETRY = RetryPolicy(retries=4, base=0.01, cap=0.05)
#: seconds a stalling answer pauses (the source's stall timeout is 1 s in that test)
STALL = 4.0


@pytest.fixture(scope="module")
def nginx(download_nginx: Nginx) -> Nginx:  # noqa: F811 - the fixture imported above
    """The nginx of the download tests (its config: /files/, /noranges/, /api/2.0/redir
    to 127.0.0.2:other_port/image.raw); requests are counted in its access log."""
    return download_nginx


def requests(nginx: Nginx, since: int, part: str) -> list[str]:
    """nginx's log lines after line ``since`` for a URI containing ``part``."""
    time.sleep(0.2)  # nginx logs a request when it has finished it: let it settle
    return [line for line in nginx.log_lines()[since:] if part in line.split()[0]]


# --- images ----------------------------------------------------------------------------

def sparse_raw(path: Path, size: int, seed: int, pieces: int = 10) -> Path:
    """A sparse raw disk with random data, runs of zeros inside it, data at the very end."""
    rng = random.Random(seed)
    layout = random_layout(rng, size - 700, pieces, MiB, zero_pieces=2)
    return write_sparse(path, size, [*layout, (size - 700, rng.randbytes(700))])


@dataclass
class Images:
    raw: Path
    gz: Path
    qcow2: Path
    qcow2_xz: Path
    qcow2_xz1: Path  # one xz block: decoded through a spool

    def all(self) -> dict[str, Path]:
        return {"raw": self.raw, "gzip": self.gz, "qcow2": self.qcow2,
                "xz-qcow2": self.qcow2_xz, "xz1-qcow2": self.qcow2_xz1}


def sh(*args: str, stdout: Any = None) -> None:
    subprocess.run(args, check=True, timeout=60, stdout=stdout)


@pytest.fixture(scope="module")
def images(nginx: Nginx) -> Images:
    www = nginx.www
    raw = sparse_raw(www / "disk.raw", 24 * MiB + 4096 * 3 + 512, seed=11)
    gz = www / "disk.raw.gz"
    with open(gz, "wb") as out:
        sh("gzip", "-1", "-c", str(raw), stdout=out)
    qcow2 = www / "disk.qcow2"
    sh(str(QEMU_IMG), "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    qcow2_xz = www / "disk.qcow2.xz"
    with open(qcow2_xz, "wb") as out:
        sh("xz", "-1", "-c", "-T2", "--block-size=2MiB", str(qcow2), stdout=out)
    qcow2_xz1 = www / "disk1.qcow2.xz"
    with open(qcow2_xz1, "wb") as out:
        sh("xz", "-1", "-c", "-T1", str(qcow2), stdout=out)
    return Images(raw, gz, qcow2, qcow2_xz, qcow2_xz1)


def cli(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main([*argv])
    out, err = capfd.readouterr()
    return code, out, err


# --- through the commands -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["raw", "gzip", "qcow2", "xz-qcow2", "xz1-qcow2"])
def test_checksum_and_convert_of_a_url_equal_the_file(
    nginx: Nginx, images: Images, tmp_path: Path, capfd: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    path = images.all()[kind]
    url = nginx.url(f"/files/{path.name}")
    code, local, err = cli(capfd, "checksum", "--progress", "none", str(path))
    assert code == 0, err
    code, remote, err = cli(capfd, "checksum", "--progress", "none", url)
    assert code == 0, err
    assert remote.split()[0] == local.split()[0]
    assert remote.split()[0] == digest(images.raw)
    reference = tmp_path / "qemu.raw"
    sh(str(QEMU_IMG), "convert", "-q", "-O", "raw", str(images.qcow2 if "qcow2" in kind
                                                      else images.raw), str(reference))
    out = tmp_path / "out.raw"
    code, _, err = cli(capfd, "convert", "--progress", "none", url, str(out))
    assert code == 0, err
    assert out.read_bytes() == reference.read_bytes()
    assert os.stat(out).st_blocks * 512 < 16 * MiB  # holes stayed holes


def test_inspect_names_the_chain_of_a_url(nginx: Nginx, images: Images,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capfd, "inspect", nginx.url(f"/files/{images.qcow2_xz.name}"))
    assert code == 0, err
    assert "qcow2" in out and "xz" in out


def test_qcow2_through_ranges_costs_few_requests(nginx: Nginx, images: Images,
                                                 tmp_path: Path) -> None:
    since = len(nginx.log_lines())
    image = open_image(nginx.url(f"/files/{images.qcow2.name}"))
    try:
        assert image.chain == ["qcow2"]
        assert image.size == images.raw.stat().st_size
        hasher = xxhash.xxh3_128()
        pos = 0
        for ext in image.source.extents():
            assert ext.offset == pos
            hasher.update(bytes(ext.length) if ext.data is None else ext.data)
            pos = ext.end
        assert hasher.hexdigest() == digest(images.raw)
    finally:
        image.close()
    logged = requests(nginx, since, images.qcow2.name)
    assert all(line.split()[1] == "206" for line in logged), logged
    # ~10 MiB of data clusters and the metadata: a request per MiB at most, not one per
    # 64 KiB cluster (that would be ~170)
    data_mib = images.qcow2.stat().st_size // MiB + 1
    assert len(logged) <= data_mib + 4, logged


def test_a_fragmented_qcow2_reads_through_the_block_cache(nginx: Nginx, tmp_path: Path) -> None:
    """Clusters written in random order lie scattered in the file: read in guest order
    they are ~100 small reads at jumping offsets, which the cache turns into a few
    requests of whole blocks."""
    qcow2 = nginx.www / "frag.qcow2"
    sh(str(QEMU_IMG), "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(qcow2),
       "64M")
    rng = random.Random(3)
    clusters = rng.sample(range(1024), 100)
    writes = [c for n in clusters for c in ("-c", f"write -P {n % 250 + 1} {n * 65536} 64k")]
    sh("qemu-io", "-f", "qcow2", *writes, str(qcow2), stdout=subprocess.DEVNULL)
    reference = tmp_path / "frag.raw"
    sh(str(QEMU_IMG), "convert", "-q", "-O", "raw", str(qcow2), str(reference))
    since = len(nginx.log_lines())
    image = open_image(nginx.url("/files/frag.qcow2"))
    try:
        out = bytearray()
        for ext in image.source.extents():
            out += bytes(ext.length) if ext.data is None else ext.data
    finally:
        image.close()
    assert out == reference.read_bytes()
    logged = requests(nginx, since, "frag.qcow2")
    assert len(logged) <= qcow2.stat().st_size // MiB + 4, logged


def test_small_reads_are_served_from_whole_blocks(nginx: Nginx, images: Images) -> None:
    data = images.raw.read_bytes()
    source = UrlSource(nginx.url(f"/files/{images.raw.name}"))
    try:
        since = len(nginx.log_lines())
        # 160 metadata-sized reads walking through 10 MiB, then jumps back into it
        for offset in range(0, 10 * MiB, 64 << 10):
            assert source.pread(offset + 100, 4096) == data[offset + 100 : offset + 4196]
        walked = len(requests(nginx, since, images.raw.name))
        assert walked <= 6  # read-ahead grows to 8 blocks a request
        # the last blocks walked are still cached (16 blocks, the read-ahead among them)
        for offset in random.Random(1).sample(range(4 * MiB, 9 * MiB, 4096), 50):
            assert source.pread(offset, 512) == data[offset : offset + 512]
        assert source.pread(len(data) - 10, 100) == data[-10:]  # the end, short
        logged = requests(nginx, since, images.raw.name)
        assert len(logged) <= walked + 2, logged
        assert all(line.split()[1] == "206" for line in logged)
    finally:
        source.close()


def test_ranges_read_from_several_threads_at_once(nginx: Nginx, images: Images) -> None:
    """What a chunked upload does with a random input: chunks read out of order by
    several threads, each on a connection of its own."""
    data = images.raw.read_bytes()
    source = UrlSource(nginx.url(f"/files/{images.raw.name}"))
    chunk = 3 * MiB + 4096
    got: dict[int, bytes] = {}

    def read(offset: int) -> None:
        out = bytearray()
        for ext in source.read_range(offset, chunk):
            assert ext.offset == offset + len(out)
            out += bytes(ext.length) if ext.data is None else ext.data
        got[offset] = bytes(out)

    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(read, reversed(range(0, len(data), chunk))))
    finally:
        source.close()
    assert b"".join(got[k] for k in sorted(got)) == data


def test_server_without_ranges_is_streamed(nginx: Nginx, images: Images,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    since = len(nginx.log_lines())
    for path in (images.raw, images.gz, images.qcow2):
        code, out, err = cli(capfd, "checksum", "--progress", "none",
                             nginx.url(f"/noranges/{path.name}"))
        assert code == 0, err
        assert out.split()[0] == digest(images.raw)
    logged = requests(nginx, since, "/noranges/")
    assert logged and all(line.split()[1] == "200" for line in logged)


def test_upload_of_a_url_makes_a_drive_with_its_bytes(
    nginx: Nginx, images: Images, drive_store: Any, tmp_path: Path,
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CLOUDSIGMA_CONFIG", raising=False)
    monkeypatch.setenv("CLOUDSIGMA_USERNAME", drive_store.username)
    monkeypatch.setenv("CLOUDSIGMA_PASSWORD", drive_store.password)
    size = images.raw.stat().st_size
    for path in (images.qcow2, images.gz):
        code, out, err = cli(capfd, "upload", "--endpoint", drive_store.base_url,
                             "--progress", "none", "--name", "from-url",
                             nginx.url(f"/files/{path.name}"))
        assert code == 0, err
        uuid = out.strip()
        with open(drive_store.store.raw_path(uuid), "rb") as f:
            assert f.read(size) == images.raw.read_bytes()
        assert drive_store.store.get(uuid).meta["drivepipe_xxh128"] == digest(images.raw)


# --- a misbehaving server -------------------------------------------------------------

@dataclass
class Served:
    """What the threaded server serves, and how it misbehaves."""

    files: dict[str, bytes] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    #: path -> body bytes after which the next answer is cut (once)
    cuts: dict[str, list[int]] = field(default_factory=dict)
    #: path -> (after this many requests, the new content)
    replace: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    unsized: set[str] = field(default_factory=set)
    #: path -> body bytes after which the next answer pauses for STALL seconds (once)
    stalls: dict[str, list[int]] = field(default_factory=dict)
    #: a signed link: path -> the path it redirects to, with a new token each time;
    #: a request with an older token than the newest is refused (403: expired)
    links: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    #: (path, Range, If-Range, Authorization) of every request
    log: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def etag(self, path: str) -> str:
        return f'"v{self.versions.get(path, 0)}-{len(self.files[path])}"'


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served: Served

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.served
        path, _, query = self.path.partition("?")
        with srv.lock:
            srv.log.append((path, self.headers.get("Range"), self.headers.get("If-Range"),
                            self.headers.get("Authorization")))
        if path in srv.links:
            with srv.lock:
                target = srv.links[path]
                srv.tokens[target] = srv.tokens.get(target, 0) + 1
                self.send_response(302)
                self.send_header("Location", f"{target}?t={srv.tokens[target]}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            return
        if path in srv.tokens and query != f"t={srv.tokens[path]}":
            self.send_error(403, "link expired")
            return
        with srv.lock:
            count = sum(1 for entry in srv.log if entry[0] == path)
            if path in srv.replace and count > srv.replace[path][0]:
                srv.files[path] = srv.replace.pop(path)[1]
                srv.versions[path] = srv.versions.get(path, 0) + 1
            data = srv.files.get(path)
            cut = srv.cuts[path].pop(0) if srv.cuts.get(path) else None
            stall = srv.stalls[path].pop(0) if srv.stalls.get(path) else None
        if data is None:
            self.send_error(404)
            return
        etag = srv.etag(path)
        if path in srv.unsized:
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._body(memoryview(data), None)
            return
        start, end = 0, len(data)
        ranged = self.headers.get("Range", "").startswith("bytes=")
        if_range = self.headers.get("If-Range")
        if ranged and (if_range is None or if_range == etag):
            first, _, last = self.headers["Range"][6:].partition("-")
            start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self._body(memoryview(data)[start:end], cut, stall)

    def _body(self, view: memoryview, cut: int | None, stall: int | None = None) -> None:
        limit = len(view) if cut is None else min(cut, len(view))
        try:
            for pos in range(0, limit, 256 << 10):
                if stall is not None and pos >= stall:
                    self.wfile.flush()
                    time.sleep(STALL)
                    stall = None
                self.wfile.write(view[pos : min(pos + (256 << 10), limit)])
            if cut is not None:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
        except OSError:
            self.close_connection = True


@dataclass
class Misbehaving:
    served: Served
    base: str

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


def start_server(host: str = "127.0.0.1", port: int = 0) -> tuple[Misbehaving, Any]:
    served = Served()
    handler = type("H", (Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Misbehaving(served, f"http://{host}:{server.server_address[1]}"), server


@pytest.fixture
def bad() -> Iterator[Misbehaving]:
    found, server = start_server()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()


def read_all(source: Any) -> bytes:
    out = bytearray()
    for ext in source.extents():
        assert ext.offset == len(out)
        out += bytes(ext.length) if ext.data is None else ext.data
    return bytes(out)


def test_a_connection_cut_mid_way_is_continued_byte_identical(bad: Misbehaving) -> None:
    data = random.Random(5).randbytes(9 * MiB + 77)
    bad.served.files["/d.raw"] = data
    # the probe and the head's block come whole; the stream is cut twice
    bad.served.cuts["/d.raw"] = [10**12, 10**12, 3 * MiB + 5, MiB]
    notes: list[str] = []
    source = UrlSource(bad.url("/d.raw"), retry=FAST_RETRY, notify=notes.append)
    try:
        assert source.random and source.size == len(data)
        assert source.head(16) == data[:16]
        assert read_all(source) == data
    finally:
        source.close()
    assert len(notes) == 2 and f"continuing from byte {3 * MiB + 5} in" in notes[0], notes
    streamed = [e for e in bad.served.log if e[1] and not e[1].endswith("=0-0")][1:]
    assert [r for _, r, _, _ in streamed] == [
        "bytes=0-9437260", f"bytes={3 * MiB + 5}-9437260", f"bytes={4 * MiB + 5}-9437260"]
    assert all(if_range == bad.served.etag("/d.raw") for _, _, if_range, _ in streamed)


def test_upload_survives_the_source_dropping_the_connection(
    bad: Misbehaving, drive_store: Any, tmp_path: Path,
) -> None:
    data = bytearray(random.Random(6).randbytes(6 * MiB + 1000))
    data[MiB : 3 * MiB] = bytes(2 * MiB)  # a hole inside
    bad.served.files["/up.raw"] = bytes(data)
    bad.served.cuts["/up.raw"] = [10**12, 10**12, 2 * MiB + 17]
    image = open_image(bad.url("/up.raw"), options=OpenOptions())
    result = upload(image, drive_store)
    with open(drive_store.store.raw_path(result.uuid), "rb") as f:
        assert f.read(len(data)) == data
    assert result.xxh128 == xxhash.xxh3_128(bytes(data)).hexdigest()


def test_a_stalled_answer_times_out_and_is_asked_again(bad: Misbehaving) -> None:
    """An answer that sends its headers and then nothing is cut by the stall timeout
    (libcurl's speed check looks back a few seconds, so the stall is at the body's
    start here) and asked for again, instead of hanging until the server wakes up."""
    data = random.Random(11).randbytes(4 * MiB + 9)
    bad.served.files["/s.raw"] = data
    bad.served.stalls["/s.raw"] = [10**12, 10**12, 0]
    source = UrlSource(bad.url("/s.raw"), tls=TlsOptions(stall_timeout=1), retry=FAST_RETRY)
    try:
        source.head()
        started = time.monotonic()
        assert read_all(source) == data
        assert time.monotonic() - started < STALL
    finally:
        source.close()
    asked = [r for path, r, _, _ in bad.served.log if path == "/s.raw"]
    assert asked[2:] == [f"bytes=0-{len(data) - 1}"] * 2


def test_an_expired_signed_link_is_renewed(bad: Misbehaving) -> None:
    data = random.Random(12).randbytes(3 * MiB)
    bad.served.files["/blob"] = data
    bad.served.links["/link"] = "/blob"
    source = UrlSource(bad.url("/link"), retry=FAST_RETRY)
    try:
        assert source.pread(10, 10) == data[10:20]
        bad.served.tokens["/blob"] += 1  # every link handed out so far has expired
        assert read_all(source) == data
    finally:
        source.close()
    asked = [(path, r) for path, r, _, _ in bad.served.log]
    assert asked.count(("/link", "bytes=0-0")) == 2  # the probe, then one renewal
    # the link itself is never read from: only its target
    assert all(r == "bytes=0-0" for path, r in asked if path == "/link")
    assert asked[-1] == ("/blob", "bytes=0-3145727")


def test_a_server_without_ranges_is_asked_again_and_skipped(bad: Misbehaving) -> None:
    data = random.Random(7).randbytes(3 * MiB + 1)
    bad.served.files["/n.raw"] = data
    bad.served.unsized.add("/n.raw")
    source = UrlSource(bad.url("/n.raw"), retry=FAST_RETRY)
    try:
        assert not source.random and not source.size_known
        assert read_all(source) == data
    finally:
        source.close()
    image = open_image(bad.url("/n.raw"), options=OpenOptions(size=len(data)))
    try:
        assert image.size == len(data) and read_all(image.source) == data
    finally:
        image.close()
    image = open_image(bad.url("/n.raw"), options=OpenOptions(size=len(data) + 1))
    try:
        with pytest.raises(SizeMismatch, match="ended after"):
            read_all(image.source)
    finally:
        image.close()
    # without a size: spooled, then read like a file
    image = open_image(bad.url("/n.raw"))
    try:
        assert image.size == len(data) and read_all(image.source) == data
    finally:
        image.close()


def test_a_file_replaced_mid_way_fails_in_one_line(
    bad: Misbehaving, capfd: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(8).randbytes(8 * MiB)
    bad.served.files["/c.raw"] = data
    # the probe, the head's block, the stream (cut), then a new version of the file
    bad.served.cuts["/c.raw"] = [10**12, 10**12, 3 * MiB]
    bad.served.replace["/c.raw"] = (3, random.Random(9).randbytes(8 * MiB))
    code, out, err = cli(capfd, "checksum", "--progress", "none", bad.url("/c.raw?sig=x"))
    assert code == TransferError.exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "changed on the server" in lines[0] and "sig=x" not in lines[0]
    assert out == ""


def test_a_changed_etag_in_a_ranged_answer_is_an_error(bad: Misbehaving) -> None:
    data = random.Random(10).randbytes(5 * MiB)
    bad.served.files["/e.raw"] = data
    source = UrlSource(bad.url("/e.raw"), retry=FAST_RETRY)
    try:
        bad.served.versions["/e.raw"] = 1  # same length, new ETag: If-Range gets it all
        with pytest.raises(TransferError, match="changed on the server"):
            source.pread(4 * MiB, 10)
    finally:
        source.close()


def test_gives_up_after_the_retries_in_one_line(bad: Misbehaving) -> None:
    bad.served.files["/g.raw"] = bytes(range(256)) * 8192
    bad.served.cuts["/g.raw"] = [10**12] + [0] * 20
    source = UrlSource(bad.url("/g.raw"), retry=FAST_RETRY)
    try:
        with pytest.raises(TransferError, match="gave up at byte 0 after 5 attempts"):
            read_all(source)
    finally:
        source.close()


# --- credentials ----------------------------------------------------------------------

def test_credentials_go_only_to_the_endpoints_origin(nginx: Nginx, images: Images) -> None:
    recorder, server = start_server("127.0.0.2", nginx.other_port)
    try:
        recorder.served.files["/image.raw"] = b"x" * 5000
        ep = Endpoint(nginx.url("/api/2.0/"), nginx.url("/api/2.0/"))
        creds = Credentials("someone", "pw-secret")
        # same origin: sent (nginx logs the user)
        since = len(nginx.log_lines())
        own = UrlSource(nginx.url(f"/files/{images.raw.name}"), endpoint=ep,
                        creds=creds)
        own.head()
        own.close()
        assert all("user=someone" in line
                   for line in requests(nginx, since, f"/files/{images.raw.name}"))
        # a redirect to another origin: neither the redirect nor the reads after it
        moved = UrlSource(nginx.url("/api/2.0/redir"), endpoint=ep, creds=creds)
        assert read_all(moved) == b"x" * 5000
        moved.close()
        # another origin named directly
        other = UrlSource(recorder.url("/image.raw"), endpoint=ep, creds=creds)
        other.head()
        other.close()
        assert len(recorder.served.log) >= 3
        assert all(auth is None for *_, auth in recorder.served.log)
    finally:
        server.shutdown()
        server.server_close()


def test_a_drive_url_over_tls_with_the_account_and_503s(
    tls_drive_store: Any, put_drive: Any,
) -> None:
    """A drive's own download URL on a TLS store: a private CA must be named, the
    account goes along (its origin is the endpoint's), 503 bursts are waited out."""
    srv, ca_pem = tls_drive_store.server, tls_drive_store.ca_pem
    data = bytearray(random.Random(13).randbytes(3 * MiB))
    data[MiB : 2 * MiB] = bytes(MiB)
    uuid = put_drive(srv, bytes(data))
    url = f"{srv.base_url}drives/{uuid}/download/"
    ep, creds = Endpoint(srv.base_url, srv.base_url), Credentials(srv.username, srv.password)
    with pytest.raises(TransferError, match="not trusted"):
        UrlSource(url, endpoint=ep, creds=creds, retry=FAST_RETRY)
    tls = TlsOptions(cacert=str(ca_pem))
    with pytest.raises(AuthError, match="HTTP 401"):
        UrlSource(url, tls=tls, retry=FAST_RETRY)  # no account: refused
    srv.faults.fail_next(2, match="/download/")
    source = UrlSource(url, tls=tls, endpoint=ep, creds=creds, retry=FAST_RETRY)
    try:
        assert source.random and source.size == len(data)
        srv.faults.fail_next(2, match="/download/")
        assert read_all(source) == data
    finally:
        source.close()


def test_a_url_with_a_password_is_refused_without_echoing_it(
    nginx: Nginx, capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(UsageError, match="must not contain a user or password"):
        UrlSource(nginx.url("/files/x").replace("http://", "http://me:pw-in-url@"))
    code, _, err = cli(capfd, "checksum", "--progress", "none",
                       nginx.url("/files/x").replace("http://", "http://me:pw-in-url@"))
    assert code == UsageError.exit_code
    assert "pw-in-url" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["ftp://example.com/x", "https:///x", "http//host/x"])
def test_what_is_not_an_http_url_is_refused(url: str) -> None:
    with pytest.raises(UsageError, match="not an http"):
        UrlSource(url)


def test_a_missing_file_is_one_line(nginx: Nginx, capfd: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capfd, "checksum", "--progress", "none", nginx.url("/files/nope.raw"))
    assert code == TransferError.exit_code
    assert "HTTP 404" in err and len(err.strip().splitlines()) == 1


"""``drivepipe download`` against a real nginx (Range, ETag, If-Range) on 127.0.0.1.

nginx runs from a generated config in a tmp dir and serves a tmp directory:
``/files/`` plainly, ``/slow/`` at a limited rate per connection (so a download
can be killed half-way), ``/headslow/`` with only a range from byte 0 slowed down (the
head of the in-order window), ``/noranges/`` with ranges disabled, ``/hostile*/``
with hostile ``Content-Disposition`` headers, and ``/api/2.0/redir`` redirecting
to a recording server on 127.0.0.2 (another host) to check on the wire that
credentials do not follow a cross-host redirect.  Its access log records
every request's bytes sent, so a resumed download can be shown to fetch only
what was missing.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import itertools
import json
import mmap
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import xxhash
from sparse_files import allocated, write_sparse

from drivepipe._verify import digest_file
from drivepipe.cli import main
from drivepipe.transport.curl import TlsOptions
from drivepipe_plugins.sources import file as file_source
from drivepipe_plugins.sources.download import RangeReceiver, ReceiveOptions

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="needs nginx")

MiB = 1 << 20


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port}")


NGINX_CONF = """
worker_processes 1;
user root;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    log_format bytes '$request_uri $status $body_bytes_sent $msec $request_time '
                     '"$http_range" user=$remote_user';
    access_log {prefix}/access.log bytes;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        location /files/ {{ alias {www}/; }}
        location /slow/ {{ alias {www}/; limit_rate {rate}; }}
        location /noranges/ {{ alias {www}/; max_ranges 0; }}
        location /headslow/ {{
            alias {www}/;
            if ($http_range ~ "^bytes=0-[1-9]") {{ set $limit_rate 4m; }}
        }}
        location /hostile1/ {{
            alias {www}/;
            add_header Content-Disposition 'attachment; filename="../x"';
        }}
        location /hostile2/ {{
            alias {www}/;
            add_header Content-Disposition 'attachment; filename="/etc/x"';
        }}
        location /hostile3/ {{
            alias {www}/;
            add_header Content-Disposition "attachment; filename*=UTF-8''..%2F..%2F.hidden%00y";
        }}
        location = /api/2.0/redir {{ return 302 http://127.0.0.2:{other_port}/image.raw; }}
        location = /api/2.0/same {{ return 302 /files/image.raw; }}
    }}
}}
"""


@dataclass
class Nginx:
    base: str
    www: Path
    log: Path
    other_port: int

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def bytes_sent(self, since: int = 0, path_part: str = "", started_after: float = 0.0
                   ) -> int:
        """Bytes sent for requests logged after line ``since`` that began after a time.

        A killed client's requests are logged late (when nginx notices), so a rerun's
        bytes are told apart by when each request began, not only by log position.
        """
        total = 0
        for line in self.log_lines()[since:]:
            uri, _status, sent, logged, took = line.split()[:5]
            if path_part in uri and float(logged) - float(took) >= started_after:
                total += int(sent)
        return total


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    prefix = tmp_path_factory.mktemp("nginx")
    www = prefix / "www"
    www.mkdir()
    (prefix / "tmp").mkdir()
    port, other_port = free_port(), free_port("127.0.0.2")
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, www=www, port=port, rate="4m",
                                      other_port=other_port))
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"],
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening("127.0.0.1", port, proc)
        yield Nginx(f"http://127.0.0.1:{port}", www, prefix / "access.log", other_port)
    finally:
        proc.terminate()
        proc.wait(10)


# --- running the command ---------------------------------------------------------------

def drivepipe_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
            *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLOUDSIGMA_", "DRIVEPIPE_"))}
    env["CLOUDSIGMA_CONFIG"] = "/nonexistent/drivepipe-test.conf"
    env["HOME"] = "/nonexistent"
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """``drivepipe download`` in this process (as the console script runs it), in ``cwd``.

    In-process to save an interpreter start per run; the kill tests use real processes.
    """
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env or clean_env())
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["download", "--progress", "none", *args])
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return Result(code, out.getvalue(), err.getvalue())


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ReadCounter:
    """Every read (``os.pread``/``preadv``/``read``/``readv``) of a descriptor open on one
    of ``paths``, as ``(offset, bytes)``; ``offset`` is -1 for reads at the file position.

    It sees what drivepipe's file source does (``os.pread``, and the windows it maps:
    mapping a window is how it reads a regular file); the control in
    :func:`test_a_fresh_download_reads_nothing_back` shows that it counts a pass over
    the file (what the old prefix hasher and ``--hash-after`` did).
    """

    paths: set[str]
    reads: list[tuple[int, int]] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> ReadCounter:
        for name in ("pread", "preadv", "read", "readv"):
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        real_map = file_source.map_window

        def map_window(fd: int, offset: int, length: int) -> mmap.mmap:
            if self._watched(fd):
                self.reads.append((offset, length))
            return real_map(fd, offset, length)

        monkeypatch.setattr(file_source, "map_window", map_window)
        return self

    def _watched(self, fd: int) -> bool:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
        except OSError:
            return False
        return path in self.paths

    def _wrap(self, name: str, real: Callable[..., object]) -> Callable[..., object]:
        positioned = name in ("pread", "preadv")

        def counted(fd: int, *args: object) -> object:
            result = real(fd, *args)
            if self._watched(fd):
                n = len(result) if isinstance(result, bytes) else int(result)  # type: ignore[arg-type]
                offset = args[-1] if positioned else -1
                self.reads.append((int(offset), n))  # type: ignore[call-overload]
            return result

        return counted

    @property
    def total(self) -> int:
        return sum(n for _, n in self.reads)


def counter_for(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> ReadCounter:
    found = {os.path.realpath(p) for p in paths}
    return ReadCounter(found | {f + ".part" for f in found}).install(monkeypatch)


def data_ranges(path: Path, end: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` ranges of ``path`` below ``end`` that hold data (SEEK_DATA)."""
    found = []
    with open(path, "rb") as f:
        pos = 0
        while pos < end:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            if start >= end:
                break
            stop = min(os.lseek(f.fileno(), start, os.SEEK_HOLE), end)
            found.append((start, stop))
            pos = stop
    return found


def make_image(nginx: Nginx, name: str, size: int, seed: int, pieces: int = 12) -> Path:
    rng = random.Random(seed)
    extents = [(rng.randrange(0, max(1, size - MiB)) // 4096 * 4096,
                rng.randbytes(rng.randint(1, MiB))) for _ in range(pieces)]
    return write_sparse(nginx.www / name, size, extents)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# --- tests -----------------------------------------------------------------------------

def test_round_trip_is_identical_sparse_and_verified(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "rt.raw", 48 * MiB, seed=1)
    want = digest(src)
    # --hash-after is accepted for old scripts and does nothing: bytes are hashed as they flow
    proc = run(workdir, nginx.url("/files/rt.raw"), "--expect", f"xxh128:{want}",
               "--range-size", "8M", "--block-size", "1M", "--hash-after")
    assert proc.returncode == 0, proc.stderr
    out = workdir / "rt.raw"
    assert proc.stdout.strip() == "rt.raw"
    assert out.read_bytes() == src.read_bytes()
    assert allocated(out) <= allocated(src) + MiB
    assert allocated(out) < 20 * MiB
    assert not (workdir / "rt.raw.part").exists()
    assert not (workdir / "rt.raw.part.journal").exists()


def test_a_fresh_download_reads_nothing_back(nginx: Nginx, workdir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_image(nginx, "noread.raw", 24 * MiB, seed=21, pieces=20)
    counter = counter_for(monkeypatch, workdir / "noread.raw")
    proc = run(workdir, nginx.url("/files/noread.raw"), "--expect", f"xxh128:{digest(src)}",
               "--range-size", "4M", "--block-size", "1M", "--connections", "3")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "noread.raw").read_bytes() == src.read_bytes()
    assert counter.reads == []  # verified as the bytes flowed, never read back
    # the control: a pass over the file, as the old verification did, is seen
    digest_file(str(workdir / "noread.raw"))
    assert counter.total == sum(b - a for a, b in data_ranges(workdir / "noread.raw",
                                                              24 * MiB)) > 0


def test_without_expectation_prints_the_digest(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "nodigest.raw", 3 * MiB + 123, seed=2, pieces=3)
    proc = run(workdir, nginx.url("/files/nodigest.raw"), "-o", "copy.img")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "copy.img\n"
    assert f"xxh128:{digest(src)}" in proc.stderr
    assert (workdir / "copy.img").read_bytes() == src.read_bytes()


def test_output_directory_and_url_credentials(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "todir.raw", 2 * MiB, seed=14, pieces=2)
    (workdir / "sub").mkdir()
    proc = run(workdir, nginx.url("/files/todir.raw"), "-o", "sub")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "sub/todir.raw\n"
    assert (workdir / "sub" / "todir.raw").read_bytes() == src.read_bytes()
    secret = nginx.url("/files/todir.raw").replace("http://", "http://me:pw-in-url@")
    proc = run(workdir, secret, "-o", "x.raw")
    assert proc.returncode == 2
    assert "must not contain a user or password" in proc.stderr
    assert "pw-in-url" not in proc.stderr


def test_server_ignoring_ranges_gets_one_stream(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "whole.raw", 20 * MiB, seed=3)
    mark = len(nginx.log_lines())
    proc = run(workdir, nginx.url("/noranges/whole.raw"), "--expect", f"xxh128:{digest(src)}",
               "--range-size", "4M", "--block-size", "1M")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "whole.raw").read_bytes() == src.read_bytes()
    # the probe is aborted early; then exactly one whole-file answer
    lines = [ln for ln in nginx.log_lines()[mark:] if ln.split()[1] == "200"]
    assert sum(1 for ln in lines if int(ln.split()[2]) == 20 * MiB) == 1


def test_existing_file_is_not_overwritten_without_force(nginx: Nginx, workdir: Path) -> None:
    make_image(nginx, "exists.raw", 2 * MiB, seed=4, pieces=2)
    (workdir / "exists.raw").write_bytes(b"mine")
    proc = run(workdir, nginx.url("/files/exists.raw"))
    assert proc.returncode == 5
    assert "already exists" in proc.stderr
    assert (workdir / "exists.raw").read_bytes() == b"mine"
    proc = run(workdir, nginx.url("/files/exists.raw"), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "exists.raw").read_bytes() == (nginx.www / "exists.raw").read_bytes()


@pytest.mark.parametrize(("location", "expected"), [
    ("hostile1", "x"), ("hostile2", "x"), ("hostile3", ".hiddeny"),
])
def test_hostile_content_disposition_stays_in_the_directory(
    nginx: Nginx, tmp_path: Path, location: str, expected: str
) -> None:
    make_image(nginx, "h.raw", 1 * MiB, seed=5, pieces=1)
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    proc = run(inner, nginx.url(f"/{location}/h.raw"))
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    assert "/" not in name and not name.startswith(".")
    assert name == expected.lstrip(".")
    assert sorted(p.name for p in inner.iterdir()) == [name]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert not Path("/etc/x").exists()


def test_wrong_expectation_keeps_part_and_fails(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "bad.raw", 6 * MiB, seed=6, pieces=4)
    proc = run(workdir, nginx.url("/files/bad.raw"), "--expect", "xxh128:" + "0" * 32,
               "--block-size", "1M")
    assert proc.returncode == 7, proc.stderr
    assert "does not match" in proc.stderr and "source itself differs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "bad.raw").exists()
    assert (workdir / "bad.raw.part").read_bytes() == src.read_bytes()


def test_damaged_block_on_disk_is_refetched_from_there_on_resume(nginx: Nginx, workdir: Path
                                                                  ) -> None:
    src = make_image(nginx, "damaged.raw", 8 * MiB, seed=7, pieces=16)
    bogus = run(workdir, nginx.url("/files/damaged.raw"), "--expect", "xxh128:" + "1" * 32,
                "--block-size", "1M")
    assert bogus.returncode == 7
    part = workdir / "damaged.raw.part"
    with open(part, "r+b") as f:  # flip one byte of block 5
        f.seek(5 * MiB + 77)
        old = f.read(1)
        f.seek(5 * MiB + 77)
        f.write(bytes([old[0] ^ 0xFF]))
    mark = len(nginx.log_lines())
    proc = run(workdir, nginx.url("/files/damaged.raw"), "--expect",
               f"xxh128:{digest(src)}", "--block-size", "1M")
    assert proc.returncode == 0, proc.stderr
    assert "5.0 MiB of 8.0 MiB kept; block 5 (bytes 5242880-6291455) changed" in proc.stderr
    assert (workdir / "damaged.raw").read_bytes() == src.read_bytes()
    # the probe's byte plus the damaged block and the ones after it: the stream is
    # written in order, so the kept part is the prefix before the first bad block
    assert nginx.bytes_sent(mark, "damaged.raw") == 1 + 3 * MiB


def test_resume_from_a_server_ignoring_ranges_drops_the_kept_bytes(nginx: Nginx,
                                                                   workdir: Path) -> None:
    src = make_image(nginx, "whole2.raw", 8 * MiB, seed=22, pieces=16)
    args = [nginx.url("/noranges/whole2.raw"), "--block-size", "1M"]
    assert run(workdir, *args, "--expect", "xxh128:" + "4" * 32).returncode == 7
    with open(workdir / "whole2.raw.part", "r+b") as f:  # block 5 goes bad: 0-4 are kept
        f.seek(5 * MiB + 3)
        f.write(b"\x55")
    mark = len(nginx.log_lines())
    proc = run(workdir, *args, "--expect", f"xxh128:{digest(src)}")
    assert proc.returncode == 0, proc.stderr
    assert "5.0 MiB of 8.0 MiB kept" in proc.stderr
    # one whole answer (the server knows no ranges), its first 5 MiB dropped as they came
    assert (workdir / "whole2.raw").read_bytes() == src.read_bytes()
    assert [ln.split()[1] for ln in nginx.log_lines()[mark:]].count("200") == 2  # probe too


def test_garbage_in_a_zero_block_is_overwritten_on_resume(nginx: Nginx, workdir: Path) -> None:
    size = 4 * MiB
    src = write_sparse(nginx.www / "zeros.raw", size, [(0, b"head"), (3 * MiB, b"tail")])
    bogus = run(workdir, nginx.url("/files/zeros.raw"), "--expect", "xxh128:" + "2" * 32,
                "--block-size", "1M")
    assert bogus.returncode == 7
    part = workdir / "zeros.raw.part"
    with open(part, "r+b") as f:  # data where the source has only zeros (block 1)
        f.seek(MiB + 4096)
        f.write(b"\xff" * 8192)
    proc = run(workdir, nginx.url("/files/zeros.raw"), "--expect", f"xxh128:{digest(src)}",
               "--block-size", "1M")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "zeros.raw").read_bytes() == src.read_bytes()


def wait_for_progress(journal: Path, proc: subprocess.Popen[str], blocks: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(journal.read_text())["blocks"]) >= blocks:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    # reap the child and close its pipes here, not in a later test's garbage collection
    proc.kill()
    proc.communicate()
    raise AssertionError(f"no progress in {journal} (exit {proc.poll()})")


def test_sigkill_then_rerun_fetches_only_what_was_missing(
    nginx: Nginx, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = 64 * MiB  # several waves of ranges: the kill lands mid-download on a quiet box too
    src = make_image(nginx, "killed.raw", size, seed=8, pieces=40)
    want = digest(src)
    args = [nginx.url("/slow/killed.raw"), "--expect", f"xxh128:{want}", "--range-size", "4M",
            "--block-size", "512K", "--checkpoint-interval", "0.2"]
    proc = subprocess.Popen(drivepipe_argv("download", "--progress", "none", *args),
                            cwd=workdir, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = workdir / "killed.raw.part.journal"
    wait_for_progress(journal, proc, random.Random().randint(2, 30))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    kept = json.loads(journal.read_text())["blocks"]
    assert 0 < len(kept) < size // (512 << 10)
    assert not (workdir / "killed.raw").exists()
    kept_end = len(kept) * (512 << 10)
    on_disk = data_ranges(workdir / "killed.raw.part", kept_end)
    counter = counter_for(monkeypatch, workdir / "killed.raw")
    started = time.time()
    done = run(workdir, *args)
    assert done.returncode == 0, done.stderr
    assert (workdir / "killed.raw").read_bytes() == src.read_bytes()
    missing = size - kept_end
    assert nginx.bytes_sent(0, "killed.raw", started_after=started - 0.001) == 1 + missing
    assert not journal.exists()
    # the kept prefix was read exactly once (its check and its hashing are one read),
    # its holes not at all, and nothing after it
    reads = sorted(counter.reads)
    assert all(offset >= 0 for offset, _ in reads)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(reads))
    covered = [(a, a + n) for a, n in reads]
    assert sum(b - a for a, b in covered) == sum(b - a for a, b in on_disk) > 0
    assert all(any(lo <= a and b <= hi for lo, hi in on_disk) for a, b in covered)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_keeps_the_journal_and_rerun_completes(nginx: Nginx, workdir: Path,
                                                      signum: int) -> None:
    # 4 s at the /slow/ rate: room for the signal to land mid-download on a loaded box
    # (the command asks the library for handlers: SIGTERM stops it like Ctrl-C)
    size = 64 * MiB
    src = make_image(nginx, "interrupted.raw", size, seed=13, pieces=20)
    args = [nginx.url("/slow/interrupted.raw"), "--expect", f"xxh128:{digest(src)}",
            "--range-size", "2M", "--block-size", "512K", "--checkpoint-interval", "30"]
    proc = subprocess.Popen(drivepipe_argv("download", "--progress", "none", *args),
                            cwd=workdir, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # until a whole block is on disk (blocks go to the writer only once complete): a
    # range nginx has logged as served may still sit in socket buffers on a busy box
    part = workdir / "interrupted.raw.part"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None and not (
            part.exists() and part.stat().st_blocks > 0):
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err == "drivepipe: error: interrupted\n" and out == ""
    # the journal was saved on the way out, long before its 30 s checkpoint
    kept = json.loads((workdir / "interrupted.raw.part.journal").read_text())["blocks"]
    assert kept
    started = time.time()
    done = run(workdir, *args)
    assert done.returncode == 0, done.stderr
    assert (workdir / "interrupted.raw").read_bytes() == src.read_bytes()
    assert nginx.bytes_sent(0, "interrupted.raw", started_after=started - 0.001) == \
        1 + size - len(kept) * (512 << 10)


def test_empty_file(nginx: Nginx, workdir: Path) -> None:
    (nginx.www / "empty.raw").write_bytes(b"")
    proc = run(workdir, nginx.url("/files/empty.raw"), "--expect",
               f"xxh128:{xxhash.xxh3_128_hexdigest(b'')}")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "empty.raw").read_bytes() == b""


def test_changed_source_restarts_cleanly(nginx: Nginx, workdir: Path) -> None:
    size = 24 * MiB
    src = make_image(nginx, "changing.raw", size, seed=9, pieces=30)
    args = [nginx.url("/slow/changing.raw"), "--range-size", "4M", "--block-size", "512K",
            "--checkpoint-interval", "0.2"]
    proc = subprocess.Popen(drivepipe_argv("download", "--progress", "none", *args),
                            cwd=workdir, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_progress(workdir / "changing.raw.part.journal", proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    time.sleep(1.1)  # nginx's ETag is mtime-size: make sure the mtime moves
    new = make_image(nginx, "changing.raw.new", size, seed=10, pieces=30)
    new.replace(src)
    done = run(workdir, *args[:1], "--expect", f"xxh128:{digest(src)}", *args[1:])
    assert done.returncode == 0, done.stderr
    assert "starting over" in done.stderr
    assert (workdir / "changing.raw").read_bytes() == src.read_bytes()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Serves one file whole (no Range support) and records every request's headers."""

    seen: list[dict[str, str]]
    body: bytes

    def do_GET(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def other_host(nginx: Nginx) -> Iterator[tuple[list[dict[str, str]], bytes]]:
    seen: list[dict[str, str]] = []
    body = random.Random(11).randbytes(3 * MiB) + bytes(2 * MiB)
    handler = type("Recorder", (_Recorder,), {"seen": seen, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.2", nginx.other_port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen, body
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_do_not_follow_a_cross_host_redirect(
    nginx: Nginx, workdir: Path, other_host: tuple[list[dict[str, str]], bytes]
) -> None:
    seen, body = other_host
    mark = len(nginx.log_lines())
    env = clean_env(CLOUDSIGMA_USERNAME="someone@example.com", CLOUDSIGMA_PASSWORD="s3cret-pw")
    proc = run(workdir, nginx.url("/api/2.0/redir"), "--endpoint", nginx.url("/api/2.0/"),
               "-o", "moved.raw", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "moved.raw").read_bytes() == body
    # the configured host got the credentials, the other host never did
    first = nginx.log_lines()[mark]
    assert "/api/2.0/redir" in first and "user=someone@example.com" in first
    assert seen, "the redirect target was never asked"
    assert all("authorization" not in headers for headers in seen)
    assert "s3cret-pw" not in proc.stderr + proc.stdout


def test_same_host_redirect_is_followed(nginx: Nginx, workdir: Path) -> None:
    src = make_image(nginx, "image.raw", 4 * MiB, seed=12, pieces=3)
    proc = run(workdir, nginx.url("/api/2.0/same"), "--expect", f"xxh128:{digest(src)}")
    assert proc.returncode == 0, proc.stderr
    # named like curl -O: after the URL the user gave, not the redirect target
    assert proc.stdout == "same\n"
    assert (workdir / "same").read_bytes() == src.read_bytes()


def test_http_error_is_one_line(nginx: Nginx, workdir: Path) -> None:
    proc = run(workdir, nginx.url("/files/does-not-exist.raw"))
    assert proc.returncode == 6
    assert proc.stderr.count("\n") == 1 and "HTTP 404" in proc.stderr
    assert list(workdir.iterdir()) == []


def test_no_validator_means_no_resume(
    nginx: Nginx, workdir: Path, other_host: tuple[list[dict[str, str]], bytes]
) -> None:
    seen, body = other_host
    url = f"http://127.0.0.2:{nginx.other_port}/image.raw"
    bogus = run(workdir, url, "--expect", "xxh128:" + "3" * 32, "--block-size", "1M")
    assert bogus.returncode == 7
    assert (workdir / "image.raw.part.journal").exists()
    asked = len(seen)
    proc = run(workdir, url, "--expect", f"xxh128:{xxhash.xxh3_128_hexdigest(body)}",
               "--block-size", "1M")
    assert proc.returncode == 0, proc.stderr
    assert "no ETag or Last-Modified" in proc.stderr and "starting over" in proc.stderr
    assert len(seen) - asked == 2  # the probe, then the whole file again
    assert (workdir / "image.raw").read_bytes() == body


#: peak RSS from VmHWM: ``ru_maxrss`` survives exec, so a child of a big test process
#: would report the parent's size
PEAK_RSS = (
    "import sys\n"
    "from drivepipe.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
    "print('peak-kib', hwm[0].split()[1], file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def test_the_in_order_window_keeps_memory_bounded(nginx: Nginx, workdir: Path) -> None:
    # 1 GiB, 1 MiB of data in every 4 MiB: every byte crosses the wire (zeros too), a
    # quarter of it is written.  The first range comes at 4 MiB/s (2 s) while the others
    # come as fast as they can: without a bound, the rest of the file would pile up
    # behind it in memory; with it, 8 connections of 8 MiB ranges fill the window and wait
    size = 1 << 30
    rng = random.Random(31)
    src = nginx.www / "big.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for at in range(0, size, 4 * MiB):
            f.seek(at)
            f.write(rng.randbytes(MiB))
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "download", nginx.url("/headslow/big.raw"), "-o",
         "big.raw", "--progress", "none", "--connections", "8", "--range-size", "8M",
         "--expect", digest(src)],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == 0, proc.stderr
    peak_mib = int(proc.stderr.split("peak-kib")[-1]) / 1024
    # the window is (8 + 2) x 8 MiB; the interpreter and its modules about 50 MiB
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB"
    assert digest(workdir / "big.raw") == digest(src)
    assert allocated(workdir / "big.raw") <= allocated(src) + MiB
    src.unlink()


def test_connections_are_served_while_the_writer_drains_a_backlog(nginx: Nginx) -> None:
    """The head range (bytes from 0) comes at 4 MiB/s, the others at once: when the head
    is done, five finished ranges wait behind it.  While the (slow) writer takes their
    pieces, the next ranges must already be on the wire: with the connections served
    only between whole ranges, nothing at all arrived until that backlog was gone."""
    size, step = 64 * MiB, 4 * MiB
    data = random.Random(41).randbytes(size)
    (nginx.www / "backlog.raw").write_bytes(data)
    counters: dict[str, int] = {}
    receiver = RangeReceiver(nginx.url("/headslow/backlog.raw"), tls=TlsOptions(),
                             options=ReceiveOptions(connections=4, range_size=step),
                             counters=counters)
    seen: list[tuple[int, int]] = []  # (piece offset, bytes received by then)
    got = bytearray()
    for ext in receiver.extents():
        seen.append((ext.offset, counters["received"]))
        got += bytes(ext.data or b"")
        time.sleep(0.01)  # a writer slower than the wire
    assert bytes(got) == data
    backlog = [received for offset, received in seen if step <= offset < 6 * step]
    assert len(backlog) == 20
    assert backlog[-1] > backlog[0], "no byte arrived while the backlog was written"
    assert backlog[0] < size

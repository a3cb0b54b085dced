"""`drivepipe upload --chunked` killed with SIGKILL at random points, then run again.

The real command runs in a subprocess against the local drive store (slowed down
by a per-chunk delay so that the kill lands mid-upload).  Once the journal shows
at least one confirmed chunk the process is killed; sometimes the store is
restarted too.  The same command run again must print the same drive UUID,
produce a byte-identical drive with the image's checksum in its meta, and make
the server receive only the chunks it did not have.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from drivepipe._registry import formats
from drivepipe.server import RunningServer

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 256 * KiB
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))


def make_image(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 3 * CHUNK // 2):
            f.seek(offset)
            f.write(rng.randbytes(rng.randint(1, 200 * KiB)))
    return path


def command(srv: RunningServer, image: Path, *extra: str) -> list[str]:
    return [DRIVEPIPE, "upload", "--chunked", str(image), "--endpoint", srv.base_url,
            "--chunk-size", "256K", "--connections", "2", "--progress", "none", *extra]


def environment(srv: RunningServer, cache: Path) -> dict[str, str]:
    return {**os.environ, **srv.env, "XDG_CACHE_HOME": str(cache)}


def confirmed(cache: Path) -> set[int]:
    """The chunks the journal confirms (empty while there is no journal yet)."""
    for path in cache.rglob("*.json"):
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced between listing and reading
        return {n for first, end in data["confirmed"] for n in range(first, end)}
    return set()


def kill_after(proc: subprocess.Popen[bytes], cache: Path, chunks: int) -> None:
    deadline = time.monotonic() + 60
    while len(confirmed(cache)) < chunks:
        assert proc.poll() is None, "the upload ended before the kill"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def xxh128_of(path: Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


def count_chunk_bodies(srv: RunningServer, uuid: str) -> list[tuple[int, bool]]:
    """Chunks the store receives whole from now on, each with whether it had it before.

    Counted when a chunk is complete, not when it starts: the killed process's last
    request may still be read (and then dropped) by the store after the kill.
    """
    numbers: list[tuple[int, bool]] = []
    store = srv.store
    original = store.begin_chunk

    def counting(drive: str, number: int, chunk_size: int) -> Any:
        already = number in store.get(uuid).received
        writer = original(drive, number, chunk_size)  # raises when refused (busy, 416)
        finish = writer.finish

        def finished() -> Any:
            record = finish()
            numbers.append((number, already))
            return record

        writer.finish = finished
        return writer

    # a counting wrapper around the store's real method, so the server side counts
    store.begin_chunk = counting  # type: ignore[method-assign]
    return numbers


def kill_and_resume(
    srv: RunningServer, tmp_path: Path, upload: Path, raw: Path, seed: int, restart: bool
) -> None:
    cache = tmp_path / "cache"
    env = environment(srv, cache)
    chunks = raw.stat().st_size // CHUNK
    srv.faults.delay(0.03, count=0, match="/chunk/")
    with subprocess.Popen(command(srv, upload), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as first:
        kill_after(first, cache, random.Random(seed).randint(1, chunks - 2))
    srv.faults.clear()
    (journal,) = cache.rglob("*.json")
    uuid = json.loads(journal.read_text())["uuid"]
    if restart:
        srv.restart()
    had = set(srv.store.get(uuid).received)
    assert had and len(had) < chunks, "killed mid-upload"
    received = count_chunk_bodies(srv, uuid)
    again = subprocess.run(command(srv, upload), env=env, capture_output=True,
                           timeout=120, check=False)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode() == f"{uuid}\n"
    # Only missing chunks were sent, each once.  (A chunk whose body the killed process
    # had already handed to the kernel may still land after ``had`` was read.)
    numbers = [number for number, _ in received]
    assert not any(already for _, already in received), "a chunk the store had was sent"
    assert len(numbers) == len(set(numbers))
    assert set(numbers) <= set(range(chunks)) - had and numbers
    rec = srv.store.get(uuid)
    assert rec.status == "unmounted"
    assert rec.meta["drivepipe_xxh128"] == xxh128_of(raw)
    size = raw.stat().st_size
    with open(srv.store.raw_path(uuid), "rb") as drive:
        assert drive.read(size) == raw.read_bytes()
    assert not journal.exists()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_then_rerun_resumes(
    drive_store: RunningServer, tmp_path: Path, seed: int
) -> None:
    raw = make_image(tmp_path / "disk.raw", 16 * CHUNK + 999, seed)
    kill_and_resume(drive_store, tmp_path, raw, raw, seed, restart=False)


def test_sigkill_and_store_restart_then_rerun_resumes(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    raw = make_image(tmp_path / "disk.raw", 16 * CHUNK + 5, 4)
    kill_and_resume(drive_store, tmp_path, raw, raw, 4, restart=True)


@pytest.mark.skipif("gzip" not in formats(), reason="gzip decoder not registered")
def test_sigkill_of_a_gzip_upload_fast_forwards(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    raw = make_image(tmp_path / "disk.raw", 16 * CHUNK + 321, 5)
    packed = tmp_path / "disk.raw.gz"
    with open(raw, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    kill_and_resume(drive_store, tmp_path, packed, raw, 5, restart=False)


def slowed(
    drive_store: RunningServer, tmp_path: Path, seed: int
) -> tuple[Path, Path, dict[str, str]]:
    """An image of 16 chunks, its cache and environment, and chunks slowed down so that a
    run can be stopped part-way."""
    raw = make_image(tmp_path / "disk.raw", 16 * CHUNK, seed)
    cache = tmp_path / "cache"
    drive_store.faults.delay(0.03, count=0, match="/chunk/")
    return raw, cache, environment(drive_store, cache)


def test_killed_upload_of_a_changed_image_is_refused(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    raw, cache, env = slowed(drive_store, tmp_path, 6)
    with subprocess.Popen(command(drive_store, raw), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as first:
        kill_after(first, cache, 2)
    drive_store.faults.clear()
    with open(raw, "r+b") as f:
        f.write(b"new boot sector")
    again = subprocess.run(command(drive_store, raw), env=env, capture_output=True,
                           timeout=60, check=False)
    assert again.returncode != 0 and again.stdout == b""
    lines = again.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "changed since the interrupted upload" in lines[0], lines
    assert "--resume" in lines[0] and "Traceback" not in again.stderr.decode()


def test_ctrl_c_keeps_the_journal_and_says_how_to_resume(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    raw, cache, env = slowed(drive_store, tmp_path, 7)
    with subprocess.Popen(command(drive_store, raw), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as first:
        while not confirmed(cache):
            time.sleep(0.005)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    drive_store.faults.clear()
    assert first.returncode == 130 and out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "again to resume drive" in lines[0], lines
    uuid = lines[0].rsplit(" ", 1)[-1]
    again = subprocess.run(command(drive_store, raw), env=env, capture_output=True,
                           timeout=60, check=False)
    assert again.returncode == 0 and again.stdout.decode() == f"{uuid}\n"
    with open(drive_store.store.raw_path(uuid), "rb") as drive:
        assert drive.read(raw.stat().st_size) == raw.read_bytes()

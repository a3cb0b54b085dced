"""Standard input as a real pipe with an announced size (``upload - --size N``).

The bytes come from ``cat`` through an OS pipe put on descriptor 0 while the image
is opened, then go to the real local drive store by direct upload.  Exactly N
bytes make a drive holding them; a stream that ends short or runs long raises
SizeMismatch and leaves no drive; a raw stream is never spooled, a compressed one
is (its decoder needs its size first), with the same check.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from test_download_nginx import clean_env, drivepipe_argv

from drivepipe._errors import SizeMismatch
from drivepipe._registry import open_image
from drivepipe._stage import ImageInput, OpenOptions
from drivepipe._stats import RunStats
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.transport.curl import TlsOptions

MiB = 1 << 20


@contextlib.contextmanager
def piped_stdin(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``cat path |`` on descriptor 0 for the duration (the source dups it at once)."""
    read, write = os.pipe()
    cat = subprocess.Popen(["cat", str(path)], stdout=write)
    os.close(write)
    saved = os.dup(0)
    try:
        os.dup2(read, 0)
        os.close(read)
        yield cat
    finally:
        os.dup2(saved, 0)
        os.close(saved)


_CATS: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def reap_cats() -> Iterator[None]:
    yield
    while _CATS:
        cat = _CATS.pop()
        cat.kill()  # blocked on a pipe nobody reads any more (a stream that ran long)
        cat.wait(10)


def open_piped(path: Path, size: int | None, tmp_path: Path) -> ImageInput:
    with piped_stdin(path) as cat:
        _CATS.append(cat)
        return open_image("-", options=OpenOptions(size=size, spool_dir=str(tmp_path)))


def upload(image: ImageInput, store: Any) -> Any:
    """``image`` into a new drive of ``store`` by direct upload; the result has ``uuid``
    and ``xxh128``.  Through the library upload of the jobs layer where it exists, else
    the direct upload of the drive target (the same sink, before the jobs layer)."""
    ep = Endpoint(store.base_url, store.base_url)
    creds = Credentials(store.username, store.password)
    stats = RunStats(title="upload")
    try:
        from drivepipe.jobs.upload import upload as upload_job  # noqa: PLC0415
    except ImportError:
        from drivepipe_plugins.targets.drive_upload import (  # noqa: PLC0415
            direct_upload,
        )
        return direct_upload(image, ep, creds, TlsOptions(), stats=stats)
    api = ApiClient(ep, creds)
    try:
        return upload_job(image, connection=Connection(ep, creds, TlsOptions(), api),
                          stats=stats)
    finally:
        api.close()


def disk_bytes(seed: int, size: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[MiB : 2 * MiB + 5] = bytes(MiB + 5)  # zeros inside
    return bytes(data)


def spools(tmp_path: Path) -> list[str]:
    return [p for p in os.listdir(tmp_path) if p.startswith(".drivepipe-spool")]


def test_a_pipe_of_exactly_the_size_becomes_a_drive_without_a_spool(
    drive_store: Any, tmp_path: Path,
) -> None:
    data = disk_bytes(1, 5 * MiB + 333)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    image = open_piped(src, len(data), tmp_path)
    assert image.size == len(data) and image.format == "raw"
    assert not image.source.random  # streamed as it comes: nothing spooled
    result = upload(image, drive_store)
    with open(drive_store.store.raw_path(result.uuid), "rb") as f:
        assert f.read(len(data)) == data
    assert result.xxh128 == xxhash.xxh3_128(data).hexdigest()


@pytest.mark.parametrize("delta", [-1, -(3 * MiB), +1, +(2 * MiB)])
def test_a_pipe_that_ends_short_or_runs_long_leaves_no_drive(
    drive_store: Any, tmp_path: Path, delta: int,
) -> None:
    announced = 4 * MiB + 100
    src = tmp_path / "disk.raw"
    src.write_bytes(disk_bytes(2, announced + delta))
    image = open_piped(src, announced, tmp_path)
    word = "ended after" if delta < 0 else "more than"
    with pytest.raises(SizeMismatch, match=word):
        upload(image, drive_store)
    assert drive_store.store.list() == []


def test_a_stream_shorter_than_its_head_fails_at_open(drive_store: Any, tmp_path: Path) -> None:
    src = tmp_path / "tiny.raw"
    src.write_bytes(b"abc")
    with pytest.raises(SizeMismatch, match="ended after 3 bytes, but 4096 were announced"):
        open_piped(src, 4096, tmp_path)


def test_a_compressed_pipe_with_a_size_is_spooled_and_checked(
    drive_store: Any, tmp_path: Path,
) -> None:
    data = disk_bytes(3, 3 * MiB)
    gz = tmp_path / "disk.raw.gz"
    gz.write_bytes(gzip.compress(data, compresslevel=1))
    image = open_piped(gz, gz.stat().st_size, tmp_path)
    try:
        assert image.chain == ["gzip", "raw"] and image.size == len(data)
        result = upload(image, drive_store)
    finally:
        image.close()
    with open(drive_store.store.raw_path(result.uuid), "rb") as f:
        assert f.read(len(data)) == data
    with pytest.raises(SizeMismatch, match="more than"):
        open_piped(gz, gz.stat().st_size - 10, tmp_path)
    assert spools(tmp_path) == []  # spools are unlinked at once


def test_a_regular_file_on_stdin_must_have_the_size(tmp_path: Path) -> None:
    src = tmp_path / "f.raw"
    src.write_bytes(b"x" * 8192)
    saved = os.dup(0)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.dup2(fd, 0)
        with pytest.raises(SizeMismatch, match="holds 8192 bytes, but 8000"):
            open_image("-", options=OpenOptions(size=8000))
        image = open_image("-", options=OpenOptions(size=8192))
        image.close()
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)


def _upload_has_size_option() -> bool:
    from typer.main import get_command  # noqa: PLC0415

    from drivepipe.cli import load_commands  # noqa: PLC0415

    upload_cmd = get_command(load_commands("upload")).commands["upload"]  # type: ignore[attr-defined]
    return any("--size" in p.opts for p in upload_cmd.params)


@pytest.mark.skipif(not _upload_has_size_option(), reason="upload has no --size option yet")
@pytest.mark.parametrize("delta", [0, -1000, 1000])
def test_the_cli_uploads_a_pipe_of_an_announced_size(
    drive_store: Any, tmp_path: Path, delta: int,
) -> None:
    """``cat disk.raw | drivepipe upload - --size N`` as a shell runs it."""
    announced = 3 * MiB + 17
    src = tmp_path / "disk.raw"
    data = disk_bytes(4, announced + delta)
    src.write_bytes(data)
    env = clean_env(CLOUDSIGMA_USERNAME=drive_store.username,
                    CLOUDSIGMA_PASSWORD=drive_store.password)
    with open(src, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        proc = subprocess.run(
            drivepipe_argv("upload", "-", "--size", str(announced), "--endpoint",
                           drive_store.base_url, "--progress", "none", "--no-meta"),
            stdin=cat.stdout, capture_output=True, text=True, env=env, timeout=60,
            check=False)
        assert cat.stdout is not None
        cat.stdout.close()
        cat.wait(10)
    if delta == 0:
        assert proc.returncode == 0, proc.stderr
        uuid = proc.stdout.strip()
        with open(drive_store.store.raw_path(uuid), "rb") as f:
            assert f.read(announced) == data
        return
    assert proc.returncode == SizeMismatch.exit_code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert drive_store.store.list() == []

"""``drivepipe download`` to the other targets: standard output, a block device.

Against the local drive store (real HTTP on 127.0.0.1).  The device tests use
real loop devices (``losetup`` on a sparse backing file); they are skipped
when this machine does not allow that (not root, no loop driver).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_download_store import set_meta
from tmpfs import loop_device

from drivepipe.cli import main
from drivepipe.server import RunningServer

MiB = 1 << 20


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
            *args]


def env_for(store: RunningServer, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLOUDSIGMA_", "DRIVEPIPE_"))}
    env.update(store.env, CLOUDSIGMA_CONFIG=str(tmp_path / "none.conf"), HOME=str(tmp_path))
    return env


def drive_bytes(seed: int, size: int) -> bytes:
    """Data pieces over zeros, with a long zero run (a hole on the store's side)."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(12):
        at = rng.randrange(0, size - 300_000)
        data[at : at + 200_000] = rng.randbytes(200_000)
    data[size // 2 : size // 2 + 3 * MiB] = bytes(3 * MiB)
    return bytes(data)


def test_stdout_round_trips_byte_identical_into_a_pipe(
    drive_store: RunningServer, put_drive: object, tmp_path: Path
) -> None:
    data = drive_bytes(1, 12 * MiB)
    uuid = put_drive(drive_store, data)  # type: ignore[operator]
    set_meta(drive_store, uuid, data)
    size = drive_store.store.get(uuid).size
    proc = subprocess.run(
        cli("download", uuid, "-o", "-", "--endpoint", drive_store.base_url, "--progress",
            "none", "--range-size", "1M", "--connections", "3"),
        env=env_for(drive_store, tmp_path), cwd=tmp_path, capture_output=True, timeout=60,
        check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data + bytes(size - len(data))  # every byte, holes as zeros
    assert os.listdir(tmp_path) == []  # no .part, no journal: a stream has no file


def test_stdout_closed_early_is_one_line(
    drive_store: RunningServer, put_drive: object, tmp_path: Path
) -> None:
    data = drive_bytes(2, 16 * MiB)
    uuid = put_drive(drive_store, data)  # type: ignore[operator]
    proc = subprocess.Popen(
        cli("download", uuid, "-o", "-", "--endpoint", drive_store.base_url, "--progress",
            "none"),
        env=env_for(drive_store, tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(MiB)
    proc.stdout.close()  # the reader goes away
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 5
    assert err == "drivepipe: error: standard output: the reading end of the pipe was closed\n"


@contextlib.contextmanager
def used_loop_device(size: int, fill: int) -> Iterator[str]:
    """A loop device of ``size`` bytes that held other data: every byte ``fill``."""
    with tempfile.TemporaryDirectory() as tmp:
        backing = Path(tmp) / "backing.img"
        with open(backing, "wb") as f:
            chunk = bytes([fill]) * MiB
            for _ in range(size // MiB):
                f.write(chunk)
        with loop_device(backing) as device:
            yield device


def test_download_to_a_used_loop_device_leaves_exactly_the_drive(
    drive_store: RunningServer, put_drive: object, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    data = drive_bytes(3, 10 * MiB)
    uuid = put_drive(drive_store, data)  # type: ignore[operator]
    set_meta(drive_store, uuid, data)
    size = drive_store.store.get(uuid).size
    for key, value in env_for(drive_store, tmp_path).items():
        monkeypatch.setenv(key, value)
    with used_loop_device(size + 2 * MiB, 0xAA) as device:
        assert main(["download", uuid, "-o", device, "--endpoint", drive_store.base_url,
                     "--progress", "none", "--range-size", "2M"]) == 0
        assert capsys.readouterr().out == f"{device}\n"
        with open(device, "rb") as f:
            on_device = f.read()
    # the drive's bytes, its zeros (a hole in the store) included, then the old bytes
    assert on_device[:size] == data + bytes(size - len(data))
    assert on_device[size:] == b"\xaa" * (2 * MiB)


def test_a_mounted_device_is_refused(
    drive_store: RunningServer, put_drive: object, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    mkfs, mount, umount = (shutil.which(n) for n in ("mkfs.ext4", "mount", "umount"))
    if not (mkfs and mount and umount):
        pytest.skip("needs mkfs.ext4, mount and umount")
    uuid = put_drive(drive_store, drive_bytes(4, 4 * MiB))  # type: ignore[operator]
    for key, value in env_for(drive_store, tmp_path).items():
        monkeypatch.setenv(key, value)
    point = tmp_path / "mnt"
    point.mkdir()
    with used_loop_device(16 * MiB, 0) as device:
        subprocess.run([mkfs, "-q", "-F", device], check=True, capture_output=True)
        if subprocess.run([mount, device, str(point)], capture_output=True,
                          check=False).returncode:
            pytest.skip("mount is not permitted here")
        try:
            before = (point / "lost+found").exists()
            code = main(["download", uuid, "-o", device, "--endpoint", drive_store.base_url,
                         "--progress", "none"])
            err = capsys.readouterr().err
            assert code == 5
            assert err.count("\n") == 1 and "is mounted on" in err and "unmount it" in err
            assert before and (point / "lost+found").exists()
        finally:
            subprocess.run([umount, str(point)], check=False)


def test_convert_to_a_used_loop_device_zeroes_the_holes(tmp_path: Path) -> None:
    """The device target as an output of convert: a sparse image's holes come as holes
    (not as zero bytes, as a download's do), so they are zeroed explicitly."""
    size = 12 * MiB
    src = tmp_path / "sparse.raw"
    data = drive_bytes(5, size)
    with open(src, "wb") as f:
        f.truncate(size)
        for at in range(0, size, MiB):
            if any(data[at : at + MiB]):
                f.seek(at)
                f.write(data[at : at + MiB])
    with used_loop_device(size + MiB, 0xAA) as device:
        assert main(["convert", str(src), device, "--progress", "none"]) == 0
        with open(device, "rb") as f:
            on_device = f.read()
    assert on_device[:size] == data
    assert on_device[size:] == b"\xaa" * MiB

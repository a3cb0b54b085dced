"""Root-only set-ups for a test: a small tmpfs (to fill a disk on purpose), a loop device.

``with small_tmpfs(tmp_path / "small", "2m") as path:`` mounts, yields the
directory, unmounts; skips the test when not root or when mounting fails.
``with loop_device(path) as device:`` attaches a loop block device over the file
``path``, yields its name (``/dev/loopN``), detaches it; skips likewise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             check=False, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        yield path
    finally:
        # lazily: a server thread may still hold a file open in it
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def loop_device(path: Path) -> Iterator[str]:
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None:
        pytest.skip("needs root and losetup")
    proc = subprocess.run([losetup, "-f", "--show", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup failed: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

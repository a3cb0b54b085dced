"""The examples of ``docs/api.md`` run, as written, against a real local store.

Every ```python block of the page, in order, is one script run by a fresh
interpreter in a directory holding ``disk.raw`` (8 MiB, data and holes) and
``disk.qcow2`` (the same disk, made by qemu-img), with the store's endpoint and
account in the environment exactly as the page says to set them.  The
examples assert what they claim, so a wrong answer fails here.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from drivepipe.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
MiB = 1 << 20


def examples() -> str:
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 5, "docs/api.md lost its examples"
    return "\n\n".join(blocks)


def make_disk(where: Path) -> bytes:
    rng = random.Random(13)
    data = bytearray(8 * MiB)
    for offset in (0, 2 * MiB + 4096, 6 * MiB):
        data[offset : offset + 700_000] = rng.randbytes(700_000)
    (where / "disk.raw").write_bytes(bytes(data))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(where / "disk.raw"),
                    str(where / "disk.qcow2")], check=True)
    return bytes(data)


def test_every_example_of_the_api_page_runs(drive_store: RunningServer, tmp_path: Path) -> None:
    make_disk(tmp_path)
    script = tmp_path / "examples.py"
    script.write_text(examples())
    env = {
        **os.environ,
        "DRIVEPIPE_ENDPOINT": drive_store.base_url,
        "CLOUDSIGMA_USERNAME": drive_store.username,
        "CLOUDSIGMA_PASSWORD": drive_store.password,
        "CLOUDSIGMA_CONFIG": str(tmp_path / "no-such.conf"),
        "HOME": str(tmp_path),
    }
    done = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    # the library never prints: whatever the examples show, they print themselves
    assert "drivepipe:" not in done.stderr
    assert drive_store.store.list(), "the examples made no drive"


def test_the_examples_would_catch_a_wrong_answer(tmp_path: Path) -> None:
    # the page's checks are real assertions: the same script on a changed disk fails
    make_disk(tmp_path)
    text = examples()
    assert "assert " in text
    first = BLOCK.findall(PAGE.read_text())[0]
    (tmp_path / "disk.raw").write_bytes(b"\x01" + (tmp_path / "disk.raw").read_bytes()[1:])
    script = tmp_path / "first.py"
    script.write_text(first)
    done = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path,
                          capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "HOME": str(tmp_path)})
    if "disk.raw" not in first:
        pytest.skip("the first example does not read disk.raw")
    assert done.returncode != 0

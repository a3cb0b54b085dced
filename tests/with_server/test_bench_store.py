"""``drivepipe bench`` against real drive stores: the issue's two done-when cases.

- a qcow2 whose clusters are all compressed (made by the real ``qemu-img
  convert -c``) names the decoder;
- a sparse raw image names the network: reading skips the holes, the upload
  must carry every zero.

Both run bench the way a user does, which starts its own local store in a
child process.  The qcow2 uses 512-byte clusters so decoding is far slower than
loopback even on a loaded machine (per-cluster work dominates); nothing is
timed here, only the stage bench names.  A third test sends to a store given
with ``--endpoint`` and checks that the test drives are deleted afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from drivepipe._registry import formats
from drivepipe.cli import main
from drivepipe.server import RunningServer

MiB = 1 << 20
QEMU_IMG = shutil.which("qemu-img")


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return code, out.getvalue(), err.getvalue()


def compressible(size: int, seed: int = 7) -> bytes:
    """Text-like bytes (base64 of random): deflate shrinks them by a quarter."""
    raw = random.Random(seed).randbytes(size * 3 // 4 + 3)
    return base64.b64encode(raw)[:size]


@pytest.mark.needs_qemu
@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")
def test_bench_names_the_decoder_on_a_compressed_qcow2(tmp_path: Path) -> None:
    if "qcow2" not in formats():
        pytest.skip("the qcow2 format is not registered")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(compressible(4 * MiB))
    image = tmp_path / "disk.qcow2"
    subprocess.run([str(QEMU_IMG), "convert", "-c", "-o", "cluster_size=512", "-O", "qcow2",
                    str(raw), str(image)], check=True)
    assert image.stat().st_size < raw.stat().st_size  # the clusters really are compressed
    code, out, err = cli("bench", str(image), "--seconds", "0.5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "qcow2"
    assert report["bottleneck"] == "decode", out
    send = next(s for s in report["stages"] if s["role"] == "send")
    assert "local store" in send["label"]


def test_bench_names_the_network_on_a_sparse_raw_image(tmp_path: Path) -> None:
    image = tmp_path / "sparse.raw"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
        for offset in (0, 50 * MiB, 100 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))
    code, out, err = cli("bench", str(image), "--seconds", "0.5", "--limit", "64M", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["bottleneck"] == "send", out
    assert any("zeros the upload must carry" in a["text"] for a in report["advice"])


def test_bench_to_an_endpoint_deletes_its_test_drives(
    tmp_path: Path, drive_store: RunningServer
) -> None:
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(2 * MiB))
    env = {"CLOUDSIGMA_USERNAME": drive_store.username,
           "CLOUDSIGMA_PASSWORD": drive_store.password}
    code, out, err = cli("bench", str(image), "--endpoint", drive_store.base_url,
                         "--seconds", "1", env=env)
    assert code == 0, err
    assert "send (network: " in out
    assert drive_store.password not in out + err
    assert list(drive_store.store.list()) == []

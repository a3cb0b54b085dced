"""VHDX uploads to the real local store: the drive holds the virtual disk.

Direct and chunked (chunks read out of order through the VHDX's random access),
each compared with ``qemu-img convert -O raw``; a differencing VHDX, or one whose
header is rewritten while it is sent, creates no drive.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import xxhash
from fixtures.vhdx_writer import Vhdx, header
from sparse_files import write_sparse
from store_servers import cli_upload as upload
from store_servers import when_upload_arrives

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img not installed")


def make_vhdx(tmp_path: Path, opts: str) -> tuple[Path, bytes]:
    rng = random.Random(21)
    size = 6 * MiB + 1536
    pieces = [(rng.randrange(0, size - 70000), rng.randbytes(rng.randint(1, 70000)))
              for _ in range(5)] + [(size - 512, rng.randbytes(512))]
    raw = write_sparse(tmp_path / "disk.raw", size, pieces)
    vhdx = tmp_path / "disk.vhdx"
    ref = tmp_path / "ref.raw"
    for args in (["-O", "vhdx", "-o", opts, str(raw), str(vhdx)],
                 ["-O", "raw", str(vhdx), str(ref)]):
        subprocess.run(["qemu-img", "convert", *args], check=True, capture_output=True)
    return vhdx, ref.read_bytes()


@needs_qemu
@pytest.mark.parametrize("mode", ["direct", "chunked"])
@pytest.mark.parametrize("opts", ["subformat=dynamic,block_size=1M",
                                  "subformat=fixed,block_size=2M,block_state_zero=off"])
def test_upload_round_trips(drive_store: Any, capfd: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str,
                            opts: str) -> None:
    vhdx, disk = make_vhdx(tmp_path, opts)
    extra = ["--chunked", "--chunk-size", "1M", "--connections", "2",
             "--journal", str(tmp_path / "j.json")] if mode == "chunked" else []
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, *extra, str(vhdx))
    assert code == 0, err
    uuid = out.strip()
    rec = drive_store.store.get(uuid)
    assert rec.size == len(disk)
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        assert f.read() == disk
    assert rec.meta["drivepipe_xxh128"] == xxhash.xxh3_128_hexdigest(disk)


def test_differencing_vhdx_creates_no_drive(drive_store: Any, capfd: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    path = Vhdx(size=8 * MiB, file_flags=2, parent_locator=True).write(tmp_path / "d.vhdx")
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, str(path))
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "differencing" in err
    assert drive_store.store.list() == []


def test_vhdx_rewritten_while_uploaded_creates_no_drive(
        drive_store: Any, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    rng = random.Random(22)
    blocks: dict[int, bytes | int] = {i: rng.randbytes(MiB) for i in range(24)}
    path = Vhdx(size=24 * MiB, blocks=blocks).write(tmp_path / "live.vhdx")
    def rewrite() -> None:
        # what a hypervisor does first: a new header with a new file write GUID
        with open(path, "r+b") as f:
            f.seek(64 << 10)
            f.write(header(12, file_write=uuid.UUID(int=7)))

    rewritten = when_upload_arrives(drive_store, rewrite)
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, "--read-size", "1M",
                            "--queue-depth", "1", str(path))
    assert rewritten.join(), "the image was rewritten mid-upload"
    assert code == 3 and out == "", err
    assert err.count("\n") == 1 and "changed while it was read" in err
    assert drive_store.store.list() == []

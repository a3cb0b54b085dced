"""One-step uploads of nested images (``disk.qcow2.xz``) to the real local store.

The drive must hold the *disk* (qemu-img convert -O raw's bytes) with the disk's
size, never the qcow2 container's bytes; a broken inner image creates no drive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nested_images import Nested, build, compress, needs_tools, run, write_disk
from store_servers import cli_upload as upload

pytestmark = needs_tools


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Nested]:
    return build(tmp_path_factory.mktemp("nested-up"))


def assert_drive_is(drive_store: Any, uuid: str, image: Nested) -> None:
    rec = drive_store.store.get(uuid)
    disk = image.raw.read_bytes()
    assert rec.size == len(disk)  # the disk's size, not the container's
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        assert f.read() == disk
    assert rec.meta["drivepipe_xxh128"] == image.digest


@pytest.mark.parametrize("name", [
    "plain.qcow2.xz1", "plain.qcow2.xzN", "zlib.qcow2.gz", "zlib.qcow2.gzN",
    "zstd.qcow2.zst", "zstd.qcow2.zstN", "v2.qcow2.bz2", "disk.raw.xz1", "disk.raw.xz.gz",
])
def test_direct_upload_round_trips(images: dict[str, Nested], name: str, drive_store: Any,
                                   capfd: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path,
                            "--spool-dir", str(tmp_path), str(images[name].path))
    assert code == 0, err
    assert_drive_is(drive_store, out.strip(), images[name])


@pytest.mark.parametrize("name", ["zlib.qcow2.xzN", "plain.qcow2.gz"])
def test_chunked_upload_round_trips(images: dict[str, Nested], name: str, drive_store: Any,
                                    capfd: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, "--chunked",
                            "--chunk-size", "1M", "--connections", "2",
                            "--journal", str(tmp_path / "j.json"), str(images[name].path))
    assert code == 0, err
    assert_drive_is(drive_store, out.strip(), images[name])


@pytest.mark.parametrize("kind", ["xz1", "zstN"])
def test_truncated_inner_image_creates_no_drive(images: dict[str, Nested], kind: str,
                                                drive_store: Any,
                                                capfd: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    qcow = images["plain.qcow2.gz"].inner
    cut = tmp_path / "cut.qcow2"
    data = qcow.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    packed = compress(cut, kind, tmp_path / f"cut.qcow2.{kind}")
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, str(packed))
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert drive_store.store.list() == []


def test_fixed_vhd_inside_gzip_creates_no_drive(drive_store: Any,
                                                capfd: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    raw = write_disk(tmp_path / "d.raw")
    vhd = tmp_path / "f.vhd"
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on",
        str(raw), str(vhd))
    packed = compress(vhd, "gz", tmp_path / "f.vhd.gz")
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, str(packed))
    assert code == 3 and out == "" and "ends in a vhd footer" in err
    assert drive_store.store.list() == []
    code, out, err = upload(drive_store, capfd, monkeypatch, tmp_path, "-f", "gzip,vhd",
                            "--spool-dir", str(tmp_path), str(packed))
    assert code == 0, err
    rec = drive_store.store.get(out.strip())
    assert rec.size == raw.stat().st_size
    with open(drive_store.store.raw_path(out.strip()), "rb") as f:
        assert f.read() == raw.read_bytes()

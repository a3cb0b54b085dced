"""The demo's own sample images: a sparse raw disk and the qcow2 writer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from drivepipe import formats, open_image
from drivepipe._sample import make_sample_raw, write_qcow2


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_sample_raw_is_sparse_with_the_asked_data(tmp_path: Path) -> None:
    raw = tmp_path / "s.raw"
    data = make_sample_raw(str(raw), 64 << 20, data_fraction=0.1)
    assert raw.stat().st_size == 64 << 20
    assert data >= (64 << 20) // 10
    assert allocated(raw) < 32 << 20


@pytest.mark.parametrize("compress", [False, True])
def test_qcow2_writer_round_trips_through_our_decoder(tmp_path: Path, compress: bool) -> None:
    if "qcow2" not in formats():
        pytest.skip("qcow2 decoder not installed")
    raw, qcow = tmp_path / "s.raw", tmp_path / "s.qcow2"
    make_sample_raw(str(raw), 32 << 20, seed=7)
    write_qcow2(str(raw), str(qcow), compress=compress)
    image = open_image(str(qcow))
    try:
        assert image.format == "qcow2" and image.size == 32 << 20
        out = bytearray(image.size)
        stream = image.source.extents()
        for stage in image.stages:
            stream = stage.process(stream)
        for ext in stream:
            if ext.data is not None:
                out[ext.offset : ext.end] = ext.data
    finally:
        image.close()
    assert bytes(out) == raw.read_bytes()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
@pytest.mark.parametrize("compress", [False, True])
def test_qcow2_writer_output_passes_qemu_img_check(tmp_path: Path, compress: bool) -> None:
    raw, qcow = tmp_path / "s.raw", tmp_path / "s.qcow2"
    make_sample_raw(str(raw), 48 << 20, seed=3)
    write_qcow2(str(raw), str(qcow), compress=compress)
    subprocess.run(["qemu-img", "check", str(qcow)], check=True, capture_output=True)
    cmp = subprocess.run(
        ["qemu-img", "compare", str(raw), str(qcow)], check=False, capture_output=True
    )
    assert cmp.returncode == 0, cmp.stdout

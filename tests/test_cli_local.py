"""convert / checksum / inspect through the real CLI entry and the installed script.

``checksum`` is compared with the real ``xxh128sum`` on the same files, line
for line; ``convert`` output is compared byte for byte with its input.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sparse_files import MakeImage, allocated, random_layout, write_sparse
from tmpfs import loop_device as attach_loop

from drivepipe.cli import main

MiB = 1 << 20

XXH128SUM = shutil.which("xxh128sum") or "/usr/bin/xxh128sum"
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
LINE = re.compile(r"^[0-9a-f]{32}  (.+)$")

needs_xxh128sum = pytest.mark.skipif(
    not Path(XXH128SUM).exists(), reason="xxh128sum (package xxhash) not installed"
)


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``drivepipe args`` in-process; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def xxh128sum(*paths: Path) -> str:
    return subprocess.run(
        [XXH128SUM, *map(str, paths)], capture_output=True, text=True, check=True
    ).stdout


def assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("drivepipe: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@needs_xxh128sum
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 3 * MiB),
    pieces=st.integers(0, 5),
    zero_pieces=st.integers(0, 3),
)
def test_checksum_equals_xxh128sum_on_random_sparse_layouts(
    tmp_path_factory: pytest.TempPathFactory, seed: int, size: int, pieces: int, zero_pieces: int
) -> None:
    rng = random.Random(seed)
    layout = random_layout(rng, size, pieces, max(1, min(size, 400 << 10)), zero_pieces)
    path = write_sparse(tmp_path_factory.mktemp("c") / "img.raw", size, layout if size else [])
    code, out, err = cli("checksum", "--progress", "none", str(path))
    assert (code, err) == (0, "")
    assert out == xxh128sum(path)
    match = LINE.match(out.rstrip("\n"))
    assert match is not None and match.group(1) == str(path)


@needs_xxh128sum
def test_checksum_of_special_sizes_and_many_files_matches_xxh128sum_line_for_line(
    tmp_path: Path,
) -> None:
    rng = random.Random(5)
    files = {
        "empty.raw": b"",
        "one-byte.raw": b"\x07",
        "odd-size.raw": rng.randbytes(4096 * 3 + 1),
        "dense.raw": rng.randbytes(5 * MiB + 17),
        "written-zeros.raw": rng.randbytes(1000) + bytes(3 * MiB) + rng.randbytes(5),
        "all-zeros.raw": bytes(MiB + 3),
        "name with spaces.raw": b"spaces",
        "back\\slash.raw": b"backslash",
    }
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    hole_only = tmp_path / "hole-only.raw"
    write_sparse(hole_only, 9 * MiB + 1, [])
    paths.append(hole_only)
    code, out, err = cli("checksum", "--progress", "plain", *map(str, paths))
    assert code == 0 and "Traceback" not in err
    assert out == xxh128sum(*paths)
    assert len(out.splitlines()) == len(paths)
    assert all(LINE.match(line) for line in out.splitlines())


@needs_xxh128sum
def test_checksum_with_small_reads_and_shallow_queue(make_sparse: MakeImage) -> None:
    path = make_sparse(6 * MiB + 99, pieces=9, max_piece=700 << 10, zero_pieces=2, seed=12)
    code, out, _ = cli("checksum", "--progress", "none", "--read-size", "4K",
                       "--queue-depth", "1", str(path))
    assert code == 0 and out == xxh128sum(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_convert_is_byte_identical_and_sparse(
    make_sparse: MakeImage, tmp_path: Path, seed: int
) -> None:
    src = make_sparse(8 * MiB + 511, seed=seed, pieces=6, max_piece=MiB, zero_pieces=3)
    dst = tmp_path / "out.raw"
    code, out, err = cli("convert", "--progress", "none", str(src), str(dst))
    assert (code, out, err) == (0, "", "")
    data = src.read_bytes()
    assert dst.read_bytes() == data
    view = memoryview(data)
    must = sum(4096 for p in range(0, len(data), 4096) if any(view[p : p + 4096]))
    assert allocated(dst) <= must + (64 << 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])


def test_convert_refuses_an_existing_target(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(MiB)
    dst = tmp_path / "exists.raw"
    dst.write_bytes(b"keep me")
    code, out, err = cli("convert", "--progress", "none", str(src), str(dst))
    assert code == 5 and out == ""
    assert_one_error_line(err, str(dst), "already exists", "--force")
    assert dst.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])


def test_convert_force_replaces(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(2 * MiB, seed=4)
    dst = tmp_path / "exists.raw"
    dst.write_bytes(b"old")
    code, _, err = cli("convert", "--progress", "none", "--force", str(src), str(dst))
    assert (code, err) == (0, "")
    assert dst.read_bytes() == src.read_bytes()


def test_missing_input_is_one_line_exit_3(tmp_path: Path) -> None:
    code, out, err = cli("convert", "--progress", "none", str(tmp_path / "nope"),
                         str(tmp_path / "o"))
    assert code == 3 and out == ""
    assert_one_error_line(err, "no such file")
    assert not (tmp_path / "o").exists()
    code, _, err = cli("checksum", "--progress", "none", str(tmp_path))
    assert code == 3
    assert_one_error_line(err, "is a directory")


def test_bad_read_size_is_a_usage_error(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(MiB)
    code, _, err = cli("checksum", "--progress", "none", "--read-size", "lots", str(src))
    assert code == 2
    assert_one_error_line(err, "not a size")


FOREIGN = {
    "qed": (0, b"QED\x00", "QED"),
}


@needs_xxh128sum
@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_foreign_formats_are_refused_unless_format_raw(tmp_path: Path, kind: str) -> None:
    offset, magic, label = FOREIGN[kind]
    data = bytearray(random.Random(6).randbytes(64 << 10))
    data[offset : offset + len(magic)] = magic
    path = tmp_path / "image.img"
    path.write_bytes(bytes(data))
    for command in (["checksum"], ["convert"], ["inspect"]):
        args = [*command, str(path)] + ([str(tmp_path / "o.raw")] if command == ["convert"]
                                         else [])
        code, out, err = cli(*args)
        assert code == 3 and out == ""
        assert_one_error_line(err, label, "--format raw")
    assert not (tmp_path / "o.raw").exists()
    code, out, _ = cli("checksum", "--progress", "none", "--format", "raw", str(path))
    assert code == 0 and out == xxh128sum(path)


def test_vhd_footer_at_the_end_is_refused(tmp_path: Path) -> None:
    data = bytearray(random.Random(7).randbytes(1 << 20))
    data[-512 : -512 + 8] = b"conectix"
    path = tmp_path / "fixed.vhd"
    path.write_bytes(bytes(data))
    code, _, err = cli("inspect", str(path))
    assert code == 3
    assert_one_error_line(err, "VHD footer checksum")


def test_inspect_json_fields(make_sparse: MakeImage) -> None:
    path = make_sparse(7 * MiB + 3, pieces=4, max_piece=300 << 10, seed=10)
    code, out, err = cli("inspect", "--json", str(path))
    assert (code, err) == (0, "")
    assert out.count("\n") == 1
    info = json.loads(out)
    assert info["path"] == str(path)
    assert info["format"] == "raw"
    assert info["size"] == info["file_size"] == 7 * MiB + 3
    assert 0 < info["data_bytes"] <= allocated(path)
    assert info["data_bytes"] + info["hole_bytes"] == info["size"]
    assert info["block_device"] is False and info["holes_known"] is True


def test_inspect_text_names_every_field(make_sparse: MakeImage) -> None:
    path = make_sparse(MiB, seed=1)
    code, out, _ = cli("inspect", str(path))
    assert code == 0
    keys = {line.split(":", 1)[0] for line in out.splitlines()}
    assert {"path", "format", "size", "data_bytes", "hole_bytes"} <= keys
    assert re.search(r"^format:\s+raw$", out, re.MULTILINE)


# --- the installed console script, as a user runs it ---------------------------------


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DRIVEPIPE, *args], capture_output=True, text=True, check=False, timeout=60
    )


@needs_xxh128sum
def test_script_checksum_matches_xxh128sum(make_sparse: MakeImage) -> None:
    a = make_sparse(3 * MiB, seed=20, zero_pieces=2)
    b = make_sparse(5 * MiB + 1, seed=21)
    proc = script("checksum", str(a), str(b))
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == xxh128sum(a, b)


def test_script_convert_then_refuse(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(4 * MiB, seed=22, zero_pieces=2)
    dst = tmp_path / "copy.raw"
    proc = script("convert", str(src), str(dst))
    assert proc.returncode == 0, proc.stderr
    assert dst.read_bytes() == src.read_bytes()
    proc = script("convert", str(src), str(dst))
    assert proc.returncode == 5 and proc.stdout == ""
    assert_one_error_line(proc.stderr, "already exists")


def test_script_inspect_json(make_sparse: MakeImage) -> None:
    path = make_sparse(2 * MiB, seed=23)
    proc = script("inspect", "--json", str(path))
    assert proc.returncode == 0
    info = json.loads(proc.stdout)
    assert info["format"] == "raw" and info["size"] == 2 * MiB


# --- block devices ---------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loop block device over a sparse file with written zeros (root + losetup, else skip)."""
    rng = random.Random(40)
    path = write_sparse(tmp_path / "backing.raw", 3 * MiB,
                        random_layout(rng, 3 * MiB, 4, 200 << 10, zero_pieces=2))
    with attach_loop(path) as device:
        yield device, path


@needs_xxh128sum
def test_block_device_checksum_convert_and_inspect(
    loop_device: tuple[str, Path], tmp_path: Path
) -> None:
    device, backing = loop_device
    code, out, _ = cli("checksum", "--progress", "none", device)
    assert code == 0 and out == xxh128sum(Path(device))
    dst = tmp_path / "from-device.raw"
    code, _, err = cli("convert", "--progress", "none", device, str(dst))
    assert (code, err) == (0, "")
    data = backing.read_bytes()
    assert dst.read_bytes() == data
    view = memoryview(data)
    must = sum(4096 for p in range(0, len(data), 4096) if any(view[p : p + 4096]))
    assert allocated(dst) <= must + (64 << 10)
    code, out, _ = cli("inspect", "--json", device)
    info = json.loads(out)
    assert code == 0 and info["block_device"] is True and info["size"] == len(data)
    assert info["data_bytes"] is None  # unknown without a scan
    code, out, _ = cli("inspect", "--json", "--scan", device)
    info = json.loads(out)
    assert info["data_bytes"] == must and info["hole_bytes"] == len(data) - must

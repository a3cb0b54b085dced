"""The sparse writer: exact bytes, sparse output, all-or-nothing under the target name."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tmpfs import small_tmpfs as mount_tmpfs

from drivepipe._errors import Cancelled, OutputError
from drivepipe._extent import ZERO_BLOCK, Extent, is_zero
from drivepipe._files import SparseOutput
from drivepipe._runner import run_pipeline
from drivepipe._stage import Source, Stage
from drivepipe.cli import main
from drivepipe_plugins.sources.file import SparseFileReader
from drivepipe_plugins.targets.sparse_file import SparseFileWriter

MiB = 1 << 20

# Helpers are defined here, not imported: ``conftest`` is not importable by
# name once another test directory has its own conftest.py.
#: the ``make_sparse`` fixture of tests/conftest.py
MakeImage = Callable[..., Path]


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for ``path``."""
    return path.stat().st_blocks * 512


def nonzero_blocks(data: bytes) -> int:
    """Bytes in 4 KiB blocks of ``data`` holding anything but zeros: what must be stored."""
    view = memoryview(data)
    return sum(
        min(ZERO_BLOCK, len(data) - pos)
        for pos in range(0, len(data), ZERO_BLOCK)
        if not is_zero(view[pos : pos + ZERO_BLOCK])
    )


#: slack for filesystem metadata (extent tree blocks) counted in st_blocks
META_SLACK = 64 << 10


def convert(src: Path, dst: Path, *, force: bool = False, overlap: bool = True) -> str:
    reader = SparseFileReader(str(src), read_size=1 * MiB)
    return run_pipeline(
        reader, [], SparseFileWriter(str(dst), force=force), size=reader.size, overlap=overlap
    )


def leftovers(directory: Path, *keep: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p not in keep)


@pytest.mark.parametrize("seed", range(4))
def test_output_is_identical_and_as_sparse_as_the_data(
    make_sparse: MakeImage, tmp_path: Path, seed: int
) -> None:
    src = make_sparse(9 * MiB + 123, seed=seed, pieces=6, max_piece=512 << 10, zero_pieces=4)
    dst = tmp_path / "out.raw"
    assert convert(src, dst, overlap=seed % 2 == 0) == str(dst)
    data = src.read_bytes()
    assert dst.read_bytes() == data
    must = nonzero_blocks(data)
    assert must <= allocated(dst) <= must + META_SLACK
    assert leftovers(tmp_path, src, dst) == []


def test_written_zeros_in_a_dense_input_become_holes(tmp_path: Path) -> None:
    rng = random.Random(1)
    # Fully allocated input: data, 3 MiB of written zeros, data.
    content = rng.randbytes(MiB) + bytes(3 * MiB) + rng.randbytes(MiB)
    src = tmp_path / "dense.raw"
    src.write_bytes(content)
    assert allocated(src) >= len(content)
    dst = tmp_path / "out.raw"
    convert(src, dst)
    assert dst.read_bytes() == content
    assert 2 * MiB <= allocated(dst) <= 2 * MiB + META_SLACK


def test_refuses_an_existing_target_before_writing(tmp_path: Path) -> None:
    dst = tmp_path / "taken.raw"
    dst.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        SparseFileWriter(str(dst))
    assert dst.read_bytes() == b"precious"


def test_force_replaces_the_target(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(2 * MiB, seed=3)
    dst = tmp_path / "taken.raw"
    dst.write_bytes(b"old" * 100_000)
    convert(src, dst, force=True)
    assert dst.read_bytes() == src.read_bytes()
    assert leftovers(tmp_path, src, dst) == []


def test_refuses_a_directory_as_target(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a directory"):
        SparseFileWriter(str(tmp_path), force=True)


class FailingSource(Source):
    """A real file's extents, then ``error`` after ``after`` of them."""

    name = "failing"

    def __init__(self, path: Path, after: int, error: BaseException) -> None:
        self.reader = SparseFileReader(str(path), read_size=256 << 10)
        self.size = self.reader.size
        self.after = after
        self.error = error

    def extents(self) -> Iterator[Extent]:
        for i, ext in enumerate(self.reader.extents()):
            if i == self.after:
                raise self.error
            yield ext

    def close(self) -> None:
        self.reader.close()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize(
    "error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["eio", "ctrl-c"]
)
def test_a_failed_run_leaves_no_file_at_all(
    make_sparse: MakeImage, tmp_path: Path, overlap: bool, error: BaseException
) -> None:
    src = make_sparse(4 * MiB, pieces=10, max_piece=MiB, seed=7)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "target.raw"
    source = FailingSource(src, 3, error)
    with pytest.raises((OSError, Cancelled)) as info:
        run_pipeline(source, [], SparseFileWriter(str(dst)), size=source.size, overlap=overlap)
    if isinstance(error, KeyboardInterrupt):
        assert isinstance(info.value, Cancelled)
    else:
        assert info.value is error
    assert leftovers(out_dir) == []


def test_a_failed_force_run_keeps_the_old_target(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(2 * MiB, seed=8)
    dst = tmp_path / "keep.raw"
    dst.write_bytes(b"previous version")
    source = FailingSource(src, 2, OSError(5, "Input/output error"))
    with pytest.raises(OSError):
        run_pipeline(source, [], SparseFileWriter(str(dst), force=True), size=source.size)
    assert dst.read_bytes() == b"previous version"
    assert leftovers(tmp_path, src, dst) == []


class CreateTargetStage(Stage):
    """Creates the target behind the writer's back, as another process might."""

    name = "race"

    def __init__(self, target: Path) -> None:
        self.target = target

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in upstream:
            if not self.target.exists():
                self.target.write_bytes(b"theirs")
            yield ext


def test_a_target_that_appears_meanwhile_is_not_clobbered(
    make_sparse: MakeImage, tmp_path: Path
) -> None:
    src = make_sparse(MiB, seed=9)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "late.raw"
    reader = SparseFileReader(str(src))
    with pytest.raises(OutputError, match="already exists"):
        run_pipeline(
            reader, [CreateTargetStage(dst)], SparseFileWriter(str(dst)), size=reader.size
        )
    assert dst.read_bytes() == b"theirs"
    assert leftovers(out_dir, dst) == []


def test_sparse_output_takes_writes_in_any_order(tmp_path: Path) -> None:
    rng = random.Random(4)
    slot = 256 << 10
    size = 12 * slot + 5
    expected = bytearray(size)
    order = list(range(12))
    rng.shuffle(order)
    out = SparseOutput(str(tmp_path / "o.raw"), size)
    try:
        for i in order:
            n = rng.randint(1, slot)
            data = bytes(n) if i % 3 == 0 else rng.randbytes(n)
            out.write_at(i * slot, data)
            expected[i * slot : i * slot + n] = data
        out.sync()
    finally:
        out.close()
    assert (tmp_path / "o.raw").read_bytes() == bytes(expected)
    must = nonzero_blocks(bytes(expected))
    assert must <= allocated(tmp_path / "o.raw") <= must + META_SLACK


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root needed, else skip), unmounted afterwards."""
    with mount_tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


def test_disk_full_is_one_line_and_leaves_nothing(
    small_tmpfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def convert_fails(src: Path, reason: str) -> None:
        code = main(["convert", "--progress", "none", str(src), str(small_tmpfs / "out.raw")])
        err = capsys.readouterr().err
        assert code == 5
        assert err.count("\n") == 1
        assert err.startswith("drivepipe: error: ") and reason in err
        assert list(small_tmpfs.iterdir()) == []

    data = random.Random(2).randbytes(6 * MiB)
    src = tmp_path / "big.raw"
    src.write_bytes(data)
    # a raw file says how much data it holds: refused before anything is written
    convert_fails(src, "bytes free")
    # a gzip stream does not: the disk fills up while writing, and nothing is left
    packed = tmp_path / "big.raw.gz"
    packed.write_bytes(gzip.compress(data, 1))
    convert_fails(packed, "no space left on device")


FSIZE_SCRIPT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so writes past the limit fail with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from drivepipe.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    src.write_bytes(random.Random(3).randbytes(3 * MiB))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(4 * MiB), "convert", "--progress", "none",
         str(src), str(out_dir / "x.raw")],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr  # under the limit: fine
    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(MiB), "convert", "--progress", "none",
         "--force", str(src), str(out_dir / "x.raw")],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert proc.returncode == 5
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("drivepipe: error: ")
    assert "too large" in proc.stderr.lower()
    assert (out_dir / "x.raw").read_bytes() == src.read_bytes()  # the old one survives
    assert leftovers(out_dir, out_dir / "x.raw") == []


def test_early_writeback_keeps_the_output_exact(make_sparse: MakeImage, tmp_path: Path) -> None:
    src = make_sparse(6 * MiB + 3, pieces=12, max_piece=MiB, zero_pieces=3, seed=30)
    dst = tmp_path / "wb.raw"
    reader = SparseFileReader(str(src), read_size=128 << 10)
    writer = SparseFileWriter(str(dst))
    writer.writeback_window = 256 << 10  # many writeback calls on a small file
    run_pipeline(reader, [], writer, size=reader.size)
    data = src.read_bytes()
    assert dst.read_bytes() == data
    must = nonzero_blocks(data)
    assert must <= allocated(dst) <= must + META_SLACK


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_output_gets_ordinary_file_permissions(
    make_sparse: MakeImage, tmp_path: Path, mask: int
) -> None:
    src = make_sparse(MiB, seed=31)
    dst = tmp_path / "perm.raw"
    old = os.umask(mask)
    try:
        convert(src, dst)
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask

"""``checksum PATH...`` without typer prints exactly what the typer command prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivepipe.cli import _fast
from drivepipe.cli.cmd_local import LOCAL_IMAGE

RUN = "import sys; from drivepipe.cli import main; code = main(sys.argv[1:]); " \
      "print('typer' in sys.modules, file=sys.stderr); sys.exit(code)"


def drivepipe(*args: str) -> tuple[int, str, str, bool]:
    """Exit code, stdout, stderr without its last line, and whether typer was imported."""
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True,
                          check=False, timeout=120)
    *err, imported = proc.stderr.splitlines()
    return proc.returncode, proc.stdout, "\n".join(err), imported == "True"


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.truncate(64 << 20)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(qcow2.read_bytes()[:100_000])
    return [str(raw), str(qcow2), str(tmp_path / "missing.raw"), str(fifo), str(broken),
            str(tmp_path)]


def test_the_fast_path_prints_what_typer_prints(images: list[str]) -> None:
    fast = drivepipe("checksum", *images)
    slow = drivepipe("checksum", "--", *images)
    assert fast[3] is False, "the fast path imported typer"
    assert slow[3] is True
    assert fast[:3] == slow[:3]
    code, out, err, _ = fast
    assert code == 3  # the first failure's code (the missing file)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == lines[1].split()[0]  # raw == its qcow2
    assert len(err.splitlines()) == 4, err  # one line per file that could not be hashed


def test_anything_to_parse_goes_to_typer(images: list[str]) -> None:
    for args in (["checksum"], ["checksum", "-q", images[0]], ["checksum", "-", images[0]],
                 ["checksum", "--help"], ["convert", images[0], images[0] + ".out"],
                 ["checksum", ""]):
        assert _fast.run(args) is None, args


def test_the_fast_path_reads_with_the_commands_defaults() -> None:
    assert _fast.read_options() == (LOCAL_IMAGE.read(), LOCAL_IMAGE.queue_depth)


SIGBUS_RUN = """
import os, sys, xxhash
from drivepipe import cli
from drivepipe_plugins.sources.file import SparseFileReader
cli._sigbus_as_one_line()
path, how = sys.argv[1:]
ext = next(SparseFileReader(path).extents())
os.truncate(path, 0)  # another process cutting the file short under the mapped window
if how == "copy":
    bytes(ext.data)  # a copy made holding the interpreter lock (pycurl's, the writer's)
else:
    xxhash.xxh3_128(ext.data)  # the hash, which releases it
print("not reached")
"""


@pytest.mark.parametrize("how", ["copy", "hash"])
def test_a_mapped_input_cut_short_is_one_line_and_exit_3(tmp_path: Path, how: str) -> None:
    path = tmp_path / "cut.raw"
    path.write_bytes(os.urandom(4 << 20))
    proc = subprocess.run([sys.executable, "-c", SIGBUS_RUN, str(path), how],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 3
    assert proc.stdout == b""
    assert proc.stderr.decode().splitlines() == [
        "drivepipe: error: an input file was cut short while it was read (SIGBUS); "
        "--no-mmap reads it with pread"]

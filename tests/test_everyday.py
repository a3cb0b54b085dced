"""Everyday inputs that used to give wrong answers or tracebacks, and full disks.

- a pipe or FIFO is refused in one line (it was read as an empty file, or hung);
- ``-f FORMAT`` with a missing or unreadable file is one line, not a traceback;
- ``convert`` says up front when the data cannot fit; a killed convert leaves no
  ``.NAME.*.part``, and stale ones of dead writers are removed.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from tmpfs import needs_root, small_tmpfs

from drivepipe._files import remove_stale_parts
from drivepipe.cli import main

DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
MiB = 1 << 20


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_line(err: str, *fragments: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_pipe_on_stdin_is_refused_not_read_as_empty(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    proc = subprocess.run([DRIVEPIPE, "checksum", "--progress", "none", "/dev/stdin"],
                          input=data, capture_output=True, timeout=60, check=False)
    assert proc.returncode == 3, proc
    assert proc.stdout == b""
    one_line(proc.stderr.decode(), "pipe")


def test_a_fifo_is_refused_without_hanging_its_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"head -c 1048576 /dev/zero > {fifo}"])
    try:
        proc = subprocess.run([DRIVEPIPE, "convert", "--progress", "none", str(fifo),
                               str(tmp_path / "o.raw")], capture_output=True, text=True,
                              timeout=60, check=False)
    finally:
        writer.kill()  # blocked in open() or killed by SIGPIPE: either way, gone
        writer.wait(timeout=30)
    assert proc.returncode == 3
    one_line(proc.stderr, "pipe or FIFO")
    assert not (tmp_path / "o.raw").exists()


@pytest.mark.parametrize("fmt", ["gzip", "qcow2", "raw", "xz,qcow2"])
def test_format_option_with_a_missing_file_is_one_line(tmp_path: Path, fmt: str) -> None:
    for command in (["checksum"], ["inspect"], ["convert"]):
        extra = [str(tmp_path / "o.raw")] if command == ["convert"] else []
        code, out, err = cli(*command, "-f", fmt, str(tmp_path / "nothere"), *extra)
        assert code == 3 and out == ""
        one_line(err, "no such file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_format_option_with_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret.img"
    path.write_bytes(b"\x1f\x8b" + bytes(100))
    path.chmod(0)
    code, _, err = cli("checksum", "-f", "gzip", str(path))
    assert code == 3
    one_line(err, "ermission denied")


def test_a_killed_convert_leaves_no_part_file(tmp_path: Path) -> None:
    src = tmp_path / "big.raw"
    with open(src, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    out = tmp_path / "out" / "copy.raw"
    out.parent.mkdir()
    with subprocess.Popen([DRIVEPIPE, "convert", "--progress", "json", "--read-size", "64K",
                           "--queue-depth", "1", str(src), str(out)],
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"phase": "transfer"' in line:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_stale_parts_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "disk.raw"
    dead = tmp_path / ".disk.raw.abc123.part"
    dead.write_bytes(b"x" * 4096)
    live = tmp_path / ".disk.raw.def456.part"
    live.write_bytes(b"y" * 4096)
    other = tmp_path / ".other.raw.zzz.part"
    other.write_bytes(b"z")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(live)!r}, os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        removed = remove_stale_parts(str(target))
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert removed == [str(dead)]
    assert not dead.exists() and live.exists() and other.exists()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the holder is gone: free again
    finally:
        os.close(fd)


@needs_root
def test_convert_that_cannot_fit_says_so_before_writing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "2m") as small:
        src = tmp_path / "d.raw"
        src.write_bytes(os.urandom(4 * MiB))
        code, _, err = cli("convert", "--progress", "none", str(src), str(small / "o.raw"))
        assert code == 5
        one_line(err, f"{small}:", "bytes free", f"needs {4 * MiB} bytes")
        assert list(small.iterdir()) == []
        # a sparse image whose data fits goes through
        sparse = tmp_path / "s.raw"
        with open(sparse, "wb") as f:
            f.truncate(64 * MiB)
            f.write(os.urandom(MiB))
        code, _, err = cli("convert", "--progress", "none", str(sparse), str(small / "s.raw"))
        assert code == 0, err
        assert (small / "s.raw").read_bytes() == sparse.read_bytes()


def test_dash_is_standard_input_and_output_everywhere(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    digest = subprocess.run([DRIVEPIPE, "checksum", "--progress", "none", str(raw)],
                            capture_output=True, text=True, check=True).stdout.split()[0]
    packed = subprocess.run(["gzip", "-c", str(raw)], capture_output=True, check=True).stdout
    # checksum of a pipe (spooled), and of a redirected file (read in place)
    proc = subprocess.run([DRIVEPIPE, "checksum", "--progress", "none", "-"], input=packed,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"{digest}  -\n"
    with open(raw, "rb") as redirected:
        proc = subprocess.run([DRIVEPIPE, "checksum", "--progress", "none", "-"],
                              stdin=redirected, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"{digest}  -\n"
    # convert - -: from a pipe to a pipe, every byte in order
    proc = subprocess.run([DRIVEPIPE, "convert", "--progress", "none", "-", "-"], input=packed,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == raw.read_bytes()
    # convert FILE - into a file: sparse, like any other output
    out = tmp_path / "o.raw"
    with open(out, "wb") as f:
        subprocess.run([DRIVEPIPE, "convert", "--progress", "none", str(raw), "-"], stdout=f,
                       check=True)
    assert out.read_bytes() == raw.read_bytes()
    assert out.stat().st_blocks * 512 < 4 * MiB
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    # a reader that goes away is one line
    proc = subprocess.run(f"{DRIVEPIPE} convert {raw} - | head -c 10 > /dev/null; "
                          "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 5
    assert "the reading end of the pipe was closed" in proc.stderr


def test_shell_completion_completes_commands_and_options() -> None:
    env = {**os.environ, "_DRIVEPIPE_COMPLETE": "complete_bash"}
    for words, cword, want in (("drivepipe up", "1", "upload"),
                               ("drivepipe upload --lim", "2", "--limit-rate")):
        proc = subprocess.run([DRIVEPIPE], env={**env, "COMP_WORDS": words, "COMP_CWORD": cword},
                              capture_output=True, text=True, check=False, timeout=60)
        assert want in proc.stdout.split(), (words, proc)
    script = subprocess.run([DRIVEPIPE, "--show-completion", "bash"], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    assert "_drivepipe_completion" in script

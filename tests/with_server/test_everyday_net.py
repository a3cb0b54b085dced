"""Everyday network use: bandwidth caps, stalls, early password checks, full disks."""

from __future__ import annotations

import bz2
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tmpfs import needs_root, resize, small_tmpfs

from drivepipe.cli import main
from drivepipe.server import RunningServer

MiB = 1 << 20


@pytest.fixture
def env(drive_store: RunningServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.startswith(("CLOUDSIGMA_", "DRIVEPIPE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSIGMA_CONFIG", str(tmp_path / "none.conf"))
    for key, value in drive_store.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_limit_rate_caps_an_upload(drive_store: RunningServer, env: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    image = env / "d.raw"
    image.write_bytes(os.urandom(6 * MiB))
    start = time.monotonic()
    code = main(["upload", "--endpoint", drive_store.base_url, "--progress", "none",
                 "--limit-rate", "2M", str(image)])
    elapsed = time.monotonic() - start
    assert code == 0, capfd.readouterr().err
    # 6 MiB at 2 MiB/s: about 3 s; a lower bound only (a slow machine only adds time)
    assert elapsed >= 2.0


@pytest.mark.parametrize(("option", "value"), [("--limit-rate", "0"), ("--limit-rate", "x"),
                                               ("--stall-timeout", "0")])
def test_nonsense_rates_and_timeouts_are_refused(drive_store: RunningServer, env: Path,
                                                 capfd: pytest.CaptureFixture[str],
                                                 option: str, value: str) -> None:
    image = env / "d.raw"
    image.write_bytes(b"x" * 4096)
    for command in ("upload", "download"):
        target = str(image) if command == "upload" else "00000000-0000-4000-8000-000000000000"
        code = main([command, "--endpoint", drive_store.base_url, "--progress", "none",
                     option, value, target])
        err = capfd.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and option in err
    assert drive_store.store.list() == []


def test_wrong_password_is_told_before_a_counting_pass(
    drive_store: RunningServer, env: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    image = env / "d.raw.bz2"
    image.write_bytes(bz2.compress(os.urandom(MiB) * 4))  # bzip2: a counting pass first
    monkeypatch.setenv("CLOUDSIGMA_PASSWORD", "Wr0ng-pa55")
    code = main(["upload", "--endpoint", drive_store.base_url, "--progress", "json",
                 str(image)])
    err = capfd.readouterr().err
    assert code == 6
    assert '"counting"' not in err  # refused before any decoding
    assert err.strip().splitlines()[-1].startswith("drivepipe: error: ")
    assert "Wr0ng-pa55" not in err


def test_a_stalled_download_is_cut_and_fails_in_one_line(
    drive_store: RunningServer, put_drive: Any, env: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    uuid = put_drive(drive_store, os.urandom(2 * MiB))
    drive_store.faults.delay(5.0, count=0, match="/direct/")  # the server goes silent
    start = time.monotonic()
    code = main(["download", uuid, "--endpoint", drive_store.base_url, "--progress", "none",
                 "--stall-timeout", "1", "--retries", "1", "--retry-delay", "0.01",
                 "-o", "s.img"])
    err = capfd.readouterr().err
    assert code == 6, err
    assert err.count("drivepipe: error:") == 1 and "Traceback" not in err
    assert time.monotonic() - start < 30
    assert not (env / "s.img").exists()


@needs_root
def test_a_full_disk_keeps_what_arrived_and_the_rerun_goes_on(
    drive_store: RunningServer, put_drive: Any, env: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with small_tmpfs(env / "small", "3m") as small:
        data = os.urandom(5 * MiB)
        uuid = put_drive(drive_store, data)
        out = small / "d.img"
        args = ["download", uuid, "--endpoint", drive_store.base_url, "--progress", "none",
                "--block-size", "256K", "--range-size", "256K", "--connections", "1",
                "-o", str(out)]
        assert main(args) == 5
        err = capfd.readouterr().err
        assert "may fit" in err  # warned before it started
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"drivepipe: error: {out}.part: no space left on device; ")
        assert "are kept" in line and "run the same command again" in line
        journal = json.loads((small / "d.img.part.journal").read_text())
        kept = len(journal["blocks"])
        assert kept > 0
        assert not list(small.glob("*.tmp"))
        # more room: the rerun fetches only what is missing and verifies
        resize(small, "16m")
        assert main([*args[:4], "--progress", "json", *args[6:]]) == 0
        err = capfd.readouterr().err
        assert f"resuming {out}.part:" in err
        summary = [json.loads(x) for x in err.splitlines() if x.startswith("{")][-1]
        assert summary["stages"][-1]["kept"] == kept * 256 * 1024
        assert out.read_bytes()[: len(data)] == data


@pytest.mark.parametrize("kind", ["raw", "gz", "xz", "zst", "qcow2"])
def test_an_empty_image_is_refused_locally(drive_store: RunningServer, env: Path,
                                           capfd: pytest.CaptureFixture[str],
                                           kind: str) -> None:
    import shutil  # noqa: PLC0415 - only this test needs the tools

    path = env / f"empty.{kind}"
    tool = {"gz": ["gzip", "-c"], "xz": ["xz", "-c"], "zst": ["zstd", "-q", "-c"]}.get(kind)
    if kind == "raw":
        path.write_bytes(b"")
    elif kind == "qcow2":
        if shutil.which("qemu-img") is None:
            pytest.skip("needs qemu-img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "0"], check=True)
    else:
        assert tool is not None
        if shutil.which(tool[0]) is None:
            pytest.skip(f"needs {tool[0]}")
        path.write_bytes(subprocess.run(tool, input=b"", capture_output=True,
                                        check=True).stdout)
    code = main(["upload", "--endpoint", drive_store.base_url, "--progress", "none", str(path)])
    err = capfd.readouterr().err
    assert code == 3, err
    assert err.count("\n") == 1 and "empty" in err
    assert drive_store.store.list() == []

"""``--progress json`` against its documented schema (docs/progress.schema.json).

Real commands, real store: an upload that needs a counting pass (gzip without
sizes), a convert that spools (qcow2 in bzip2), a 4-connection download.  Every
line is checked against the schema; the order is start, then phase/progress
events, then one summary; a phase event marks every phase change; progress
events come at least once a second; the download reports the connections that
ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from drivepipe.server import RunningServer

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "progress.schema.json").read_text())
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
MiB = 1 << 20


def events_of(stderr: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    for event in events:
        jsonschema.validate(event, SCHEMA)
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "summary"
    assert all(e["event"] in ("phase", "progress") for e in events[1:-1])
    return events


def run(store: RunningServer, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **store.env}
    return subprocess.run([DRIVEPIPE, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120, check=False)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip")
def test_upload_with_a_counting_pass(drive_store: RunningServer, tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(range(256)) * (12 * MiB // 256))
    packed = tmp_path / "d.raw.gz"
    with open(packed, "wb") as out:
        subprocess.run(["gzip", "-c", str(raw)], stdout=out, check=True)
    proc = run(drive_store, tmp_path, "upload", "--endpoint", drive_store.base_url,
               "--progress", "json", "--limit-rate", "4M", str(packed))
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc.stderr)
    assert events[0]["chain"] == ["gzip", "raw"]  # known before the counting pass
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases[:2] == ["counting", "transfer"], phases
    transfer = next(e for e in events if e["event"] == "phase" and e["phase"] == "transfer")
    assert transfer["total"] == raw.stat().st_size
    # capped at 4 MiB/s, 12 MiB take about 3 s: at least one event a second
    progress = [e for e in events if e["event"] == "progress"]
    elapsed = events[-1]["elapsed_s"]
    assert len(progress) >= int(elapsed) - 1
    # the sender counts what it handed to curl: never more than the rate allows
    for e in progress:
        sent = e["stages"][-1]["bytes"]
        assert sent <= 4 * MiB * (e["elapsed_s"] + 1) + 2 * MiB


@pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("bzip2") is None,
                    reason="needs qemu-img and bzip2")
def test_convert_with_a_spool(drive_store: RunningServer, tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    qcow = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    subprocess.run(["bzip2", str(qcow)], check=True)
    proc = run(drive_store, tmp_path, "convert", "--progress", "json",
               "--spool-dir", str(tmp_path), f"{qcow}.bz2", str(tmp_path / "o.raw"))
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc.stderr)
    assert events[0]["chain"] == ["bzip2", "qcow2"]
    assert [e["phase"] for e in events if e["event"] == "phase"][:2] == ["spooling", "transfer"]
    assert events[-1]["chain"] == ["bzip2", "qcow2"] and events[-1]["ok"] is True


def test_download_reports_the_connections_that_ran(
    drive_store: RunningServer, put_drive: Any, tmp_path: Path
) -> None:
    uuid = put_drive(drive_store, bytes(range(256)) * (16 * MiB // 256))
    proc = run(drive_store, tmp_path, "download", uuid, "--endpoint", drive_store.base_url,
               "--progress", "json", "--connections", "4", "--range-size", "1M",
               "--block-size", "1M", "-o", "x.img")
    assert proc.returncode == 0, proc.stderr
    events = events_of(proc.stderr)
    receive = events[-1]["stages"][0]
    assert receive["connections"] == 4
    assert events[-1]["ok"] is True


@pytest.mark.skipif(shutil.which("gzip") is None, reason="needs gzip")
def test_a_failed_command_ends_with_summary_ok_false(drive_store: RunningServer,
                                                     tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    packed = subprocess.run(["gzip", "-c", str(raw)], capture_output=True, check=True).stdout
    cut = tmp_path / "cut.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    proc = run(drive_store, tmp_path, "convert", "--progress", "json", str(cut),
               str(tmp_path / "o.raw"))
    assert proc.returncode == 3
    events = events_of(proc.stderr)
    assert events[-1]["ok"] is False
    assert proc.stderr.splitlines()[-1].startswith("drivepipe: error: ")

"""The live view in a real terminal (tmux) at 80 and 120 columns.

An upload capped at a few MB/s to the local store runs inside tmux; the screen
is read while it runs and after it ends.  Checked: no line is cut or wrapped,
the bar has a line of its own, the table's columns line up with their headers,
narrow terminals drop columns instead of wrapping, and the bytes shown as sent
follow the sender (a sparse image is not "100%" while its data is still going).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drivepipe.server import RunningServer

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
MiB = 1 << 20


def sparse_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
        for mib in range(0, 32, 8):
            f.seek(mib * MiB)
            f.write(os.urandom(2 * MiB))
    return path


def screen(session: str) -> list[str]:
    out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


def check_table(lines: list[str], width: int) -> None:
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    names = lines[header].split()
    rows = [line for line in lines[header + 1 :] if re.match(r"^(read|xxh3|send) ", line)]
    assert [r.split()[0] for r in rows] == ["read", "xxh3", "send"], lines
    for line in lines:
        assert len(line) <= width and "…" not in line, line
    # right-aligned columns end where their header ends
    rate_end = lines[header].index("rate") + len("rate")
    for row in rows:
        match = re.search(r"(\d+(\.\d)? [kMGT]B/s|-)(?=\s)", row)
        assert match is not None, row
        assert match.end() == rate_end, (lines[header], row)
    if width < 100:
        assert "holes" not in names and "queue" not in names
    else:
        assert "holes" in names and "queue" in names


@pytest.mark.parametrize("width", [80, 120])
def test_live_view_fits_and_tells_the_truth(drive_store: RunningServer, tmp_path: Path,
                                            width: int) -> None:
    image = sparse_image(tmp_path / "img.raw")
    session = f"dp-live-{width}-{os.getpid()}"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in drive_store.env.items())
    # the terminal, not inherited COLUMNS/LINES, must say how wide the view is
    cmd = (f"env -u COLUMNS -u LINES HOME={tmp_path} {env} {DRIVEPIPE} upload "
           f"--endpoint {drive_store.base_url} --limit-rate 8M {image} > {tmp_path}/uuid; "
           "sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(width), "-y", "24",
                    cmd], check=True)
    try:
        running: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = screen(session)
            if any(line.startswith("send ") for line in lines) and any(
                    "%)," in line for line in lines):
                running = lines
                break
            time.sleep(0.2)
        assert running, f"the live view never showed the table: {screen(session)}"
        check_table(running, width)
        bar = next(line for line in running if "━" in line)
        assert "stage" not in bar
        head = next(line for line in running if "%)," in line)
        pct = int(re.search(r"\((\d+)%\)", head).group(1))  # type: ignore[union-attr]
        # 32 MiB (holes go on the wire as zeros) at 8 MiB/s: ~4 s, far from done early on
        assert pct < 100, running
        assert "of 32.0 MiB" in head
        while time.monotonic() < deadline and not (tmp_path / "uuid").read_text().strip():
            time.sleep(0.2)
        time.sleep(0.5)
        final = screen(session)
        assert any("done: 32.0 MiB in " in line for line in final), final
        check_table(final, width)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)

"""``drivepipe demo`` runs the whole job against its own store and exits 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drivepipe.cli import main


def test_demo_uploads_and_downloads_verified(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--size", "64M", "--keep", str(tmp_path), "--progress", "json"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "demo finished" in err
    summaries = [json.loads(line) for line in err.splitlines()
                 if line.startswith("{") and '"summary"' in line]
    assert [s["ok"] for s in summaries] == [True, True]
    raw = (tmp_path / "sample.raw").read_bytes()
    back = (tmp_path / "downloaded.raw").read_bytes()
    # The store grows a 64 MiB image to its 512 MiB minimum: the sample, then zeros.
    assert len(back) == 512 << 20
    assert back[: len(raw)] == raw
    assert back[len(raw):].count(0) == len(back) - len(raw)
    # The demo's password never leaks into what it prints.
    assert "password" not in err.lower()

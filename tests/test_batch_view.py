"""What `drivepipe batch` shows: the live line, json events, the closing table."""

from __future__ import annotations

import io
import json

from rich.console import Console

from drivepipe.cli._batch_view import BatchView, closing_line, report_table
from drivepipe.jobs import BatchReport, ItemResult


def test_the_live_line_counts_items_rate_eta_and_the_slowest() -> None:
    view = BatchView(5, "none", stream=io.StringIO())
    for key in ("a", "b", "c"):
        view.on_event({"event": "start", "key": key})
    view.on_event({"event": "progress", "key": "a", "bytes": 900, "total": 1000})
    view.on_event({"event": "progress", "key": "b", "bytes": 100, "total": 1000})
    view.on_event({"event": "progress", "key": "c", "bytes": 500, "total": 1000})
    view.on_event({"event": "done", "key": "a"})
    view.on_event({"event": "failed", "key": "c", "error": "boom"})
    line = view.line()
    assert line.startswith("2/5 items  1 running  1 failed")
    assert "slowest b (10%)" in line and "ETA" in line
    # 900 bytes left of b, and two items not started at a's size of 1000
    assert view.moved == 1500
    assert view._eta(1450.0, 2) == (900 + 2 * 1000) / 1450.0


def test_json_mode_writes_each_event_as_a_line() -> None:
    out = io.StringIO()
    view = BatchView(1, "json", stream=out)
    view.on_event({"event": "start", "key": "a"})
    view.on_event({"event": "done", "key": "a", "uuid": "u"})
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == \
        ["start", "done"]


def test_the_table_has_a_row_per_item_with_its_error() -> None:
    report = BatchReport([
        ItemResult("up0", "upload", "/a.raw", "a", "done", uuid="U-0", xxh128="ab" * 16,
                   size=1 << 20, seconds=1.5),
        ItemResult("dl0", "download", "D", "/b.raw", "failed", error="drive D: HTTP 404"),
    ], seconds=2.0, counts={"done": 1, "failed": 1})
    out = io.StringIO()
    Console(file=out, width=200).print(report_table(report))
    text = out.getvalue()
    assert "U-0" in text and "ab" * 16 in text and "1.0 MiB" in text
    assert "HTTP 404" in text and "dl0" in text
    assert closing_line(report) == "batch: 2 items in 2.0s: 1 done, 1 failed"


def test_the_rich_view_has_a_row_per_running_item() -> None:
    view = BatchView(3, "none", stream=io.StringIO())
    view.on_event({"event": "start", "key": "vm-a"})
    view.on_event({"event": "start", "key": "vm-b"})
    view.on_event({"event": "progress", "key": "vm-a", "bytes": 1 << 20, "total": 4 << 20})
    out = io.StringIO()
    Console(file=out, width=120).print(view.render())
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("0/3 items  2 running")
    assert any("vm-a" in line and "1.0 MiB" in line and "25%" in line for line in lines)
    assert any("vm-b" in line for line in lines)

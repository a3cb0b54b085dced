"""The live view and the final summary: what they show, in every mode.

Stats are filled either by hand (to pin down one number) or by a real pipeline
over a real sparse file with a stage made slow by sleeping, so the bottleneck
is known without timing thresholds.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from drivepipe._errors import UsageError
from drivepipe._extent import Extent
from drivepipe._runner import run_pipeline
from drivepipe._stage import Stage
from drivepipe._stats import RunStats
from drivepipe.cli._progress import (
    BOTTLENECK_MARK,
    MODES,
    Reporter,
    eta_seconds,
    headline,
    render,
    resolve_mode,
    stage_table,
)
from drivepipe_plugins.sources.file import SparseFileReader
from drivepipe_plugins.stages.xxh3 import Xxh3Stage
from drivepipe_plugins.targets.discard import DiscardSink


class SleepyStage(Stage):
    """Passes extents through, sleeping on each: a stage that is obviously slow."""

    name = "sleepy"

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in upstream:
            time.sleep(self.delay)
            yield ext


class CountingStage(Stage):
    """Passes extents through and keeps a counter in its stats' ``extra``."""

    name = "counting"

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        mine = next(s for s in self.stats.stages if s.name == self.name)
        mine.extra["chunks_done"] = 0
        for ext in upstream:
            mine.extra["chunks_done"] += 1
            yield ext


def text_of(renderable: object) -> str:
    out = io.StringIO()
    Console(file=out, width=200).print(renderable)
    return out.getvalue()


def hand_stats(*, data_total: int | None) -> RunStats:
    """A run 4 s in: 1 GiB of 4 GiB done, 256 MiB of it data."""
    stats = RunStats(title="upload x", total=4 << 30, data_total=data_total)
    stats.started = stats.transfer_started = time.perf_counter() - 4.0
    stats.phase = "transfer"
    src = stats.add("read", "source")
    sink = stats.add("send", "sink")
    for st in (src, sink):
        st.bytes, st.data_bytes, st.hole_bytes = 1 << 30, 256 << 20, 768 << 20
    src.inclusive = 0.5
    sink.started = stats.started
    return stats


def test_eta_counts_data_bytes_only() -> None:
    # 256 MiB of data took ~4 s; 256 MiB more data to go -> ~4 s, although
    # 3 GiB of bytes are left (the old bytes-based estimate said ~12 s).
    stats = hand_stats(data_total=512 << 20)
    eta = eta_seconds(stats)
    assert eta is not None
    assert 3.5 < eta < 5.0


def test_eta_without_a_data_total_uses_the_data_share_so_far() -> None:
    # 1/4 of the bytes so far were data: 3 GiB left -> 768 MiB of data -> ~12 s.
    stats = hand_stats(data_total=None)
    eta = eta_seconds(stats)
    assert eta is not None
    assert 11.0 < eta < 13.5


def test_no_eta_before_data_moved_or_after_the_end() -> None:
    stats = hand_stats(data_total=None)
    stats.stages[-1].data_bytes = 0
    assert eta_seconds(stats) is None
    stats = hand_stats(data_total=None)
    stats.stages[-1].bytes = stats.total
    assert eta_seconds(stats) is None


def test_headline_splits_data_and_zeros() -> None:
    line = headline(hand_stats(data_total=512 << 20))
    assert "1.0 GiB of 4.0 GiB (25%)" in line
    assert "data 256.0 MiB" in line and "zeros 768.0 MiB" in line
    assert "ETA" in line


def test_phase_line_replaces_the_headline_during_a_counting_pass() -> None:
    stats = hand_stats(data_total=None)
    stats.phase, stats.phase_done, stats.phase_total = "counting", 1 << 30, 4 << 30
    line = headline(stats)
    assert "counting" in line and "(25%" in line
    assert "counting" in text_of(render(stats))


def test_table_marks_the_busiest_stage_and_shows_extra_counters() -> None:
    stats = hand_stats(data_total=None)
    stats.stages[-1].extra.update(chunks_done=7, retried=1, sent_bytes=3 << 20)
    rows = text_of(stage_table(stats)).splitlines()
    send = next(r for r in rows if r.startswith("send"))
    read = next(r for r in rows if r.startswith("read"))
    assert BOTTLENECK_MARK in send and BOTTLENECK_MARK not in read
    assert "chunks_done=7" in send and "retried=1" in send and "sent_bytes=3.0MiB" in send


def real_run(tmp_path: Path, mode: str, stages_of: object = None) -> tuple[RunStats, str]:
    path = tmp_path / "img.raw"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        for off in range(0, 64 << 20, 8 << 20):
            f.seek(off)
            f.write(b"\x5a" * (1 << 20))
    stats = RunStats(title="test run")
    out = io.StringIO()
    with Reporter(stats, mode, stream=out, interval=0.05):
        reader = SparseFileReader(str(path), read_size=1 << 20)
        stages: list[Stage] = [SleepyStage(), Xxh3Stage()]
        if callable(stages_of):
            stages = stages_of(stats)
        run_pipeline(reader, stages, DiscardSink(), size=reader.size, stats=stats, split=1)
    return stats, out.getvalue()


def test_json_mode_ends_with_one_summary_object(tmp_path: Path) -> None:
    _, text = real_run(tmp_path, "json")
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["event"] for e in events].count("summary") == 1
    assert events[-1]["event"] == "summary"
    assert events[0]["event"] == "start"
    assert all(e["event"] in ("progress", "phase") for e in events[1:-1])
    final = events[-1]
    assert final["ok"] is True
    assert final["done"] == final["total"] == 64 << 20
    assert final["bottleneck"] == "sleepy"
    assert [s["name"] for s in final["stages"]] == ["read", "sleepy", "xxh3", "discard"]
    sink = final["stages"][-1]
    assert sink["data_bytes"] == 8 << 20 and sink["hole_bytes"] == 56 << 20
    assert final["queue_fill_avg"] is not None


def test_json_summary_says_failed_on_error(tmp_path: Path) -> None:
    stats = RunStats(title="failing")
    out = io.StringIO()
    with pytest.raises(RuntimeError), Reporter(stats, "json", stream=out):
        raise RuntimeError("boom")
    final = json.loads(out.getvalue().splitlines()[-1])
    assert final["event"] == "summary" and final["ok"] is False


def test_plain_summary_names_the_bottleneck_and_the_queue(tmp_path: Path) -> None:
    _, text = real_run(tmp_path, "plain")
    assert "test run done: 64.0 MiB" in text
    assert "bottleneck sleepy" in text
    xxh3 = next(line for line in text.splitlines() if line.strip().startswith("xxh3:"))
    assert "queue in" in xxh3  # the queue sits between sleepy and xxh3 (split=1)


def test_rich_summary_table_after_the_run(tmp_path: Path) -> None:
    _, text = real_run(tmp_path, "rich")
    assert "test run done" in text
    sleepy = next(line for line in text.splitlines() if line.startswith("sleepy"))
    assert BOTTLENECK_MARK in sleepy


def test_extra_counters_reach_the_summary(tmp_path: Path) -> None:
    def stages_of(stats: RunStats) -> list[Stage]:
        return [CountingStage(stats), SleepyStage(0.001)]

    _, text = real_run(tmp_path, "json", stages_of)
    final = json.loads(text.splitlines()[-1])
    counting = next(s for s in final["stages"] if s["name"] == "counting")
    assert counting["chunks_done"] > 0


def test_none_mode_prints_nothing(tmp_path: Path) -> None:
    _, text = real_run(tmp_path, "none")
    assert text == ""


def test_modes() -> None:
    assert set(MODES) == {"auto", "rich", "plain", "json", "none"}
    assert resolve_mode("auto", io.StringIO()) == "none"
    with pytest.raises(UsageError):
        resolve_mode("fancy")


def test_headline_before_anything_is_known() -> None:
    assert headline(RunStats(title="upload x")) == "upload x: opening"


def test_time_share_leaves_out_a_counting_pass() -> None:
    # 10 s of counting, then 2 s of streaming during which the sink was busy 1.8 s.
    stats = RunStats(title="checksum x.bz2", total=1 << 20)
    now = time.perf_counter()
    stats.started, stats.transfer_started, stats.finished = now - 12.0, now - 2.0, now
    src = stats.add("read", "source")
    sink = stats.add("discard", "sink")
    src.bytes = sink.bytes = 1 << 20
    src.inclusive = 0.2
    sink.started, sink.finished = now - 2.0, now
    sink.upstream = src
    row = next(r for r in text_of(stage_table(stats)).splitlines() if r.startswith("discard"))
    assert " 90%" in row  # 1.8 of the 2 streaming seconds, not 1.8 of 12

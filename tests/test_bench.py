"""``drivepipe bench``: the classification on synthetic slow stages, and its parts.

The slow stages sleep on every extent, so which stage is slowest is not a
matter of timing noise: a decoder sleeping 40 ms per MiB is far slower than
reading a cached file, and a sink sleeping as long is far slower than hashing.
Nothing here asserts a speed; only which stage bench names.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from drivepipe._bench import (
    Advice,
    BenchReport,
    Budget,
    Measure,
    Piece,
    ReplaySource,
    Subject,
    cut_layout,
    report_lines,
    run_bench,
    slowest,
    take,
)
from drivepipe._extent import Extent
from drivepipe._stage import ImageInput, OpenOptions, Sink, Stage
from drivepipe.cli import main
from drivepipe_plugins.sources.file import SparseFileReader

MiB = 1 << 20
DELAY = 0.04


class SleepyDecoder(Stage):
    """A 'decoder' that passes bytes through and sleeps on each extent."""

    name = "sleepy-decoder"

    def process(self, upstream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in upstream:
            time.sleep(DELAY)
            yield ext


class SleepySink(Sink[int]):
    """A sink that sleeps on each data extent, like a very slow network."""

    name = "sleepy-send"

    def consume(self, extents: Iterator[Extent], size: int) -> int:
        total = 0
        for ext in extents:
            if ext.data is not None:
                time.sleep(DELAY)
            total += ext.length
        return total


def make_image(path: Path, size: int, data: list[tuple[int, int]]) -> Path:
    """A sparse file of ``size`` bytes with random data at each ``(offset, length)``."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data:
            f.seek(offset)
            f.write(os.urandom(length))
    return path


def raw_subject(path: Path, stages: list[Stage] | None = None) -> Subject:
    def open_(options: OpenOptions) -> ImageInput:
        reader = SparseFileReader(str(path), read_size=options.read_size)
        return ImageInput(str(path), "synthetic", reader.size, reader, list(stages or []),
                          file_size=reader.size)

    return Subject(path=str(path), open=open_, options=OpenOptions(read_size=MiB))


BUDGET = Budget(seconds=5.0, limit=64 * MiB)


def test_a_slow_decoder_is_named_the_bottleneck(tmp_path: Path) -> None:
    path = make_image(tmp_path / "dense.raw", 8 * MiB, [(0, 8 * MiB)])
    report = run_bench(raw_subject(path, [SleepyDecoder()]), BUDGET)
    assert report.bottleneck.role == "decode"
    assert [m.role for m in report.stages] == ["read", "decode", "hash", "send"]
    assert report.advice, "a bottleneck always comes with advice"
    assert "limits the throughput" in next(
        line for line in report_lines(report) if "decode (synthetic)" in line)


def test_a_slow_sink_is_named_the_bottleneck(tmp_path: Path) -> None:
    path = make_image(tmp_path / "sparse.raw", 64 * MiB, [(0, 2 * MiB), (32 * MiB, 2 * MiB)])
    subject = raw_subject(path)
    subject.make_sink = lambda _size: SleepySink()
    subject.sink_label = "sleepy"
    report = run_bench(subject, BUDGET)
    assert report.bottleneck.role == "send"
    assert report.bottleneck.label == "send (sleepy)"
    assert [m.role for m in report.stages] == ["read", "hash", "send"]  # raw: no decoder
    assert report.data_share == pytest.approx(4 / 64)


def test_the_sink_sees_the_images_holes_and_data(tmp_path: Path) -> None:
    path = make_image(tmp_path / "sparse.raw", 16 * MiB, [(4 * MiB, MiB)])
    seen: list[tuple[int, int]] = []

    class Recording(Sink[None]):
        def consume(self, extents: Iterator[Extent], size: int) -> None:
            for ext in extents:
                seen.append((ext.length, 0 if ext.data is None else 1))

    subject = raw_subject(path)
    subject.make_sink = lambda _size: Recording()
    run_bench(subject, BUDGET)
    data = sum(n for n, is_data in seen if is_data)
    holes = sum(n for n, is_data in seen if not is_data)
    assert data > 0 and holes > data  # replayed with the image's shape, holes as holes


def test_slowest_is_the_lowest_rate() -> None:
    read = Measure("read", "read", 100, 1.0)
    decode = Measure("decode", "decode", 100, 4.0)
    send = Measure("send", "send", 100, 2.0)
    assert slowest([read, decode, send]) is decode


def test_take_cuts_a_window_exactly() -> None:
    stream = iter([Extent(0, 10, b"a" * 10), Extent.hole(10, 10), Extent(20, 10, b"b" * 10)])
    out = list(take(stream, 25, float("inf")))
    assert [(e.offset, e.length, e.data is None) for e in out] == [
        (0, 10, False), (10, 10, True), (20, 5, False)]
    assert bytes(out[-1].data or b"") == b"bbbbb"


def test_take_stops_at_the_deadline() -> None:
    stream = (Extent(i * 4, 4, b"abcd") for i in range(1000))
    out = list(take(stream, 1 << 30, time.perf_counter() - 1))
    assert len(out) == 1


def test_replay_tiles_the_layout_with_holes_unallocated() -> None:
    layout = [Piece(0, 5 * MiB, False), Piece(5 * MiB, 3 * MiB, True), Piece(8 * MiB, 7, False)]
    source = ReplaySource(layout, 8 * MiB + 7)
    pos = 0
    for ext in source.extents():
        assert ext.offset == pos
        hole = 5 * MiB <= ext.offset < 8 * MiB
        assert (ext.data is None) == hole
        pos += ext.length
    assert pos == 8 * MiB + 7
    assert cut_layout(layout, 6 * MiB) == [Piece(0, 5 * MiB, False), Piece(5 * MiB, MiB, True)]


def test_advice_lines_show_the_measured_gain() -> None:
    neck = Measure("read", "read (4.0 MiB reads)", 100 << 20, 1.0)
    report = BenchReport("x.img", "raw", 1 << 30, 0.5, [neck], None, neck, [
        Advice("--read-size 16M", 100e6, 150e6), Advice("--read-size 64M", 100e6, 95e6)])
    lines = report_lines(report)
    assert any(line.startswith("advice: --read-size 16M") and "(+50%)" in line for line in lines)
    assert any(line.startswith("tried, no clear gain: --read-size 64M") for line in lines)
    assert "bottleneck: read (4.0 MiB reads)" in "\n".join(lines)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_bench_json_with_a_discard_sink(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img.raw", 32 * MiB, [(0, 4 * MiB)])
    code, out, err = cli("bench", str(path), "--discard", "--seconds", "1", "--limit", "16M",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "raw"
    assert {s["role"] for s in report["stages"]} == {"read", "hash", "send"}
    assert report["pipeline"]["raw_bytes"] == 16 * MiB  # the window, not the whole image
    assert report["bottleneck"] in {"read", "hash", "send"}


def test_cli_bench_refuses_bad_options(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img.raw", MiB, [(0, 4096)])
    code, _, err = cli("bench", str(path), "--discard", "--seconds", "0")
    assert code == 2 and "--seconds" in err
    code, _, err = cli("bench", str(tmp_path / "missing.raw"), "--discard")
    assert code == 3 and "no such file" in err and "Traceback" not in err
    (tmp_path / "empty.raw").write_bytes(b"")
    code, _, err = cli("bench", str(tmp_path / "empty.raw"), "--discard")
    assert code == 3 and "empty" in err

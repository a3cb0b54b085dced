"""Progress reporting for the CLI: rich live view, plain lines, JSON lines, none.

The library never prints; the runner only fills :class:`RunStats`.  A reporter
samples those counters from its own thread and renders them on stderr, so the
byte-moving loops pay nothing for the display.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._errors import UsageError
from ._sizes import format_rate, format_size
from ._stats import RunStats

Mode = Literal["auto", "rich", "plain", "json", "none"]
MODES: tuple[str, ...] = ("auto", "rich", "plain", "json", "none")


def resolve_mode(mode: str, stream: IO[str] | None = None) -> str:
    if mode not in MODES:
        raise UsageError(f"--progress must be one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "rich" if stream.isatty() else "none"


def eta_seconds(stats: RunStats) -> float | None:
    """Seconds left, estimated on the bytes that cost time (data, not holes)."""
    last = stats.stages[-1] if stats.stages else None
    if last is None or stats.total <= 0:
        return None
    done = last.bytes
    if done <= 0 or done >= stats.total:
        return None
    elapsed = stats.elapsed
    return elapsed * (stats.total - done) / done


def stage_table(stats: RunStats) -> Table:
    """One row per part: bytes, throughput, share of wall time, bottleneck mark."""
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("stage")
    table.add_column("bytes", justify="right")
    table.add_column("data", justify="right")
    table.add_column("holes", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("busy", justify="right")
    neck = stats.bottleneck()
    wall = max(stats.elapsed, 1e-9)
    for st in stats.stages:
        mark = " ◀ bottleneck" if st is neck and len(stats.stages) > 1 else ""
        table.add_row(
            st.name + mark,
            format_size(st.bytes),
            format_size(st.data_bytes),
            format_size(st.hole_bytes),
            format_rate(st.data_rate),
            f"{100 * st.busy / wall:.0f}%",
        )
    return table


def headline(stats: RunStats) -> str:
    total = stats.total
    if stats.phase != "transfer" and stats.phase_total:
        pct = 100 * stats.phase_done / stats.phase_total
        return f"{stats.title}: {stats.phase} {pct:.0f}%"
    done = stats.done
    pct = 100 * done / total if total else 100.0
    rate = done / stats.elapsed if stats.elapsed > 0 else 0.0
    eta = eta_seconds(stats)
    eta_text = f", ETA {eta:.0f}s" if eta is not None else ""
    queue = ""
    if stats.queue_fill is not None:
        queue = f", queue {stats.queue_fill[0]}/{stats.queue_fill[1]}"
    return (
        f"{stats.title}: {format_size(done)} of {format_size(total)} ({pct:.0f}%), "
        f"{format_rate(rate)}{eta_text}{queue}"
    )


class Reporter:
    """Renders a RunStats on stderr while a command runs, then a summary."""

    def __init__(
        self,
        stats: RunStats,
        mode: str = "auto",
        *,
        stream: IO[str] | None = None,
        interval: float | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.stats = stats
        default_interval = {"rich": 0.25, "plain": 2.0, "json": 1.0}.get(self.mode, 1.0)
        self.interval = interval if interval is not None else default_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self.console = Console(file=self.stream, stderr=self.stream is sys.stderr)

    def __enter__(self) -> Reporter:
        if self.mode == "rich":
            self._live = Live(
                self._render(), console=self.console, refresh_per_second=4, transient=True
            )
            self._live.__enter__()
        if self.mode != "none":
            self._thread = threading.Thread(target=self._loop, daemon=True, name="drivepipe-ui")
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
        self.summary(ok=exc is None)

    def _loop(self) -> None:
        emit: Callable[[], None] = {
            "rich": self._tick_rich,
            "plain": self._tick_plain,
            "json": self._tick_json,
        }[self.mode]
        while not self._stop.wait(self.interval):
            emit()

    def _render(self) -> RenderableType:
        return Group(Text(headline(self.stats)), stage_table(self.stats))

    def _tick_rich(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _tick_plain(self) -> None:
        print(headline(self.stats), file=self.stream, flush=True)

    def _tick_json(self) -> None:
        print(json.dumps({"event": "progress", **self.stats.as_dict()}), file=self.stream,
              flush=True)

    def summary(self, *, ok: bool) -> None:
        """The final table (rich/plain) or final object (json)."""
        if self.mode == "none":
            return
        if self.mode == "json":
            event = {"event": "summary", "ok": ok, **self.stats.as_dict()}
            print(json.dumps(event), file=self.stream, flush=True)
            return
        state = "done" if ok else "failed"
        wall = self.stats.elapsed
        rate = self.stats.done / wall if wall > 0 else 0.0
        line = (f"{self.stats.title} {state}: {format_size(self.stats.done)} in {wall:.2f}s "
                f"({format_rate(rate)})")
        if self.mode == "plain":
            print(line, file=self.stream, flush=True)
            for st in self.stats.stages:
                print(f"  {st.name}: {format_size(st.bytes)} at {format_rate(st.data_rate)}, "
                      f"busy {st.busy:.2f}s", file=self.stream, flush=True)
            return
        self.console.print(line)
        self.console.print(stage_table(self.stats))


def now() -> float:
    return time.perf_counter()

"""What ``drivepipe batch`` shows: the live view of the batch and the closing table.

The view is fed the batch's events (from any thread) and samples them from its
own: items done/skipped/running/failed of the total, the aggregate rate over
the bytes moved so far, an ETA (bytes still to go in the running items plus the
average item size for each item not started, at that rate), and the slowest
running item (the least done of its total); on a terminal, under that line,
a row per running item (bytes done of its total, its rate, its time).
``json`` mode writes each event as one line instead; ``plain`` writes the line
every few seconds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from drivepipe._sizes import format_rate, format_size
from drivepipe.jobs import BatchReport

LOG_WIDTH = 160
#: running items shown one per row under the batch line
MAX_ROWS = 12


@dataclass
class _Running:
    key: str
    bytes: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)


class BatchView:
    """Counts and rates of a running batch, rendered in ``mode``."""

    def __init__(self, total_items: int, mode: str, stream: IO[str] | None = None) -> None:
        self.total_items = total_items
        self.mode = mode
        self.stream = stream or sys.stderr
        self.counts: dict[str, int] = {}
        self.running: dict[str, _Running] = {}
        self.moved = 0
        self.finished_bytes: list[int] = []
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        width = None if self.stream.isatty() else LOG_WIDTH
        self.console = Console(file=self.stream, width=width)

    # -- events (any thread) --

    def on_event(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            with self._lock:
                self.stream.write(json.dumps(event, sort_keys=True) + "\n")
                self.stream.flush()
        with self._lock:
            self._count(event)

    def _count(self, event: dict[str, Any]) -> None:
        kind, key = event.get("event"), str(event.get("key", ""))
        if kind == "start":
            self.running[key] = _Running(key)
        elif kind == "progress" and key in self.running:
            item = self.running[key]
            self.moved += max(0, int(event.get("bytes", 0)) - item.bytes)
            item.bytes, item.total = int(event.get("bytes", 0)), int(event.get("total", 0))
        elif kind in ("done", "skipped", "failed"):
            item = self.running.pop(key, _Running(key))
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind == "done":
                self.finished_bytes.append(max(item.total, item.bytes))

    # -- rendering --

    def line(self) -> str:
        with self._lock:
            done = sum(self.counts.values())
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = self.moved / elapsed
            parts = [f"{done}/{self.total_items} items", f"{len(self.running)} running",
                     f"{self.counts.get('failed', 0)} failed", format_rate(rate)]
            eta = self._eta(rate, done)
            if eta is not None:
                parts.append(f"ETA {eta:.0f}s")
            slow = self._slowest()
            if slow is not None:
                parts.append(f"slowest {slow}")
        return "  ".join(parts)

    def _eta(self, rate: float, done: int) -> float | None:
        if rate <= 0:
            return None
        left = sum(max(r.total - r.bytes, 0) for r in self.running.values())
        sizes = self.finished_bytes or [r.total for r in self.running.values() if r.total]
        waiting = self.total_items - done - len(self.running)
        if sizes:
            left += waiting * sum(sizes) // len(sizes)
        return left / rate

    def _slowest(self) -> str | None:
        known = [r for r in self.running.values() if r.total]
        if not known:
            return None
        worst = min(known, key=lambda r: r.bytes / r.total)
        return f"{worst.key} ({100 * worst.bytes // worst.total}%)"

    def render(self) -> RenderableType:
        """The batch line, then one row per running item (rich mode)."""
        with self._lock:
            running = sorted(self.running.values(), key=lambda r: r.started)
        if not running:
            return Text(self.line())
        table = Table(show_edge=False, pad_edge=False, box=None)
        for name, justify in (("item", "left"), ("done", "right"), ("of", "right"),
                              ("", "right"), ("rate", "right"), ("time", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        now = time.monotonic()
        for r in running[:MAX_ROWS]:
            seconds = max(now - r.started, 1e-9)
            share = f"{100 * r.bytes // r.total}%" if r.total else ""
            table.add_row(r.key, format_size(r.bytes), format_size(r.total) if r.total else "",
                          share, format_rate(r.bytes / seconds), f"{seconds:.0f}s")
        if len(running) > MAX_ROWS:
            table.add_row(f"... {len(running) - MAX_ROWS} more", "", "", "", "", "")
        return Group(Text(self.line()), table)

    def __enter__(self) -> BatchView:
        interval = {"rich": 0.25, "plain": 5.0}.get(self.mode)
        if interval is None:
            return self
        if self.mode == "rich":
            self._live = Live(self.render(), console=self.console, transient=True)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True,
                                        name="drivepipe-batch-ui")
        self._thread.start()
        return self

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self._live is not None:
                self._live.update(self.render())
            else:
                self.console.print(self.line(), highlight=False)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._live is not None:
            self._live.__exit__(None, None, None)


def report_table(report: BatchReport) -> Table:
    """One row per item: status, what, result, digest, time, error."""
    table = Table(title=None, show_edge=False, pad_edge=False)
    for name, justify in (("key", "left"), ("status", "left"), ("result", "left"),
                          ("xxh128", "left"), ("size", "right"), ("time", "right"),
                          ("error", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.results:
        table.add_row(
            r.key, r.status, r.uuid or r.output or "", r.xxh128 or "",
            format_size(r.size) if r.size is not None else "", f"{r.seconds:.1f}s",
            r.error or "",
        )
    return table


def closing_line(report: BatchReport) -> str:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report.counts.items()))
    return f"batch: {len(report.results)} items in {report.seconds:.1f}s: {counts}"

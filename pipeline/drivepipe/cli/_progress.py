"""Progress reporting for the CLI: rich live view, plain lines, JSON lines, none.

In: a :class:`RunStats` that the runner fills while bytes move.  Out: on
stderr only, a live view (rich), a line every few seconds (plain) or one JSON
object per line (json: ``{"event": "progress", ...}`` while running, then one
``{"event": "summary", ...}``), and after every command a final summary.
Refused: unknown ``--progress`` modes (a UsageError).

The library never prints; the runner only fills counters.  A reporter samples
them from its own thread, so the byte-moving loops pay nothing for the display.
What the view shows, and why:

- one row per part (source, stages, sink) with its throughput over the time it
  was busy, its share of the wall time, and how full the queue in front of it
  is - a stage whose input queue is always empty waits for the one before it,
  a stage whose input queue is always full is the one holding the others up;
- the bottleneck (the part busy the longest) marked;
- bytes done of the total, split into data and zeros (holes);
- an ETA on the bytes that cost time: data bytes still to go at the rate data
  has moved so far (holes are skipped by readers and writers, so counting them
  at the data rate would make a sparse image's ETA far too long);
- a phase line while a counting pass runs before streaming;
- counters a part adds to ``StageStats.extra`` (chunks done, in flight, retried).

Stats never hold credentials (only sizes, times and counters), so nothing
printed here can leak one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # rich is imported only when a live view or a table is drawn
    from rich.console import Console, JustifyMethod, RenderableType
    from rich.live import Live
    from rich.table import Table

from drivepipe._errors import UsageError
from drivepipe._sizes import format_rate, format_size
from drivepipe._stats import RunStats, StageStats

Mode = Literal["auto", "rich", "plain", "json", "none"]
MODES: tuple[str, ...] = ("auto", "rich", "plain", "json", "none")

BOTTLENECK_MARK = "◀ bottleneck"
LOG_WIDTH = 160


def resolve_mode(mode: str, stream: IO[str] | None = None) -> str:
    if mode not in MODES:
        raise UsageError(f"--progress must be one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = stream or sys.stderr
    return "rich" if stream.isatty() else "none"


def eta_seconds(stats: RunStats) -> float | None:
    """Seconds left, estimated on the bytes that cost time (data, not holes).

    The time spent so far per data byte (holes along the way included) times the
    data bytes still to come.  Those are known when the input said how many of
    its bytes are data; otherwise they are guessed from the data share so far.
    None until some data has moved, and once everything has.
    """
    last = stats.stages[-1] if stats.stages else None
    if last is None or stats.total <= 0:
        return None
    done = last.bytes
    data_done = last.data_bytes
    if done <= 0 or done >= stats.total or data_done <= 0:
        return None
    data_left: float
    if stats.data_total is not None:
        data_left = max(stats.data_total - data_done, 0)
    else:
        data_left = (stats.total - done) * data_done / done
    return stats.transfer_elapsed * data_left / data_done


def _marked(stats: RunStats) -> StageStats | None:
    """The bottleneck worth marking: only when there is more than one part."""
    return stats.bottleneck() if len(stats.stages) > 1 else None


def queue_text(stats: RunStats, stage: StageStats) -> str:
    """How full the queue in front of ``stage`` is (now, and on average), or ''."""
    if stage.upstream is None or stage.upstream.kind != "queue":
        return ""
    avg = stats.queue_fill_avg
    avg_text = f"avg {100 * avg:.0f}%" if avg is not None else ""
    if stats.queue_fill is None:
        return avg_text
    fill, depth = stats.queue_fill
    now_text = f"{fill}/{depth}"
    return f"{now_text} {avg_text}".strip()


def extra_text(stage: StageStats) -> str:
    """A part's own counters (``chunks_done=12 in_flight=4``) for the notes column."""
    return " ".join(f"{key}={_short(key, value)}" for key, value in stage.extra.items())


def _short(key: str, value: Any) -> str:
    if key.endswith("_bytes") and isinstance(value, int):
        return format_size(value).replace(" ", "")
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("stage", "left"), ("bytes", "right"), ("data", "right"), ("holes", "right"),
    ("rate", "right"), ("time", "right"), ("queue in", "right"), ("", "left"),
)
#: below this many columns the table drops "holes" (bytes - data) and folds the
#: queue into the notes, so that every row fits in 80 columns
WIDE = 100
#: a part busy for less than this has no meaningful rate (a reader that skipped a
#: 1 TiB hole in a millisecond is not "1,000 TB/s")
_MIN_BUSY = 0.01


def rate_text(st: StageStats) -> str:
    return format_rate(st.data_rate) if st.busy >= _MIN_BUSY else "-"


def stage_table(stats: RunStats, width: int = LOG_WIDTH) -> Table:
    from rich.table import Table  # noqa: PLC0415 - see the imports

    """One row per part: bytes, data/holes, throughput, share of wall time, queue."""
    wide = width >= WIDE
    table = Table(box=None, pad_edge=False, show_edge=False)
    columns = _COLUMNS if wide else tuple(c for c in _COLUMNS if c[0] not in ("holes",
                                                                              "queue in"))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    neck = _marked(stats)
    wall = max(stats.transfer_elapsed, 1e-9)  # a counting pass is not any stage's time
    for st in stats.stages:
        mark = (BOTTLENECK_MARK if wide else "◀") if st is neck else ""
        queue = queue_text(stats, st)
        folded = ""
        if queue and not wide:  # "q 16/16" while running, "q ~64%" (the average) after
            folded = "q " + (queue.split()[0] if stats.queue_fill else queue.replace("avg ", "~"))
        notes = " ".join(t for t in (mark, folded, extra_text(st)) if t)
        cells = [st.name, format_size(st.bytes), format_size(st.data_bytes)]
        if wide:
            cells.append(format_size(st.hole_bytes))
        cells += [rate_text(st), f"{100 * st.busy / wall:.0f}%"]
        if wide:
            cells.append(queue)
        cells.append(notes)
        table.add_row(*cells, style="bold" if st is neck else None)
    return table


def phase_line(stats: RunStats) -> str | None:
    """``gzip: counting 1.2 GiB of 3.0 GiB (40%)`` while a pre-pass runs, else None."""
    if stats.phase == "transfer":
        return None
    if stats.phase == "opening":
        return f"{stats.title}: opening"
    notes = []
    if stats.phase_total:
        notes.append(f"{100 * stats.phase_done / stats.phase_total:.0f}%")
    if stats.phase_done:
        notes.append(format_rate(stats.phase_rate))
    of = f" of {format_size(stats.phase_total)}" if stats.phase_total else ""
    tail = f" ({', '.join(notes)})" if notes else ""
    return f"{stats.title}: {stats.phase} {format_size(stats.phase_done)}{of}{tail}"


def headline(stats: RunStats) -> str:
    """One line: the phase, or bytes done of total, data/zeros, rate, ETA, queue."""
    phase = phase_line(stats)
    if phase is not None:
        return phase
    return f"{progress_text(stats)}{detail_text(stats)}"


def progress_text(stats: RunStats, title: bool = True) -> str:
    """``upload x: 1.0 GiB of 4.0 GiB (25%), 120 MB/s, ETA 30s`` (without ``upload x: ``
    when ``title`` is False)."""
    if not stats.stages and not stats.total:
        return f"{stats.title}: opening"
    total = stats.total
    done = stats.done
    pct = 100 * done / total if total else 100.0
    elapsed = stats.transfer_elapsed
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = eta_seconds(stats)
    eta_text = f", ETA {format_duration(eta)}" if eta is not None else ""
    lead = f"{stats.title}: " if title else ""
    return (f"{lead}{format_size(done)} of {format_size(total)} ({pct:.0f}%), "
            f"{format_rate(rate)}{eta_text}")


def detail_text(stats: RunStats, sep: str = " ") -> str:
    """``[data 1.0 GiB, zeros 3.0 GiB], reader 40 MiB ahead, queue 16/16``"""
    last = stats.stages[-1] if stats.stages else None
    if last is None:
        return ""
    parts = [f"[data {format_size(last.data_bytes)}, zeros {format_size(last.hole_bytes)}]"]
    first = stats.stages[0]
    ahead = first.bytes - last.bytes
    if first is not last and ahead > 0 and last.bytes < stats.total:
        # what is read but not yet sent (queued, in buffers): shown as what it is
        parts.append(f"reader {format_size(ahead)} ahead")
    if stats.queue_fill is not None:
        parts.append(f"queue {stats.queue_fill[0]}/{stats.queue_fill[1]}")
    return sep + ", ".join(parts)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def summary_line(stats: RunStats, *, ok: bool) -> str:
    """``checksum x.img done: 8.0 GiB in 2.10s (4,090 MB/s), bottleneck xxh3 (61%)``."""
    state = "done" if ok else "failed"
    wall = stats.elapsed
    rate = stats.done / wall if wall > 0 else 0.0
    line = (f"{stats.title} {state}: {format_size(stats.done)} in {wall:.2f}s "
            f"({format_rate(rate)})")
    neck = _marked(stats)
    streaming = stats.transfer_elapsed
    if neck is not None and streaming > 0:
        line += f", bottleneck {neck.name} ({100 * neck.busy / streaming:.0f}% of the time)"
    return line


def plain_stage_line(stats: RunStats, st: StageStats) -> str:
    wall = max(stats.transfer_elapsed, 1e-9)
    parts = [f"  {st.name}: {format_size(st.bytes)} at {rate_text(st)}",
             f"busy {st.busy:.2f}s ({100 * st.busy / wall:.0f}%)"]
    queue = queue_text(stats, st)
    if queue:
        parts.append(f"queue in {queue}")
    extra = extra_text(st)
    if extra:
        parts.append(extra)
    if st is _marked(stats):
        parts.append("bottleneck")
    return ", ".join(parts)


def render(stats: RunStats, width: int = LOG_WIDTH) -> RenderableType:
    from rich.console import Group  # noqa: PLC0415 - see the imports
    from rich.progress_bar import ProgressBar  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    """The live view: headline, a bar of bytes (or of the phase), the stage table.

    Under :data:`WIDE` columns the headline folds into two lines and the table
    drops its widest columns, so nothing wraps at 80 columns."""
    bar_width = max(10, min(50, width - 2))
    if stats.phase != "transfer":
        bar = ProgressBar(total=max(stats.phase_total, 1), completed=stats.phase_done,
                          width=bar_width)
        head: list[RenderableType] = [Text(headline(stats), overflow="ellipsis", no_wrap=True)]
    else:
        bar = ProgressBar(total=max(stats.total, 1), completed=stats.done, width=bar_width)
        text = headline(stats)
        if len(text) <= width:
            head = [Text(text)]
        else:  # fold: the title (cut at its start: the file name is at the end), then
            # the numbers, then the details, each on its own line
            title = stats.title + ":"
            if len(title) > width:
                title = "…" + title[len(title) - width + 1 :]
            lines = [progress_text(stats, title=False), detail_text(stats).strip()]
            if len(progress_text(stats)) <= width:
                lines = [progress_text(stats), lines[1]]
            else:
                lines.insert(0, title)
            head = [Text(line, overflow="ellipsis", no_wrap=True) for line in lines]
    # a ProgressBar ends without a newline: the empty Text ends its line, so the
    # table's header starts on a line of its own
    return Group(*head, bar, Text(""), stage_table(stats, width))


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
        self._emit_lock = threading.Lock()
        self._started = False
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        """The rich console on the stream (made when first drawn on)."""
        if self._console is None:
            from rich.console import Console  # noqa: PLC0415 - see the imports

            # Not a terminal (a log file, a pipe): wide enough that rows never wrap.
            width = None if self.stream.isatty() else LOG_WIDTH
            self._console = Console(file=self.stream, stderr=self.stream is sys.stderr,
                                    width=width)
        return self._console

    def __enter__(self) -> Reporter:
        if self.mode == "json":
            self.stats.on_phase_change = self._phase_changed
        if self.mode == "rich":
            from rich.live import Live  # noqa: PLC0415 - see the imports

            self._live = Live(
                render(self.stats, self.console.width), console=self.console,
                refresh_per_second=4, transient=True,
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
        if self.stats.on_phase_change == self._phase_changed:
            self.stats.on_phase_change = None
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
        if self.stats.finished is None:
            self.stats.finished = time.perf_counter()
        self.summary(ok=exc is None)

    def _loop(self) -> None:
        emit: Callable[[], None] = {
            "rich": self._tick_rich,
            "plain": self._tick_plain,
            "json": self._tick_json,
        }[self.mode]
        while not self._stop.wait(self.interval):
            emit()

    def _tick_rich(self) -> None:
        if self._live is not None:
            self._live.update(render(self.stats, self.console.width))

    def _tick_plain(self) -> None:
        print(headline(self.stats), file=self.stream, flush=True)

    def _tick_json(self) -> None:
        self._emit_json({"event": "progress", **self._json_state()})

    def _phase_changed(self, phase: str) -> None:
        self._emit_json({"event": "phase", **self._json_state()})

    def _start_event(self) -> dict[str, Any]:
        st = self.stats
        return {"event": "start", "title": st.title, "total": st.total,
                "chain": list(st.chain), "phases": list(st.phases), "phase": st.phase}

    def _json_state(self) -> dict[str, Any]:
        eta = eta_seconds(self.stats)
        return {**self.stats.as_dict(), "eta_s": None if eta is None else round(eta, 1)}

    def _emit_json(self, event: dict[str, Any]) -> None:
        """One line per event; the first one is always ``start`` (see docs/progress-json.md)."""
        with self._emit_lock:
            if not self._started:
                self._started = True
                print(json.dumps(self._start_event()), file=self.stream, flush=True)
            print(json.dumps(event), file=self.stream, flush=True)

    def summary(self, *, ok: bool) -> None:
        """The final table (rich/plain) or final object (json)."""
        if self.mode == "none":
            return
        if self.mode == "json":
            self._emit_json({"event": "summary", "ok": ok, **self._json_state()})
            return
        line = summary_line(self.stats, ok=ok)
        if self.mode == "plain":
            print(line, file=self.stream, flush=True)
            for st in self.stats.stages:
                print(plain_stage_line(self.stats, st), file=self.stream, flush=True)
            return
        self.console.print(line)
        self.console.print(stage_table(self.stats, self.console.width))


def now() -> float:
    return time.perf_counter()

"""Per-stage counters that a live display and the final summary read.

Each part of a pipeline gets a :class:`StageStats`.  The runner's meters add
bytes and the seconds spent *inside* each part's iterator, including the
parts upstream in the same thread (``inclusive``); ``busy`` subtracts the
upstream's share, so the busiest stage is the bottleneck.  Writers are one
thread per counter; readers (the display) only read, so no locks are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class StageStats:
    name: str
    kind: str = "stage"  # source | stage | sink
    bytes: int = 0
    data_bytes: int = 0
    hole_bytes: int = 0
    #: seconds spent in this part's iterator, including upstream parts in the same thread
    inclusive: float = 0.0
    #: the part whose time ``inclusive`` contains; None if it pulls from a queue
    upstream: StageStats | None = None
    #: seconds this part spent waiting on a queue for input
    waiting: float = 0.0
    #: set by sinks (and the runner) for parts whose time is wall time minus waits
    started: float | None = None
    finished: float | None = None
    #: free-form counters a part wants shown (chunks in flight, retries, ...)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def busy(self) -> float:
        """Seconds of work done by this part alone."""
        if self.started is not None:
            end = self.finished if self.finished is not None else time.perf_counter()
            own = (end - self.started) - self.waiting
            if self.upstream is not None:
                own -= self.upstream.inclusive
            return max(own, 0.0)
        own = self.inclusive
        if self.upstream is not None:
            own -= self.upstream.inclusive
        return max(own - self.waiting, 0.0)

    @property
    def data_rate(self) -> float:
        """Bytes per busy second (all bytes, holes included)."""
        busy = self.busy
        return self.bytes / busy if busy > 0 else 0.0

    def count(self, length: int, hole: bool) -> None:
        """Add one extent's bytes to the data or the hole side."""
        self.bytes += length
        if hole:
            self.hole_bytes += length
        else:
            self.data_bytes += length

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "bytes": self.bytes,
            "data_bytes": self.data_bytes,
            "hole_bytes": self.hole_bytes,
            "busy_s": round(self.busy, 6),
            "rate_bps": round(self.data_rate, 1),
            **self.extra,
        }


@dataclass(eq=False)
class RunStats:
    """The counters of one command: a phase name, a total, and its stages."""

    title: str
    total: int = 0
    #: "opening" until the runner starts streaming ("transfer"); "counting",
    #: "spooling", "check", "verify" in between where a command has them
    phase: str = "opening"
    stages: list[StageStats] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    #: filled by the runner when stages overlap: (current depth, max depth)
    queue_fill: tuple[int, int] | None = None
    #: done/total of a phase that runs before streaming (counting pass, spooling)
    phase_done: int = 0
    phase_total: int = 0
    #: when the current pre-streaming phase started, and the phases seen so far
    phase_started: float = field(default_factory=time.perf_counter)
    phases: list[str] = field(default_factory=list)
    #: the input's formats from the outside in, as they are detected
    chain: list[str] = field(default_factory=list)
    #: called (from the thread that changed it) with the new phase name
    on_phase_change: Callable[[str], None] | None = None
    result: dict[str, Any] = field(default_factory=dict)
    #: raw bytes that are data (not holes), when the input knows it cheaply
    data_total: int | None = None
    #: when the first byte could flow (after any counting pass); set by the runner
    transfer_started: float | None = None
    #: sum and count of the queue depths the consumer saw, for the average fill
    queue_fill_sum: int = 0
    queue_fill_samples: int = 0
    queue_depth: int = 0

    def note_queue(self, fill: int, depth: int) -> None:
        """Record the queue's depth as the consumer sees it (one writer thread)."""
        self.queue_fill = (fill, depth)
        self.queue_depth = depth
        self.queue_fill_sum += fill
        self.queue_fill_samples += 1

    @property
    def queue_fill_avg(self) -> float | None:
        """Average share of the queue that was full (0..1), or None without a queue."""
        if not self.queue_fill_samples or not self.queue_depth:
            return None
        return self.queue_fill_sum / self.queue_fill_samples / self.queue_depth

    @property
    def transfer_elapsed(self) -> float:
        """Seconds since the stream started (the elapsed time without counting passes)."""
        start = self.transfer_started if self.transfer_started is not None else self.started
        end = self.finished if self.finished is not None else time.perf_counter()
        return max(end - start, 0.0)

    def set_phase(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Enter (or report progress in) a phase that runs before streaming."""
        changed = phase != self.phase
        if changed:
            self.phase = phase
            self.phase_started = time.perf_counter()
            if phase != "transfer":
                self.phases.append(phase)
        self.phase_done = done
        self.phase_total = total
        if changed and self.on_phase_change is not None:
            self.on_phase_change(phase)

    @property
    def phase_rate(self) -> float:
        """Bytes a second of the current pre-streaming phase."""
        elapsed = time.perf_counter() - self.phase_started
        return self.phase_done / elapsed if elapsed > 0 else 0.0

    def add(self, name: str, kind: str = "stage") -> StageStats:
        stage = StageStats(name, kind)
        self.stages.append(stage)
        return stage

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.perf_counter()
        return end - self.started

    @property
    def done(self) -> int:
        """Bytes that reached the last part."""
        return self.stages[-1].bytes if self.stages else 0

    def bottleneck(self) -> StageStats | None:
        """The part with the most busy time, once any time has been spent."""
        timed = [s for s in self.stages if s.busy > 0]
        return max(timed, key=lambda s: s.busy) if timed else None

    def as_dict(self) -> dict[str, Any]:
        neck = self.bottleneck()
        return {
            "title": self.title,
            "phase": self.phase,
            "phases": list(self.phases),
            "phase_done": self.phase_done,
            "phase_total": self.phase_total,
            "chain": list(self.chain),
            "total": self.total,
            "done": self.done,
            "elapsed_s": round(self.elapsed, 6),
            "bottleneck": neck.name if neck else None,
            "data_total": self.data_total,
            "queue_fill_avg": _rounded(self.queue_fill_avg),
            "stages": [s.as_dict() for s in self.stages],
            **({"result": self.result} if self.result else {}),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)

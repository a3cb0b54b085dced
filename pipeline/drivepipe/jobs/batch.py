"""A batch of transfers, resumable as a whole, whatever runs the items.

In: a :class:`~drivepipe.jobs.plan.Plan`, the :class:`Settings`, a state file
path and an :class:`Executor` (threads here, or a Dask cluster).  Each item
goes to the executor with its previous state record; the executor runs
:func:`attempt_item` wherever it places the item and hands the results back
to this process, which alone writes the state file and emits the ``done``,
``skipped`` and ``failed`` events.

Out: a :class:`BatchReport` in plan order.  One failed item never stops the
others; an item the executor did not run (the batch was interrupted: Ctrl-C
ends :func:`run_batch` with ``report.interrupted``) is reported as
``not-run``.  One batch at a time per state file (a lock beside it).  A rerun
of the same plan with the same state file skips what finished (checked again,
see :mod:`.transfer`), resumes what was interrupted (the upload and download
journals) and retries what failed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from drivepipe.jobs.plan import Item, Plan
from drivepipe.jobs.state import StateFile, default_state_path
from drivepipe.jobs.transfer import Access, Event, ItemResult, OnEvent, Settings, execute_item
from drivepipe.transport.retry import RetryPolicy

OnResult = Callable[[ItemResult], None]
#: seconds at most between two attempts of an item
ITEM_RETRY_CAP = 300.0


@dataclass(frozen=True)
class Task:
    """What an executor runs: the item, its previous record, and the retry policy."""

    item: Item
    previous: dict[str, Any] | None
    retries: int = 1
    retry_delay: float = 1.0


class Executor(Protocol):
    """Runs tasks and calls ``on_result`` (in this process) once per task it ran.

    ``on_event`` gets the items' ``start``/``progress`` events.  ``run`` returns
    when every task has a result, or raises KeyboardInterrupt after it stopped.
    """

    def run(self, tasks: Sequence[Task], settings: Settings, on_event: OnEvent,
            on_result: OnResult) -> None: ...


def attempt_item(
    task: Task, settings: Settings, on_event: OnEvent | None = None,
    access: Access | None = None,
) -> ItemResult:
    """:func:`execute_item`, again after a failure on the network side, ``retries`` times,
    waiting as the one retry policy says (from ``retry_delay``, doubling, with jitter)."""
    policy = RetryPolicy(retries=task.retries, base=task.retry_delay,
                         cap=max(task.retry_delay, ITEM_RETRY_CAP))
    attempts = 0
    while True:
        attempts += 1
        result = execute_item(task.item, settings, task.previous, on_event, access)
        result.attempts = attempts
        if not result.retryable or attempts > policy.retries:
            return result
        time.sleep(policy.delay(attempts))


@dataclass
class BatchReport:
    results: list[ItemResult]
    seconds: float = 0.0
    state_path: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    #: stopped by Ctrl-C before every item ran
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.ok for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "state": self.state_path,
                "interrupted": self.interrupted, "counts": self.counts,
                "items": [r.as_dict() for r in self.results]}


def record_of(result: ItemResult, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The state file's record of a result (a skipped item stays ``done``).

    A failure never erases a ``done`` record (a drive that may still be good, the
    check that failed on the network): it is kept, with the failure's line in
    ``last_error``, and checked again by the next run.
    """
    if not result.ok and previous is not None and previous.get("status") == "done":
        return {**previous, "last_error": result.error}
    data = result.as_dict()
    data["status"] = "done" if result.ok else "failed"
    for name in ("notes", "host", "worker", "bytes", "resumed", "key", "retryable"):
        data.pop(name, None)
    return data


def journal_dir_for(state_path: str) -> str:
    return state_path + ".journals"


def run_batch(
    plan: Plan,
    executor: Executor,
    settings: Settings | None = None,
    *,
    state_path: str | None = None,
    on_event: OnEvent | None = None,
    retries: int = 1,
    retry_delay: float = 1.0,
) -> BatchReport:
    """Run (or continue) the batch; see the module docstring."""
    state_path = os.path.abspath(state_path or default_state_path(plan.path))
    settings = settings or Settings()
    if not settings.journal_dir:
        from dataclasses import replace  # noqa: PLC0415

        settings = replace(settings, journal_dir=journal_dir_for(state_path))
    emit = on_event or (lambda event: None)
    results: dict[str, ItemResult] = {}
    lock = threading.Lock()

    def on_result(result: ItemResult) -> None:
        with lock:
            state.update(result.key, record_of(result, state.get(result.key)))
            results[result.key] = result
        event: Event = {"event": result.status, "key": result.key, "op": result.op,
                        "seconds": result.seconds, "xxh128": result.xxh128,
                        "uuid": result.uuid, "output": result.output, "host": result.host}
        if result.worker:
            event["worker"] = result.worker
        if result.error:
            event["error"] = result.error
        emit(event)

    started = time.monotonic()
    interrupted = False
    with StateFile(state_path) as state:
        tasks = [Task(item, state.get(item.key), retries, retry_delay) for item in plan.items]
        try:
            executor.run(tasks, settings, emit, on_result)
        except KeyboardInterrupt:
            interrupted = True  # the items not run are reported as such; a rerun continues
    report = _report(plan, results, time.monotonic() - started, state_path)
    report.interrupted = interrupted
    return report


def _report(
    plan: Plan, results: dict[str, ItemResult], seconds: float, state_path: str
) -> BatchReport:
    ordered = [results.get(item.key) or ItemResult(item.key, item.op, item.source,
                                                   item.target, "not-run")
               for item in plan.items]
    counts: dict[str, int] = {}
    for r in ordered:
        counts[r.status] = counts.get(r.status, 0) + 1
    return BatchReport(ordered, seconds, state_path, counts)

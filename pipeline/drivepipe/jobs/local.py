"""Run a batch on this machine: ``jobs`` worker threads, a connection and a rate budget.

The budget is the total number of connections the batch may hold at once
(``connections``).  A direct upload holds one; a chunked upload or a
download gets a share, ``total // min(jobs, items not yet finished)``, at
least one, never more than is free: so N transfers do not starve each other,
and the last items of a batch get the connections the finished ones gave
back.  An item waits until at least one connection is free.  The rate budget
(``limit_rate``, bytes a second for the whole batch) is shared the same way:
each item gets ``limit_rate // min(jobs, items not yet finished)`` of what is
free, spread over its connections (libcurl's MAX_SEND/RECV_SPEED per handle),
so the running items together never pass it.

The endpoint and the credentials are resolved once, before the first item
(a password prompt happens once), and shared by the items; each item opens
its own handles.  Worker threads are daemons: a second Ctrl-C leaves at once,
the journals keep what the running items had done.  The first Ctrl-C starts
no new item and waits for the running ones.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import replace

from drivepipe._errors import UsageError
from drivepipe.jobs.batch import OnResult, Task, attempt_item
from drivepipe.jobs.transfer import Access, ItemResult, OnEvent, Settings


class Budget:
    """A pool of ``total`` units (connections, bytes a second) handed out in shares."""

    def __init__(self, total: int, jobs: int, what: str = "the connections") -> None:
        if total < 1:
            raise UsageError(f"{what} must be at least 1")
        self.total = total
        self.jobs = jobs
        self.free = total
        self._cond = threading.Condition()

    def acquire(self, want: int | None, unfinished: int) -> int:
        """Take ``want`` units (None: a fair share); blocks until one is free."""
        with self._cond:
            self._cond.wait_for(lambda: self.free > 0)
            share = max(1, self.total // max(1, min(self.jobs, unfinished)))
            grant = min(self.free, want if want is not None else share)
            self.free -= grant
            return grant

    def release(self, count: int) -> None:
        with self._cond:
            self.free += count
            self._cond.notify_all()


#: the connection budget's name from before the rate budget shared its class
ConnectionBudget = Budget


class LocalExecutor:
    """Threads on this machine; ``connections`` total (default 4 per job), and
    ``limit_rate`` bytes a second in total when given."""

    def __init__(self, jobs: int = 4, connections: int | None = None,
                 access: Access | None = None, limit_rate: int = 0) -> None:
        if jobs < 1:
            raise UsageError("the number of jobs must be at least 1")
        self.jobs = jobs
        self.budget = Budget(connections or 4 * jobs, jobs)
        self.rates = Budget(limit_rate, jobs, "the rate limit") if limit_rate else None
        self.access = access
        #: the most connections held at once (for tests and the report)
        self.peak = 0

    def run(self, tasks: Sequence[Task], settings: Settings, on_event: OnEvent,
            on_result: OnResult) -> None:
        if not tasks:
            return
        access = self.access or Access.resolve(settings)
        todo: queue.SimpleQueue[Task] = queue.SimpleQueue()
        for task in tasks:
            todo.put(task)
        results: queue.SimpleQueue[ItemResult] = queue.SimpleQueue()
        stop = threading.Event()
        unfinished = [len(tasks)]
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                try:
                    task = todo.get_nowait()
                except queue.Empty:
                    return
                one = not (task.item.chunked or task.item.op == "download")
                with lock:
                    left = unfinished[0]
                grant = self.budget.acquire(1 if one else None, left)
                rate = self.rates.acquire(None, left) if self.rates else 0
                with lock:
                    self.peak = max(self.peak, self.budget.total - self.budget.free)
                try:
                    mine = replace(settings, connections=grant, limit_rate=rate)
                    results.put(attempt_item(task, mine, on_event, access))
                finally:
                    self.budget.release(grant)
                    if self.rates:
                        self.rates.release(rate)
                    with lock:
                        unfinished[0] -= 1

        threads = [threading.Thread(target=worker, name=f"batch-{n}", daemon=True)
                   for n in range(min(self.jobs, len(tasks)))]
        for thread in threads:
            thread.start()
        self._collect(threads, results, stop, on_result)

    def _collect(self, threads: list[threading.Thread], results: queue.SimpleQueue[ItemResult],
                 stop: threading.Event, on_result: OnResult) -> None:
        """Hand results over in this thread (the state file has one writer)."""
        try:
            while any(t.is_alive() for t in threads) or not results.empty():
                try:
                    result = results.get(timeout=0.1)
                except queue.Empty:
                    continue
                on_result(result)
        except KeyboardInterrupt:
            stop.set()  # no new items; the running ones finish (a second Ctrl-C leaves)
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
            while not results.empty():
                on_result(results.get())
            raise

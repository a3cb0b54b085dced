"""Run a batch on a Dask distributed cluster (``pip install drivepipe[dask]``).

(Named ``dask_engine``, not ``dask``, so that it never shadows the package.)

One task per item, submitted with the item's ``resources`` and ``workers``
from the plan, so an item whose image lives on a host runs on a worker there.
A worker lost mid-item makes the scheduler run the task again (on another
worker, or the restarted one); the item then resumes from its journal (a
chunked upload's journal, a download's ``.part`` journal), which must be on
a path that worker sees.  ``retries`` re-runs a task that raised (the item
function catches drivepipe's errors itself, so that is a bug or a lost
process).

Results come back to the submitting process through the futures; ``start``
and ``progress`` events through the worker's structured events
(``log_event`` on the worker, ``subscribe_topic`` here), one topic per run.

Credentials never travel: a task gets the item and the :class:`Settings`
(endpoint URLs, user name, TLS file paths: no password), and the worker reads
the password from its environment or config files, as the CLI does.  Task keys
are ``drivepipe-<item key>-<run id>`` (the item key is a name from the plan or
a hash), which is what the dashboard shows.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from drivepipe._errors import UsageError
from drivepipe.jobs.batch import OnResult, Task, attempt_item
from drivepipe.jobs.transfer import Access, ItemResult, OnEvent, Settings

_ACCESS: dict[Settings, Access] = {}
_ACCESS_LOCK = threading.Lock()


def _distributed() -> Any:
    try:
        import distributed  # noqa: PLC0415 - optional extra, loaded when asked for
    except ImportError as exc:
        raise UsageError("the Dask engine needs Dask: pip install 'drivepipe[dask]'") from exc
    return distributed


def _worker_access(settings: Settings) -> Access:
    """Endpoint and credentials of this worker process, resolved once per settings."""
    key = replace(settings, connections=0, journal_dir="", progress_interval=0)
    with _ACCESS_LOCK:
        if key not in _ACCESS:
            _ACCESS[key] = Access.resolve(settings)
        return _ACCESS[key]


def run_on_worker(task: Task, settings: Settings, topic: str) -> ItemResult:
    """The task body: run the item here, its events published under ``topic``."""
    worker = _distributed().get_worker()

    def emit(event: dict[str, Any]) -> None:
        worker.log_event(topic, event)

    try:
        access = _worker_access(settings)
    except Exception:  # the item reports the same error line itself, as failed
        access = None
    result = attempt_item(task, settings, emit, access)
    result.worker = str(worker.address)
    return result


class DaskExecutor:
    """Runs the items on the cluster at ``scheduler`` (or an existing ``client``)."""

    def __init__(self, scheduler: str | None = None, *, client: Any = None,
                 retries: int = 2, connections: int | None = None) -> None:
        if scheduler is None and client is None:
            raise UsageError("the Dask engine needs a scheduler address (tcp://HOST:8786)")
        self.scheduler = scheduler
        self.client = client
        self.retries = retries
        #: connections of each item (default: the settings' own)
        self.connections = connections
        #: the task keys of the last run (what the scheduler and dashboard saw)
        self.keys: list[str] = []

    def run(self, tasks: Sequence[Task], settings: Settings, on_event: OnEvent,
            on_result: OnResult) -> None:
        if not tasks:
            return
        distributed = _distributed()
        client = self.client or distributed.Client(self.scheduler)
        if self.connections:
            settings = replace(settings, connections=self.connections)
        run_id = uuid.uuid4().hex[:12]
        topic = f"drivepipe-batch-{run_id}"
        client.subscribe_topic(topic, lambda event: on_event(event[1]))
        try:
            futures = {self._submit(client, task, settings, topic, run_id): task
                       for task in tasks}
            for future in distributed.as_completed(futures):
                on_result(self._result(future, futures[future]))
        finally:
            client.unsubscribe_topic(topic)
            if self.client is None:
                client.close()

    def _submit(self, client: Any, task: Task, settings: Settings, topic: str,
                run_id: str) -> Any:
        key = f"drivepipe-{task.item.key}-{run_id}"
        self.keys.append(key)
        return client.submit(
            run_on_worker, task, settings, topic, key=key, pure=False,
            resources=dict(task.item.resources) or None,
            workers=list(task.item.workers) or None,
            retries=self.retries,
        )

    @staticmethod
    def _result(future: Any, task: Task) -> ItemResult:
        try:
            result = future.result()
        except Exception as exc:  # the task itself died (workers lost too often, a bug)
            item = task.item
            text = " ".join(str(exc).split()) or type(exc).__name__
            return ItemResult(item.key, item.op, item.source, item.target, "failed",
                              error=f"the Dask task failed: {type(exc).__name__}: {text}")
        if not isinstance(result, ItemResult):
            raise TypeError(f"a batch task returned {type(result).__name__}")
        return result

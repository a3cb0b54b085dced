"""Batches of transfers: a plan, a state file, an executor (threads or Dask).

``drivepipe.batch(plan, jobs=4)`` runs a plan on this machine;
``executor=DaskExecutor("tcp://HOST:8786")`` runs it on a Dask cluster.  The
library never prints: ``on_event`` gets one dict per event.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from drivepipe.jobs.batch import BatchReport, Executor, Task, attempt_item, run_batch
from drivepipe.jobs.local import Budget, ConnectionBudget, LocalExecutor
from drivepipe.jobs.plan import Item, Plan, PlanError, item_key, load_plan, parse_plan
from drivepipe.jobs.state import StateFile, default_state_path
from drivepipe.jobs.transfer import Access, Event, ItemResult, OnEvent, Settings, execute_item

PlanLike = str | os.PathLike[str] | Plan | Iterable[Mapping[str, Any]]


def as_plan(plan: PlanLike) -> Plan:
    """A plan file path, a :class:`Plan`, or item dicts (paths relative to the cwd)."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, str | os.PathLike):
        return load_plan(os.fspath(plan))
    return Plan(parse_plan(plan, where="plan"))


def batch(
    plan: PlanLike,
    *,
    jobs: int = 4,
    executor: Executor | None = None,
    state: str | None = None,
    settings: Settings | None = None,
    connections: int | None = None,
    limit_rate: int = 0,
    retries: int = 1,
    on_event: OnEvent | None = None,
) -> BatchReport:
    """Run (or continue) a batch; ``report.ok`` says whether every item succeeded.

    ``state`` defaults to ``PLAN.state.json`` beside a plan file (required for a
    plan given as dicts).  ``executor`` defaults to :class:`LocalExecutor` with
    ``jobs`` threads sharing ``connections`` (default 4 per job) and ``limit_rate``
    bytes a second (0: no cap).
    """
    resolved = as_plan(plan)
    runner = executor or LocalExecutor(jobs, connections, limit_rate=limit_rate)
    return run_batch(resolved, runner, settings, state_path=state, on_event=on_event,
                     retries=retries)


__all__ = [
    "Access",
    "BatchReport",
    "Budget",
    "ConnectionBudget",
    "Event",
    "Executor",
    "Item",
    "ItemResult",
    "LocalExecutor",
    "OnEvent",
    "Plan",
    "PlanError",
    "Settings",
    "StateFile",
    "Task",
    "as_plan",
    "attempt_item",
    "batch",
    "default_state_path",
    "execute_item",
    "item_key",
    "load_plan",
    "parse_plan",
    "run_batch",
]

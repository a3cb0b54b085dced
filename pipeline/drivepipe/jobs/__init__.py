"""Batches of transfers: a plan, a state file, an executor (threads or Dask).

``drivepipe.batch(plan, jobs=4)`` runs a plan on this machine;
``executor=DaskExecutor("tcp://HOST:8786")`` runs it on a Dask cluster.  The
library never prints: ``on_event`` gets one dict per event.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from drivepipe.jobs.batching import BatchReport, Executor, Task, attempt_item, run_batch
    from drivepipe.jobs.local import Budget, ConnectionBudget, LocalExecutor
    from drivepipe.jobs.plan import Item, Plan, PlanError, item_key, load_plan, parse_plan
    from drivepipe.jobs.state import StateFile, default_state_path
    from drivepipe.jobs.transfer import (
        Access,
        Event,
        ItemResult,
        OnEvent,
        Settings,
        execute_item,
    )

#: the batch API's names and their modules, imported when first used: a command that
#: needs one job (``convert``: ``drivepipe.jobs.images``) does not load the batches
_LAZY = {
    **dict.fromkeys(("BatchReport", "Executor", "Task", "attempt_item", "run_batch"), "batching"),
    **dict.fromkeys(("Budget", "ConnectionBudget", "LocalExecutor"), "local"),
    **dict.fromkeys(("Item", "Plan", "PlanError", "item_key", "load_plan", "parse_plan"),
                    "plan"),
    **dict.fromkeys(("StateFile", "default_state_path"), "state"),
    **dict.fromkeys(("Access", "Event", "ItemResult", "OnEvent", "Settings", "execute_item"),
                    "transfer"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'drivepipe.jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drivepipe.jobs.{module}"), name)


PlanLike: TypeAlias = "str | os.PathLike[str] | Plan | Iterable[Mapping[str, Any]]"


def as_plan(plan: PlanLike) -> Plan:
    """A plan file path, a :class:`Plan`, or item dicts (paths relative to the cwd)."""
    from drivepipe.jobs.plan import Plan, load_plan, parse_plan  # noqa: PLC0415 - lazy

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
    from drivepipe.jobs.batching import run_batch  # noqa: PLC0415 - lazy
    from drivepipe.jobs.local import LocalExecutor  # noqa: PLC0415

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

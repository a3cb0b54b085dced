"""``drivepipe batch PLAN``: many uploads and downloads as one resumable job.

The plan is JSON lines (see :mod:`drivepipe.jobs.plan` and the migrations
guide).  The state goes to ``PLAN.state.json`` (``--state``): run the same
command again after a crash or a failure, and it skips what finished (checked
against the drive's meta or the output file), resumes what was interrupted
and retries what failed.  ``--jobs N`` items run at once on this machine,
sharing ``--connections`` and ``--limit-rate`` in total; ``--engine dask
--scheduler URL`` runs them on a Dask cluster instead (there both are per
item).  Stdout gets the table of results; stderr the live view (or
``--progress json`` events, the last one ``batch``) and the closing line.  The
exit code is 0 only when every item succeeded.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console

from drivepipe._errors import Cancelled, DrivepipeError, OutputError, UsageError
from drivepipe._sizes import parse_size
from drivepipe.cli._app import app
from drivepipe.cli._batch_view import BatchView, closing_line, report_table
from drivepipe.cli._common import (
    FROM_OPTIONS,
    ProgressOptions,
    ReadSizeOpt,
    SpoolDirOpt,
    ThreadsOpt,
    grouped_options,
    optional,
)
from drivepipe.cli._net import Account, LimitRateOpt, StallOpt
from drivepipe.jobs import BatchReport, Executor, LocalExecutor, Settings, load_plan, run_batch
from drivepipe.jobs.transfer import Access

JobsOpt = Annotated[
    int, typer.Option("--jobs", "-j", metavar="N", help="Items run at once (local engine).")
]
ConnectionsOpt = Annotated[int | None, optional(
    "--connections", "N", "Connections of the whole batch, shared by the running items "
    "(default: 4 per job; on Dask: per item).")]
StateOpt = Annotated[str | None, optional(
    "--state", "PATH", "State file (default: PLAN.state.json).")]
ReportOpt = Annotated[str | None, optional(
    "--report", "PATH", "Write every item's result, digest, time and error to this JSON "
    "file.")]
EngineOpt = Annotated[
    str, typer.Option("--engine", metavar="[local|dask]", help="local (threads here) or dask.")
]
SchedulerOpt = Annotated[str | None, optional(
    "--scheduler", "ADDRESS", "Dask scheduler address, tcp://HOST:8786.")]
RetriesOpt = Annotated[
    int,
    typer.Option("--retries", metavar="N", help="Attempts more for an item that failed on "
                 "the network side, in this run."),
]
ChunkSizeOpt = Annotated[
    str, typer.Option("--chunk-size", metavar="SIZE", help="Chunk size of chunked uploads.")
]
JournalDirOpt = Annotated[str | None, optional(
    "--journal-dir", "DIR", "Where chunked uploads keep their journals (default: "
    "STATE.journals; on Dask a path the workers see).")]


def make_executor(engine: str, jobs: int, connections: int | None,
                  scheduler: str | None, access: Access | None, limit_rate: int) -> Executor:
    if engine == "local":
        if scheduler:
            raise UsageError("--scheduler belongs to --engine dask")
        return LocalExecutor(jobs, connections, access, limit_rate)
    if engine == "dask":
        from drivepipe.jobs.dask_engine import DaskExecutor  # noqa: PLC0415 - optional extra

        return DaskExecutor(scheduler, connections=connections)
    raise UsageError(f"--engine must be local or dask, got {engine!r}")


def write_report(path: str, report: BatchReport) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report.as_dict(), f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the report: {exc.strerror or exc}") from exc


@app.command()
@grouped_options
def batch(
    plan: Annotated[str, typer.Argument(help="Plan file: JSON lines, one transfer per line.")],
    jobs: JobsOpt = 4,
    connections: ConnectionsOpt = None,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
    state: StateOpt = None,
    report: ReportOpt = None,
    progress: ProgressOptions = FROM_OPTIONS,
    engine: EngineOpt = "local",
    scheduler: SchedulerOpt = None,
    retries: RetriesOpt = 1,
    chunk_size: ChunkSizeOpt = "32M",
    read_size: ReadSizeOpt = "4M",
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
    journal_dir: JournalDirOpt = None,
    account: Account = FROM_OPTIONS,
) -> None:
    """Run a plan of uploads and downloads; rerun it to finish what did not."""
    mode = progress.mode
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    if connections is not None and connections < 1:
        raise UsageError("--connections must be at least 1")
    # the checks of --limit-rate and --stall-timeout the single transfers make
    rate = account.tls(limit_rate, stall_timeout).limit_rate
    settings = Settings(
        **asdict(account), chunk_size=parse_size(chunk_size),
        read_size=parse_size(read_size), threads=threads, spool_dir=spool_dir,
        stall_timeout=stall_timeout,
        journal_dir=os.path.abspath(journal_dir) if journal_dir else "",
        # on Dask each item gets the whole rate (each worker has its own link)
        limit_rate=rate if engine == "dask" else 0,
    )
    loaded = load_plan(plan)
    # Locally the account is resolved (a prompt, if any) once, before the first item;
    # Dask workers read it from their own environment.
    access = Access.resolve(settings) if engine == "local" and loaded.items else None
    executor = make_executor(engine, jobs, connections, scheduler, access, rate)
    view = BatchView(len(loaded), mode)
    with view:
        result = run_batch(loaded, executor, settings, state_path=state,
                           on_event=view.on_event, retries=retries)
        view.on_event({"event": "batch", "ok": result.ok, "interrupted": result.interrupted,
                       "counts": result.counts, "seconds": round(result.seconds, 3),
                       "state": result.state_path})
    if report:
        write_report(report, result)
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(
        report_table(result), highlight=False)
    if not progress.quiet:
        typer.echo(f"drivepipe: {closing_line(result)}", err=True)
    if result.interrupted:
        raise Cancelled(f"interrupted with {result.counts.get('not-run', 0)} items not run; "
                        "rerun the same command to continue")
    failed = [r for r in result.results if not r.ok]
    if failed:
        raise DrivepipeError(f"{len(failed)} of {len(result.results)} items did not finish "
                             f"(first: {failed[0].key}: {failed[0].error or failed[0].status}); "
                             f"rerun the same command to retry them")

"""``drivepipe bench IMAGE``: which stage limits a transfer, and what to change.

Parse, one call (:func:`drivepipe.jobs.bench.bench`), render.  In: an image (any
format), optionally ``--endpoint`` (a real API: the test uploads create drives there,
and are deleted right after; credentials come as for ``upload``).  Without it the sends
go to a local drive store started on a temporary directory (``--discard``: to a discard
sink).  Out on stdout: each stage's throughput alone (read, decode, hash, send), the
whole pipeline's, the bottleneck and advice with its measured gain (``--json``: one
object).  Only the first ``--limit`` raw bytes, or ``--seconds`` per measurement, are
used.  Refused: what ``upload`` refuses (bad image, bad credentials, unsafe endpoint).
"""

from __future__ import annotations

import contextlib
import json
from typing import Annotated

import typer

from drivepipe._bench import report_lines
from drivepipe._errors import UsageError
from drivepipe._sizes import parse_size
from drivepipe.cli._app import app
from drivepipe.cli._common import FormatOpt, QueueOpt, ReadSizeOpt, positive, positive_size
from drivepipe.cli._net import CacertOpt, EndpointOpt, InsecureHttpOpt, UserOpt, connect
from drivepipe.jobs.bench import BenchOptions
from drivepipe.jobs.bench import bench as run_bench_job


def _say(message: str) -> None:
    typer.echo(f"bench: {message} ...", err=True)


@app.command()
def bench(
    image: Annotated[str, typer.Argument(help="Image to measure (any supported format).")],
    endpoint: EndpointOpt = None,
    user: UserOpt = None,
    cacert: CacertOpt = None,
    insecure_http: InsecureHttpOpt = False,
    discard: Annotated[bool, typer.Option(
        "--discard", help="Measure sending into a discard sink instead of a local drive store."
    )] = False,
    seconds: Annotated[float, typer.Option(
        "--seconds", help="Time budget of each measurement.")] = 3.0,
    limit: Annotated[str, typer.Option(
        "--limit", metavar="SIZE",
        help="Measure at most this many raw bytes of the image (e.g. 512M, 4G).")
    ] = "1G",
    fmt: FormatOpt = "auto",
    read_size: ReadSizeOpt = "4M",
    queue_depth: QueueOpt = 16,
    buffer_size: Annotated[str, typer.Option(
        "--buffer-size", metavar="SIZE",
        help="libcurl upload buffer of the sends (16K to 2M).")] = "1M",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure each stage alone and the whole pipeline; name the bottleneck and advise.

    With --endpoint the test uploads create drives on that account (deleted right
    after); without it they go to a local drive store on a temporary directory.
    """
    if seconds <= 0:
        raise UsageError("--seconds must be more than 0")
    options = BenchOptions(
        seconds=seconds, limit=positive_size(limit, "--limit"), format=fmt,
        read_size=positive_size(read_size, "--read-size"),
        queue_depth=positive(queue_depth, "--queue-depth"), buffer_size=parse_size(buffer_size),
        discard=discard)
    with contextlib.ExitStack() as stack:
        conn = None
        if endpoint is not None:
            conn = stack.enter_context(connect(endpoint, None, None, user, cacert, insecure_http))
        report = run_bench_job(image, connection=conn, options=options, notify=_say)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    for line in report_lines(report):
        typer.echo(line)

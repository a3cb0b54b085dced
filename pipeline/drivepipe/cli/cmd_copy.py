"""``drivepipe copy SRC DST``: any source to any target, one :meth:`Client.copy` call."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from drivepipe._registry import STDIN as STDOUT
from drivepipe._registry import shown
from drivepipe._stats import RunStats
from drivepipe.api import Client, needs_client
from drivepipe.api import copy as copy_any
from drivepipe.cli._app import app
from drivepipe.cli._common import (
    FROM_OPTIONS,
    ForceOpt,
    ImageOptions,
    ProgressOptions,
    SizeOpt,
    grouped_options,
    optional,
    positive,
    positive_size,
)
from drivepipe.cli._net import Account, LimitRateOpt, StallOpt
from drivepipe.cli._progress import Reporter
from drivepipe.cli.cmd_local import LOCAL_IMAGE


def note(text: str) -> None:
    typer.echo(f"drivepipe: {text}", err=True)


ToEndpointOpt = Annotated[str | None, optional(
    "--to-endpoint", "URL", "The destination's API base URL, when a new drive is made on "
    "another service or location (default: the source's endpoint).")]
ToLocationOpt = Annotated[str | None, optional(
    "--to-location", "CODE", "The destination's location code (instead of --to-endpoint).")]
ToUserOpt = Annotated[str | None, optional(
    "--to-user", "EMAIL", "The destination's account (default: --user); its password comes "
    "from ~/.netrc for the destination host, CLOUDSIGMA_PASSWORD or the config file.")]


def _client(account: Account, limit_rate: int, stall_timeout: float,
            endpoint: str | None = None, location: str | None = None,
            user: str | None = None) -> Client:
    return Client(endpoint or account.endpoint, user=user or account.user,
                  direct_endpoint=None if endpoint or location else account.direct_endpoint,
                  location=location if endpoint or location else account.location,
                  cacert=account.cacert, insecure_http=account.insecure_http,
                  limit_rate=limit_rate, stall_timeout=stall_timeout, prompt=None)


@app.command()
@grouped_options
def copy(
    src: Annotated[str, typer.Argument(
        metavar="SRC", help="An image (a path, - for standard input, an http(s) URL) or a "
        "drive (drive:UUID, or a bare UUID).")],
    dst: Annotated[str, typer.Argument(
        metavar="DST", help="A new drive (drive: or drive:NAME), a file (sparse), a "
        "directory, a block device, - (standard output) or NAME:ARG for a target plugin.")],
    force: ForceOpt = False,
    expect: Annotated[str | None, optional(
        "--expect", "DIGEST", "Expected xxh3-128 of a drive source (default: its meta).")] = None,
    connections: Annotated[int, typer.Option(
        "--connections", help="Parallel connections of a drive's download (ranges) or a "
        "chunked upload.")] = 4,
    chunked: Annotated[bool, typer.Option(
        "--chunked", help="Make the new drive by a resumable chunked upload.")] = False,
    size: SizeOpt = None,
    to_endpoint: ToEndpointOpt = None,
    to_location: ToLocationOpt = None,
    to_user: ToUserOpt = None,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
    image: ImageOptions = LOCAL_IMAGE,
    account: Account = FROM_OPTIONS,
    progress: ProgressOptions = FROM_OPTIONS,
) -> None:
    """Copy any source to any target, streaming, verified where a drive is involved.

    An image to a new drive is an upload; a drive to a file, device or - is a
    download (verified against the drive's meta); a drive to a new drive streams
    the download into the upload (--to-endpoint for another location or
    service); an image to a file is a convert.  Prints the new drive's UUID or
    the output's path.
    """
    mode = progress.mode
    positive(connections, "--connections")
    read = image.read()
    if size is not None:
        read.size = positive_size(size, "--size")
    tls = account.tls(limit_rate, stall_timeout)
    stats = RunStats(title=f"copy {shown(src)}")
    with Reporter(stats, mode), contextlib.ExitStack() as held:
        client = other = None
        if needs_client(src, dst):  # an image to a local target needs no endpoint
            client = held.enter_context(_client(account, tls.limit_rate, tls.stall_timeout))
            if to_endpoint or to_location or to_user:
                other = held.enter_context(_client(account, tls.limit_rate,
                                                   tls.stall_timeout, to_endpoint,
                                                   to_location, to_user))
        result = copy_any(src, dst, client=client, to=other, connections=connections,
                          chunked=chunked, expect=expect, force=force, read=read,
                          queue_depth=image.queue_depth, stats=stats, notify=note,
                          handle_signals=True)
    printed = result.uuid if result.kind in ("upload", "drive-to-drive") else result.output
    if printed != STDOUT:
        typer.echo(printed)


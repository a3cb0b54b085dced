"""Local commands: ``convert``, ``checksum``, ``inspect``."""

from __future__ import annotations

import functools
import json
from typing import Annotated

import typer

from drivepipe._registry import shown
from drivepipe._sizes import format_size
from drivepipe._stats import RunStats
from drivepipe.cli._app import app
from drivepipe.cli._checklist import check_lists, checksum_one, hash_each
from drivepipe.cli._common import (
    FROM_OPTIONS,
    DirectOpt,
    DiskOpt,
    ForceOpt,
    FormatOpt,
    ImageOptions,
    ProgressOptions,
    SpoolDirOpt,
    grouped_options,
)
from drivepipe.cli._progress import Reporter
from drivepipe.jobs import images

#: the library's defaults (see drivepipe.jobs.images), as the options show them
LOCAL_READ_SIZE = "2M"
LOCAL_QUEUE_DEPTH = images.LOCAL_QUEUE_DEPTH


#: the local commands read in 2 MiB pieces with 8 in flight (see drivepipe.jobs.images)
LOCAL_IMAGE = ImageOptions(read_size=LOCAL_READ_SIZE, queue_depth=LOCAL_QUEUE_DEPTH)


@app.command()
@grouped_options
def convert(
    src: Annotated[str, typer.Argument(
        metavar="SRC", help="Input image (any supported format); - reads standard input.")],
    dst: Annotated[str, typer.Argument(
        metavar="DST", help="Output raw image, written sparsely; - writes the raw bytes to "
        "standard output, in order (holes as zeros on a pipe).  A directory (existing, or "
        "written with a trailing /) gets SRC's file name with its format extensions "
        "replaced by .raw inside it: disk.qcow2.gz -> DIR/disk.raw.")],
    force: ForceOpt = False,
    direct: DirectOpt = False,
    image: ImageOptions = LOCAL_IMAGE,
    progress: ProgressOptions = FROM_OPTIONS,
) -> None:
    """Convert an image to a sparse raw file (temp file, fsync, rename on success).

    DST may also be a block device (every byte written), or NAME:ARG for an installed
    target plugin."""
    mode = progress.mode
    read = image.read()
    stats = RunStats(title=f"convert {shown(src)}")
    with Reporter(stats, mode):
        images.convert(src, dst, read=read, force=force, direct=direct,
                       queue_depth=image.queue_depth, stats=stats)


@app.command()
@grouped_options
def checksum(
    srcs: Annotated[list[str], typer.Argument(
        metavar="PATH", help="Images to hash (raw content); with -c, lists to check.")],
    check: Annotated[bool, typer.Option(
        "--check", "-c", help="Each PATH is a list of HASH  NAME lines (xxh128sum's format, "
        "- for stdin): hash each NAME and print NAME: OK or NAME: FAILED.")] = False,
    image: ImageOptions = LOCAL_IMAGE,
    progress: ProgressOptions = FROM_OPTIONS,
) -> None:
    """Print the xxh3-128 of each image's raw content, in xxh128sum's line format.

    A file that cannot be hashed gets one error line on stderr and the others are still
    hashed; the exit code is then that of the first failure (7 if -c found a mismatch).
    """
    # a bad option is refused once, before any file
    digest = functools.partial(checksum_one, read=image.read(), queue_depth=image.queue_depth,
                               mode=progress.mode)
    code = check_lists(srcs, digest) if check else hash_each(srcs, digest)
    if code:
        raise typer.Exit(code)


_SIZES = ("size", "file_size", "data_bytes", "hole_bytes", "spool_bytes")


@app.command()
def inspect(
    src: Annotated[str, typer.Argument(help="Image to describe.")],
    fmt: FormatOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    scan: Annotated[
        bool, typer.Option("--scan", help="Decode the image to count data bytes when the "
                           "format does not record them.")
    ] = False,
    spool_dir: SpoolDirOpt = None,
    disk: DiskOpt = None,
) -> None:
    """Show an image's layers, raw size, and data vs hole bytes.

    A compressed image whose inner format needs random reads is spooled to find
    out (``spool_bytes`` says how much temporary space that took)."""
    read = images.ReadOptions(format=fmt, read_size=4 << 20, spool_dir=spool_dir, disk=disk)
    info = images.inspect(src, read=read, scan=scan).as_dict()
    if as_json:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        shown = value
        if key == "chain":
            continue  # the format line shows it (xz > qcow2)
        if key in _SIZES and isinstance(value, int):
            shown = f"{value} ({format_size(value)})"
        elif value is None:
            shown = "unknown (use --scan)"
        typer.echo(f"{key + ':':12} {shown}")

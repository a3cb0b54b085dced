"""Local commands: ``convert``, ``checksum``, ``inspect``."""

from __future__ import annotations

import functools
import json
import os
from typing import Annotated, Any

import typer

from drivepipe._extent import split_zeros
from drivepipe._files import check_free_space, check_target
from drivepipe._names import raw_name_for
from drivepipe._progress import Reporter
from drivepipe._registry import stage as plugin_stage
from drivepipe._registry import target
from drivepipe._runner import run_pipeline
from drivepipe._sizes import format_size
from drivepipe._stage import ImageInput, Sink
from drivepipe._stats import RunStats
from drivepipe.cli._app import app
from drivepipe.cli._checklist import check_lists, hash_each
from drivepipe.cli._common import (
    DiskOpt,
    ForceOpt,
    FormatOpt,
    ProgressOpt,
    QueueOpt,
    QuietOpt,
    ReadSizeOpt,
    SpoolDirOpt,
    ThreadsOpt,
    VerboseOpt,
    open_input,
    positive,
    positive_size,
    progress_mode,
)

# Measured on a warm 1 GiB file (benchmarks/bench_local.py): 2 MiB reads with 8
# in flight beat 4 MiB x 16; the smaller set of buffers stays in cache and is
# recycled by malloc instead of faulting in fresh pages (16 MiB queued at most).
LOCAL_READ_SIZE = "2M"
#: ``-`` as an output: standard output (as an input it is standard input, everywhere)
STDOUT = "-"
LOCAL_QUEUE_DEPTH = 8


@app.command()
def convert(
    src: Annotated[str, typer.Argument(
        metavar="SRC", help="Input image (any supported format); - reads standard input.")],
    dst: Annotated[str, typer.Argument(
        metavar="DST", help="Output raw image, written sparsely; - writes the raw bytes to "
        "standard output, in order (holes as zeros on a pipe).  A directory (existing, or "
        "written with a trailing /) gets SRC's file name with its format extensions "
        "replaced by .raw inside it: disk.qcow2.gz -> DIR/disk.raw.")],
    fmt: FormatOpt = "auto",
    force: ForceOpt = False,
    progress: ProgressOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    read_size: ReadSizeOpt = LOCAL_READ_SIZE,
    queue_depth: QueueOpt = LOCAL_QUEUE_DEPTH,
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
    disk: DiskOpt = None,
) -> None:
    """Convert an image to a sparse raw file (temp file, fsync, rename on success)."""
    mode = progress_mode(progress, quiet, verbose)
    positive(queue_depth, "--queue-depth")
    to_stdout = dst == STDOUT
    if not to_stdout and (dst.endswith(os.sep) or os.path.isdir(dst)):
        dst = os.path.join(dst, raw_name_for(src))
    if not to_stdout:
        check_target(dst, force=force)
    stats = RunStats(title=f"convert {src}")
    with Reporter(stats, mode):
        # The sink first: if it refuses, no opened image is left unclosed.
        make: Any = target("stdout" if to_stdout else "file")
        sink: Sink[str] = make(1) if to_stdout else make(dst, force=force)
        image = open_input(src, fmt, read_size, stats, threads, spool_dir, disk)
        try:
            # the data bytes the input knows of are what will be written: if they
            # cannot fit, say so now rather than at the end
            if not to_stdout:
                check_free_space(dst, image.data_size, f"the disk in {src}")
        except BaseException:
            image.close()
            raise
        run_pipeline(
            image.source, image.stages, sink, size=image.size, stats=stats,
            queue_depth=queue_depth,
        )


def checksum_one(
    path: str,
    fmt: str,
    read_size: str,
    progress: str,
    queue_depth: int = LOCAL_QUEUE_DEPTH,
    threads: int = 2,
    spool_dir: str | None = None,
    disk: str | None = None,
) -> str:
    """The xxh3-128 hex digest of ``path``'s raw content."""
    stats = RunStats(title=f"checksum {path}")
    with Reporter(stats, progress):
        image = open_input(path, fmt, read_size, stats, threads, spool_dir, disk)
        hasher: Any = plugin_stage("xxh3")()
        # Reading/decoding in one thread, hashing in the other.
        run_pipeline(
            image.source, [*image.stages, hasher], target("discard")(), size=image.size,
            stats=stats, split=len(image.stages), queue_depth=queue_depth,
        )
    return str(hasher.hexdigest())


@app.command()
def checksum(
    srcs: Annotated[list[str], typer.Argument(
        metavar="PATH", help="Images to hash (raw content); with -c, lists to check.")],
    check: Annotated[bool, typer.Option(
        "--check", "-c", help="Each PATH is a list of HASH  NAME lines (xxh128sum's format, "
        "- for stdin): hash each NAME and print NAME: OK or NAME: FAILED.")] = False,
    fmt: FormatOpt = "auto",
    progress: ProgressOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    read_size: ReadSizeOpt = LOCAL_READ_SIZE,
    queue_depth: QueueOpt = LOCAL_QUEUE_DEPTH,
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
    disk: DiskOpt = None,
) -> None:
    """Print the xxh3-128 of each image's raw content, in xxh128sum's line format.

    A file that cannot be hashed gets one error line on stderr and the others are still
    hashed; the exit code is then that of the first failure (7 if -c found a mismatch).
    """
    mode = progress_mode(progress, quiet, verbose)
    positive(queue_depth, "--queue-depth")
    positive(threads, "--threads")
    positive_size(read_size, "--read-size")
    digest = functools.partial(checksum_one, fmt=fmt, read_size=read_size, progress=mode,
                               queue_depth=queue_depth, threads=threads,
                               spool_dir=spool_dir, disk=disk)
    code = check_lists(srcs, digest) if check else hash_each(srcs, digest)
    if code:
        raise typer.Exit(code)


_SIZES = ("size", "file_size", "data_bytes", "hole_bytes", "spool_bytes")


def scan_data(image: ImageInput) -> int:
    """Count the raw image's data bytes by decoding it (zero blocks count as holes)."""
    stream = image.source.extents()
    for stage in image.stages:
        stream = stage.process(stream)
    data = 0
    for ext in stream:
        for piece in split_zeros(ext):
            if piece.data is not None:
                data += piece.length
    return data


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
    # an image of several disks (an OVA) shows its first unless told: its details
    # list them all
    image = open_input(src, fmt, "4M", spool_dir=spool_dir, disk=disk or "1")
    try:
        data = image.data_size
        if data is None and scan:
            data = scan_data(image)
    finally:
        image.close()
    info: dict[str, object] = {
        "path": src,
        "format": image.format,
        "chain": image.chain,
        "size": image.size,
        "file_size": image.file_size,
        "data_bytes": data,
        "hole_bytes": None if data is None else image.size - data,
        **{k: v for k, v in image.details.items()},
    }
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

"""Local commands: ``convert``, ``checksum``, ``inspect``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from drivepipe_plugins.discard import DiscardSink
from drivepipe_plugins.sparse_write import SparseFileWriter, check_target
from drivepipe_plugins.xxh3 import Xxh3Stage

from .._extent import split_zeros
from .._progress import Reporter
from .._runner import run_pipeline
from .._sizes import format_size
from .._stage import ImageInput
from .._stats import RunStats
from ._app import app
from ._common import (
    ForceOpt,
    FormatOpt,
    ProgressOpt,
    QueueOpt,
    ReadSizeOpt,
    SpoolDirOpt,
    ThreadsOpt,
    open_input,
)

# Measured on a warm 1 GiB file (benchmarks/bench_local.py): 2 MiB reads with 8
# in flight beat 4 MiB x 16; the smaller set of buffers stays in cache and is
# recycled by malloc instead of faulting in fresh pages (16 MiB queued at most).
LOCAL_READ_SIZE = "2M"
LOCAL_QUEUE_DEPTH = 8


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Input image (any supported format).")],
    dst: Annotated[str, typer.Argument(help="Output raw image; written sparsely.")],
    fmt: FormatOpt = "auto",
    force: ForceOpt = False,
    progress: ProgressOpt = "auto",
    read_size: ReadSizeOpt = LOCAL_READ_SIZE,
    queue_depth: QueueOpt = LOCAL_QUEUE_DEPTH,
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
) -> None:
    """Convert an image to a sparse raw file (temp file, fsync, rename on success)."""
    check_target(dst, force=force)
    stats = RunStats(title=f"convert {src}")
    with Reporter(stats, progress):
        # The sink first: if it refuses, no opened image is left unclosed.
        sink = SparseFileWriter(dst, force=force)
        image = open_input(src, fmt, read_size, stats, threads, spool_dir)
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
) -> str:
    """The xxh3-128 hex digest of ``path``'s raw content."""
    stats = RunStats(title=f"checksum {path}")
    with Reporter(stats, progress):
        image = open_input(path, fmt, read_size, stats, threads, spool_dir)
        hasher = Xxh3Stage()
        # Reading/decoding in one thread, hashing in the other.
        run_pipeline(
            image.source, [*image.stages, hasher], DiscardSink(), size=image.size,
            stats=stats, split=len(image.stages), queue_depth=queue_depth,
        )
    return hasher.hexdigest()


@app.command()
def checksum(
    srcs: Annotated[list[str], typer.Argument(help="Images to hash (raw content).")],
    fmt: FormatOpt = "auto",
    progress: ProgressOpt = "auto",
    read_size: ReadSizeOpt = LOCAL_READ_SIZE,
    queue_depth: QueueOpt = LOCAL_QUEUE_DEPTH,
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
) -> None:
    """Print the xxh3-128 of each image's raw content, in xxh128sum's line format."""
    for path in srcs:
        digest = checksum_one(
            path, fmt, read_size, progress, queue_depth, threads, spool_dir
        )
        typer.echo(f"{digest}  {path}")


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
) -> None:
    """Show an image's layers, raw size, and data vs hole bytes.

    A compressed image whose inner format needs random reads is spooled to find
    out (``spool_bytes`` says how much temporary space that took)."""
    image = open_input(src, fmt, "4M", spool_dir=spool_dir)
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

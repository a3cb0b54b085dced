"""Options and helpers shared by the commands."""

from __future__ import annotations

from typing import Annotated

import typer

from .._errors import UsageError
from .._registry import open_image
from .._sizes import parse_size
from .._stage import ImageInput, OpenOptions
from .._stats import RunStats

FormatOpt = Annotated[
    str,
    typer.Option(
        "--format", "-f",
        help="Input format (auto, raw, qcow2, gzip, xz, zstd, bzip2); auto detects by magic bytes.",
    ),
]
ProgressOpt = Annotated[
    str,
    typer.Option(
        "--progress",
        help="auto (a live view on a terminal, else none), rich, plain, json (one object "
        "per line on stderr), none.",
    ),
]
ReadSizeOpt = Annotated[
    str, typer.Option("--read-size", help="Size of each disk read (e.g. 1M, 4M, 16M).")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace the output file if it already exists.")
]
QueueOpt = Annotated[
    int,
    typer.Option(
        "--queue-depth",
        help="Extents buffered between the reading and the consuming thread (memory bound: "
        "depth x read size).",
    ),
]


ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        help="Decoder threads for formats that decode in parallel (compressed qcow2 "
        "clusters, multi-block xz).",
    ),
]


def open_input(
    path: str, fmt: str, read_size: str, stats: RunStats | None = None, threads: int = 2
) -> ImageInput:
    """Open an image with the CLI's options; a counting pass reports into ``stats``."""

    def on_phase(phase: str, done: int, total: int) -> None:
        if stats is not None:
            stats.phase = phase
            stats.phase_done = done
            stats.phase_total = total

    if threads < 1:
        raise UsageError("--threads must be at least 1")
    options = OpenOptions(read_size=parse_size(read_size), on_phase=on_phase, threads=threads)
    image = open_image(path, fmt, options)
    if stats is not None:
        stats.phase = "transfer"
        stats.total = image.size
        stats.data_total = image.data_size
    return image

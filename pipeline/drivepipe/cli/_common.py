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
        help="Input format: auto (detect every layer by magic bytes), one format name "
        "(the outer layer; what is inside is still detected), or a chain from the outside "
        "in such as xz,qcow2 (raw, qcow2, gzip, xz, zstd, bzip2, ...).",
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


SpoolDirOpt = Annotated[
    str | None,
    typer.Option(
        "--spool-dir", metavar="DIR",
        help="Where a compressed image whose inner format needs random reads (qcow2 in "
        "gzip, bzip2 or single-block xz) is decoded to first, as a sparse temporary file "
        "removed at once; default: the system temp dir. Multi-block xz and multi-frame "
        "zstd need no spool.",
    ),
]


def open_input(
    path: str,
    fmt: str,
    read_size: str,
    stats: RunStats | None = None,
    threads: int = 2,
    spool_dir: str | None = None,
) -> ImageInput:
    """Open an image with the CLI's options; counting and spooling report into ``stats``."""

    def on_phase(phase: str, done: int, total: int) -> None:
        if stats is not None:
            stats.set_phase(phase, done, total)

    if threads < 1:
        raise UsageError("--threads must be at least 1")
    def on_layer(name: str) -> None:
        if stats is not None:
            stats.chain.append(name)

    options = OpenOptions(
        read_size=parse_size(read_size), on_phase=on_phase, threads=threads,
        spool_dir=spool_dir, on_layer=on_layer,
    )
    image = open_image(path, fmt, options)
    if stats is not None:
        stats.chain[:] = image.chain
        stats.total = image.size
        stats.data_total = image.data_size
        stats.set_phase("transfer")
    return image

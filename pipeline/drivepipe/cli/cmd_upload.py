"""``drivepipe upload IMAGE``: one image in, a new drive's UUID on stdout.

Parse, one call (:func:`drivepipe.jobs.upload.upload`), render: the image (any
supported format, decoded on the fly) goes in one POST to the direct host, or with
``--chunked``/``--resume`` in resumable chunks.  Afterwards, unless ``--no-meta``, the
drive's meta gets ``drivepipe_xxh128`` and ``drivepipe_size`` (``--name`` sets the name
in the same update), keeping its other fields.  Stdout carries the UUID and nothing
else; progress and errors go to stderr.  If the upload succeeded but the meta update
failed, the UUID is still printed (the drive exists) and the command fails with one
line naming it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from drivepipe._errors import UsageError
from drivepipe._registry import shown
from drivepipe._sizes import format_size, parse_size
from drivepipe._stats import RunStats
from drivepipe.cli._app import app
from drivepipe.cli._common import (
    FROM_OPTIONS,
    ImageOptions,
    ProgressOptions,
    SizeOpt,
    grouped_options,
    positive,
    positive_size,
)
from drivepipe.cli._net import Account, LimitRateOpt, StallOpt
from drivepipe.cli._progress import Reporter
from drivepipe.cloudsigma.drives import META_DIGEST, META_SIZE
from drivepipe.cloudsigma.upload import MAX_BUFFER_SIZE, MIN_BUFFER_SIZE, UploadOptions
from drivepipe.jobs.upload import MetaNotStored
from drivepipe.jobs.upload import upload as upload_image

NameOpt = Annotated[
    str | None, typer.Option(
        "--name", metavar="NAME", help="Name of the new drive (default: the image's file name).",
                     show_default=False)
]
NoMetaOpt = Annotated[
    bool, typer.Option("--no-meta", help=f"Do not store {META_DIGEST}/{META_SIZE} in the "
                       "drive's meta.")
]
BufferOpt = Annotated[
    str, typer.Option("--buffer-size", metavar="SIZE", help="libcurl upload buffer (16K to 2M).")
]
ChunkedOpt = Annotated[
    bool, typer.Option("--chunked", help="Resumable upload in chunks over several connections.")
]
ConnectionsOpt = Annotated[
    int, typer.Option("--connections", help="Parallel connections of a chunked upload.")
]
ChunkSizeOpt = Annotated[
    str, typer.Option(
        "--chunk-size", metavar="SIZE", help="Chunk size of a chunked upload (e.g. 8M, 64M, 1G).")
]
ResumeOpt = Annotated[
    str | None, typer.Option(
        "--resume", metavar="UUID", help="Resume the chunked upload into this drive UUID.",
                             show_default=False)
]
JournalOpt = Annotated[
    str | None, typer.Option(
        "--journal", metavar="PATH", help="Journal file of a chunked upload (default: "
                             "under $XDG_CACHE_HOME/drivepipe/uploads, keyed by image and "
                             "endpoint).", show_default=False)
]


def note(text: str) -> None:
    typer.echo(f"drivepipe: {text}", err=True)


def buffer_size(text: str) -> int:
    size = parse_size(text)
    if not MIN_BUFFER_SIZE <= size <= MAX_BUFFER_SIZE:
        raise UsageError(f"--buffer-size must be between {format_size(MIN_BUFFER_SIZE)} and "
                         f"{format_size(MAX_BUFFER_SIZE)}, got {text!r}")
    return size


@app.command()
@grouped_options
def upload(
    image: Annotated[str, typer.Argument(help="Image to upload (raw, or any format drivepipe "
                                         "decodes).")],
    name: NameOpt = None,
    no_meta: NoMetaOpt = False,
    size: SizeOpt = None,
    buffer: BufferOpt = "1M",
    chunked: ChunkedOpt = False,
    connections: ConnectionsOpt = 4,
    chunk_size: ChunkSizeOpt = "32M",
    resume: ResumeOpt = None,
    journal: JournalOpt = None,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
    reading: ImageOptions = FROM_OPTIONS,
    account: Account = FROM_OPTIONS,
    progress: ProgressOptions = FROM_OPTIONS,
) -> None:
    """Upload an image as a new drive; prints the drive's UUID and nothing else."""
    # Every option is checked before a password prompt or a long counting pass.
    mode = progress.mode
    read = reading.read()
    if size is not None:
        read.size = positive_size(size, "--size")
    options = UploadOptions(
        chunked=chunked, name=name, meta=not no_meta, buffer_size=buffer_size(buffer),
        queue_depth=reading.queue_depth, chunk_size=positive_size(chunk_size, "--chunk-size"),
        connections=positive(connections, "--connections"), resume_uuid=resume,
        journal_path=journal)
    if journal and not options.is_chunked:
        raise UsageError("--journal belongs to a chunked upload: add --chunked")
    options.check()
    tls = account.tls(limit_rate, stall_timeout, connections if options.is_chunked else 1)
    with account.connection(tls) as conn:
        stats = RunStats(title=f"upload {shown(image)}")
        try:
            with Reporter(stats, mode):
                result = upload_image(image, connection=conn, options=options, read=read,
                                      stats=stats, notify=note, handle_signals=True)
        except MetaNotStored as exc:
            typer.echo(exc.result.uuid)  # the drive exists: its UUID matters
            raise
    typer.echo(result.uuid)

"""``drivepipe upload IMAGE``: one image in, a new drive's UUID on stdout.

The image (any supported format, decoded on the fly) is sent in one POST to
the direct host by the ``send`` sink, or with ``--chunked``/``--resume`` by
the resumable chunked sender.  Afterwards, unless ``--no-meta``, the drive's
meta gets ``drivepipe_xxh128`` and ``drivepipe_size`` (``--name`` sets the name
in the same update), keeping its other fields.  Stdout carries the UUID and
nothing else; progress and errors go to stderr.  If the upload succeeded but
the meta update failed, the UUID is still printed (the drive exists) and the
command fails with one line naming it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from drivepipe._errors import DrivepipeError, ImageError, TransferError, UsageError
from drivepipe._progress import Reporter
from drivepipe._sizes import format_size, parse_size
from drivepipe._stage import ImageInput
from drivepipe._stats import RunStats
from drivepipe.cli._app import app
from drivepipe.cli._common import (
    DiskOpt,
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
from drivepipe.cli._net import (
    CacertOpt,
    Connection,
    DirectOpt,
    EndpointOpt,
    InsecureHttpOpt,
    LimitRateOpt,
    LocationOpt,
    StallOpt,
    UserOpt,
    connect,
    transport,
)
from drivepipe.cloudsigma.drives import META_DIGEST, META_SIZE, default_drive_name
from drivepipe.transport.http import ApiClient
from drivepipe_plugins.targets.drive_upload import (
    MAX_BUFFER_SIZE,
    MIN_BUFFER_SIZE,
    DirectOptions,
    UploadResult,
    direct_upload,
)

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


def buffer_size(text: str) -> int:
    size = parse_size(text)
    if not MIN_BUFFER_SIZE <= size <= MAX_BUFFER_SIZE:
        raise UsageError(f"--buffer-size must be between {format_size(MIN_BUFFER_SIZE)} and "
                         f"{format_size(MAX_BUFFER_SIZE)}, got {text!r}")
    return size


def send_chunked(
    image: ImageInput,
    conn: Connection,
    stats: RunStats,
    *,
    chunk_size: str,
    connections: int,
    resume: str | None,
    journal: str | None,
    name: str | None,
) -> UploadResult:
    """Delegate to the resumable chunked sender (imported only when asked for)."""
    try:
        # Imported here: the chunked sender is only loaded with --chunked/--resume.
        from drivepipe_plugins.targets.drive_chunked import (  # noqa: PLC0415
            ChunkedOptions,
            chunked_upload,
        )
    except ImportError as exc:
        image.close()
        raise UsageError("chunked uploads are not available in this installation") from exc
    options = ChunkedOptions(chunk_size=parse_size(chunk_size), connections=connections,
                             resume_uuid=resume, journal_path=journal, name=name)
    try:
        result = chunked_upload(image, conn, options, stats)
    finally:
        image.close()  # the chunked sender reads the image but leaves closing to its owner
    return UploadResult(result.uuid, result.xxh128, result.size)


def store_meta(conn: Connection, result: UploadResult, name: str | None, meta: bool) -> None:
    """Write the checksum (and name) into the drive, keeping its other fields."""
    if not meta and name is None:
        return
    values = {META_DIGEST: result.xxh128, META_SIZE: str(result.size)} if meta else {}
    try:
        conn.api.update_drive(result.uuid, name=name, meta=values)
    except DrivepipeError as exc:
        raise TransferError(f"drive {result.uuid} was uploaded, but updating its meta "
                            f"failed: {exc.one_line()}") from exc


@app.command()
def upload(
    image: Annotated[str, typer.Argument(help="Image to upload (raw, or any format drivepipe "
                                         "decodes).")],
    fmt: FormatOpt = "auto",
    name: NameOpt = None,
    no_meta: NoMetaOpt = False,
    progress: ProgressOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    read_size: ReadSizeOpt = "4M",
    queue_depth: QueueOpt = 16,
    threads: ThreadsOpt = 2,
    spool_dir: SpoolDirOpt = None,
    disk: DiskOpt = None,
    buffer: BufferOpt = "1M",
    chunked: ChunkedOpt = False,
    connections: ConnectionsOpt = 4,
    chunk_size: ChunkSizeOpt = "32M",
    resume: ResumeOpt = None,
    journal: JournalOpt = None,
    endpoint: EndpointOpt = None,
    direct_endpoint: DirectOpt = None,
    location: LocationOpt = None,
    user: UserOpt = None,
    cacert: CacertOpt = None,
    insecure_http: InsecureHttpOpt = False,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
) -> None:
    """Upload an image as a new drive; prints the drive's UUID and nothing else."""
    # Every option is checked before a password prompt or a long counting pass.
    direct = DirectOptions(buffer_size=buffer_size(buffer), queue_depth=queue_depth)
    mode = progress_mode(progress, quiet, verbose)
    positive(connections, "--connections")
    positive(queue_depth, "--queue-depth")
    positive(threads, "--threads")
    positive_size(read_size, "--read-size")
    positive_size(chunk_size, "--chunk-size")
    name = name if name is not None else default_drive_name(image)
    if journal and not (chunked or resume):
        raise UsageError("--journal belongs to a chunked upload: add --chunked")
    tls = transport(cacert, insecure_http, limit_rate, stall_timeout,
                    connections if chunked or resume else 1)
    conn = connect(endpoint, direct_endpoint, location, user, cacert, insecure_http, tls)
    try:
        # A wrong password or endpoint shows now, not after a counting pass or a spool.
        # On a connection of its own: libcurl re-sends a request that fails early on a
        # reused connection, and a re-sent POST (initupload) would make a second drive.
        with ApiClient(conn.endpoint, conn.creds, conn.tls) as check:
            check.get_json("drives/", {"limit": 1})
        stats = RunStats(title=f"upload {image}")
        with Reporter(stats, mode):
            img = open_input(image, fmt, read_size, stats, threads, spool_dir, disk)
            if img.size == 0:
                img.close()
                raise ImageError(f"{image}: the image is empty (0 bytes of disk); "
                                 "there is nothing to upload")
            if chunked or resume:
                result = send_chunked(img, conn, stats, chunk_size=chunk_size,
                                      connections=connections, resume=resume, journal=journal,
                                      name=name)
            else:
                result = direct_upload(img, conn.endpoint, conn.creds, conn.tls, direct, stats)
            stats.result = {"uuid": result.uuid, "xxh128": result.xxh128, "size": result.size}
        typer.echo(result.uuid)
        store_meta(conn, result, name, not no_meta)
    finally:
        conn.close()

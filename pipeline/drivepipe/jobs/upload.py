"""The upload of an image into a new drive, as library code (the CLI and the API call it).

In: an image (a path, ``-`` for standard input, a URL, or an already opened
:class:`~drivepipe.ImageInput`), a :class:`~drivepipe.cloudsigma.connection.Connection`,
:class:`~drivepipe.cloudsigma.upload.UploadOptions` and how to read the image
(:class:`~drivepipe.jobs.images.ReadOptions`).  Steps:

1. the options are checked, then the account: one cheap API request on a connection of
   its own, so a wrong password shows before a counting pass or a spool (and a request
   libcurl re-sends on a reused connection is never the ``initupload`` POST);
2. the image is opened through :func:`drivepipe.jobs.images.open_input`
   (the registry's formats and sources);
3. the target named by the options (``drive``: one POST; ``drive-chunked``: resumable
   chunks) is found through :func:`drivepipe._registry.target` and run as the sink of
   ``source -> decoders -> xxh3 -> target`` by the runner, which meters every part into
   ``stats`` and checks the stream's size;
4. the drive's meta gets ``drivepipe_xxh128`` and ``drivepipe_size`` (and the name),
   keeping its other fields.

A direct upload that the server refused before taking it (408, 429, 503, no connection)
is run again, from a freshly opened image, as the one retry policy says (waiting at
least the server's ``Retry-After``); an image given already opened, or standard input,
cannot be read twice and is not retried.  A chunked upload retries each chunk itself
and resumes across runs from its journal.

Out: :class:`UploadResult`.  If the upload worked but the meta update failed,
:class:`MetaNotStored` carries the result (the drive exists).  Nothing here prints;
notes go to ``notify``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import cast

from drivepipe._errors import DrivepipeError, ImageError, TransferError, UsageError
from drivepipe._registry import STDIN, shown, stage, target
from drivepipe._runner import run_pipeline
from drivepipe._stage import ImageInput, Source, Stage
from drivepipe._stats import RunStats
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.drives import META_DIGEST, META_SIZE, default_drive_name
from drivepipe.cloudsigma.upload import DriveTarget, SentDrive, UploadOptions
from drivepipe.jobs.images import ReadOptions, open_input

Notify = Callable[[str], None]
#: extents queued before a chunked upload's sink, which holds its own chunks in memory
CHUNKED_QUEUE_DEPTH = 2


@dataclass
class UploadResult(SentDrive):
    """The new (or resumed) drive, what went over the wire (:class:`SentDrive`), and:"""

    #: raw bytes of the image (the drive may have been grown to the minimum drive size)
    size: int = 0
    #: xxh3-128 hex digest of the raw bytes
    xxh128: str = ""
    name: str = ""
    #: runs of the pipeline (more than 1 after a refused direct upload)
    attempts: int = 1


class MetaNotStored(TransferError):
    """The drive was uploaded, but writing its meta failed; ``result`` describes it."""

    def __init__(self, message: str, result: UploadResult) -> None:
        super().__init__(message)
        self.result = result


def check_access(conn: Connection) -> None:
    """One cheap authenticated request, on a connection of its own."""
    with ApiClient(conn.endpoint, conn.creds, conn.tls) as check:
        check.get_json("drives/", {"limit": 1})


def drive_target(options: UploadOptions) -> DriveTarget:
    """The target class the options name, found through the registry."""
    cls = target(options.target)
    if not callable(getattr(cls, "for_upload", None)):
        raise UsageError(f"the target {options.target!r} cannot upload into a drive")
    return cast(DriveTarget, cls)


def upload(
    image: str | ImageInput,
    *,
    connection: Connection,
    options: UploadOptions | None = None,
    read: ReadOptions | None = None,
    stats: RunStats | None = None,
    notify: Notify | None = None,
    handle_signals: bool = False,
) -> UploadResult:
    """Upload ``image`` into a new drive (or resume a chunked one); see the module doc.

    An :class:`~drivepipe.ImageInput` passed in is closed when this returns.
    ``handle_signals``: see :attr:`UploadOptions.handle_signals`.
    """
    options = options or UploadOptions()
    if handle_signals:
        options = replace(options, handle_signals=True)
    read = _reading(read or ReadOptions(), connection, notify)
    label = shown(image) if isinstance(image, str) else image.path
    try:
        options.check()
        if isinstance(image, str):
            read.check()
        name = options.name if options.name is not None else default_drive_name(label)
        options = replace(options, name=name)
        cls = drive_target(options)
        check_access(connection)
    except BaseException:
        if not isinstance(image, str):
            image.close()
        raise
    stats = stats if stats is not None else RunStats(title=f"upload {label}")
    runs = _Runs(image, read, stats, connection, options, cls)
    if options.is_chunked or not runs.reopenable:
        result = runs.once()
    else:
        def on_retry(exc: BaseException, seconds: float) -> None:
            if notify is not None and isinstance(exc, DrivepipeError):
                notify(f"{exc.one_line()}; trying again in {seconds:.1f} s")

        result = options.policy.call(runs.once, idempotent=False, on_retry=on_retry)
    stats.result = {"uuid": result.uuid, "xxh128": result.xxh128, "size": result.size}
    store_meta(connection, result, options)
    return result


def _reading(read: ReadOptions, conn: Connection, notify: Notify | None) -> ReadOptions:
    """``read`` with what an image at a URL is fetched with, where not given: the
    connection's transport, and its account (sent only to the endpoint's own hosts)."""
    return replace(
        read, tls=read.tls or conn.tls, endpoint=read.endpoint or conn.endpoint,
        creds=read.creds or conn.creds, notify=read.notify or notify)


def upload_stream(
    source: Source,
    stages: list[Stage],
    size: int,
    *,
    connection: Connection,
    options: UploadOptions | None = None,
    stats: RunStats | None = None,
    notify: Notify | None = None,
    name: str | None = None,
    label: str = "stream",
    handle_signals: bool = False,
) -> UploadResult:
    """Upload the raw stream ``source -> stages`` of exactly ``size`` bytes into a new drive
    (a download being copied, a generated image): like :func:`upload` of an opened image
    labelled ``label``; read once, so a refused direct upload is not run again.  ``name``
    (the drive's) overrides ``options.name``."""
    options = options or UploadOptions()
    if name is not None:
        options = replace(options, name=name)
    image = ImageInput(path=label, format="raw", size=size, source=source, stages=list(stages))
    return upload(image, connection=connection, options=options, stats=stats, notify=notify,
                  handle_signals=handle_signals)


@dataclass
class _Runs:
    """One run of the pipeline per call; a path is opened afresh each time."""

    image: str | ImageInput
    read: ReadOptions
    stats: RunStats
    conn: Connection
    options: UploadOptions
    cls: DriveTarget
    attempts: int = 0
    #: the stats' parts before the first run (a second run is metered afresh)
    mark: int = field(init=False)

    def __post_init__(self) -> None:
        self.mark = len(self.stats.stages)

    @property
    def reopenable(self) -> bool:
        return isinstance(self.image, str) and self.image != STDIN

    def _open(self) -> ImageInput:
        if isinstance(self.image, str):
            return open_input(self.image, self.read, self.stats)
        if self.attempts > 1:
            raise AssertionError("an opened image is read once")
        return self.image

    def once(self) -> UploadResult:
        self.attempts += 1
        del self.stats.stages[self.mark:]  # a second run is metered afresh
        img = self._open()
        try:
            if img.size == 0:
                raise ImageError(f"{img.path}: the image is empty (0 bytes of disk); there "
                                 "is nothing to upload")
            sink = self.cls.for_upload(self.conn, self.options, img)
            hasher = stage("xxh3")()
            depth = (min(self.options.queue_depth, CHUNKED_QUEUE_DEPTH)
                     if self.options.is_chunked else self.options.queue_depth)
            sent: SentDrive = run_pipeline(
                img.source, [*img.stages, hasher], sink, size=img.size, stats=self.stats,
                queue_depth=depth)
            digest = str(getattr(hasher, "hexdigest")())  # noqa: B009 - a plugin's stage
            size = img.size
        finally:
            img.close()
        made = {f.name: getattr(sent, f.name) for f in fields(SentDrive)}
        return UploadResult(**made, size=size, xxh128=digest,
                            name=self.options.name or "", attempts=self.attempts)


def store_meta(conn: Connection, result: UploadResult, options: UploadOptions) -> None:
    """Write the checksum (and name, and extra meta) into the drive, keeping its other
    fields; :class:`MetaNotStored` if that fails."""
    values = dict(options.extra_meta)
    if options.meta:
        values.update({META_DIGEST: result.xxh128, META_SIZE: str(result.size)})
    if not values and options.name is None:
        return
    try:
        conn.api.update_drive(result.uuid, name=options.name, meta=values)
    except DrivepipeError as exc:
        raise MetaNotStored(f"drive {result.uuid} was uploaded, but updating its meta "
                            f"failed: {exc.one_line()}", result) from exc


__all__ = [
    "MetaNotStored",
    "ReadOptions",
    "UploadOptions",
    "UploadResult",
    "check_access",
    "drive_target",
    "store_meta",
    "upload",
    "upload_stream",
]

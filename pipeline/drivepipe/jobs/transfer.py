"""One item of a batch, run where it is placed: check, transfer, result.

In: an :class:`~drivepipe.jobs.plan.Item`, the :class:`Settings` (no secret in
them: they travel to Dask workers), the item's previous state record, and an
event callback.  The endpoint and the credentials are either given
(:class:`Access`, the local executor resolves them once) or read where the
item runs, from the environment and config files, as the CLI does.

Out: an :class:`ItemResult` (never raises for an error drivepipe knows: the
item is failed with its one error line).  Before any transfer a ``done``
record is checked: an upload's drive must still hold the digest in its meta
and the image must be unchanged; a download's output must be there with its
recorded size and mtime (else its digest is recomputed).  Then the item is
skipped.  Otherwise the library jobs run: :func:`drivepipe.jobs.upload.upload`
(a chunked one keeps its journal beside the state, keyed by the item, so a killed item
resumes), and :func:`drivepipe.jobs.download.download` (its ``.part`` journal
resumes).  Events: ``start`` and ``progress``
(``bytes``/``total``, every ``progress_interval`` seconds).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final

from drivepipe._errors import DrivepipeError, HTTPError
from drivepipe._remote import Auth
from drivepipe._stats import RunStats
from drivepipe._verify import digest_file
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint, resolve_credentials, resolve_endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.drives import META_DIGEST, META_SIZE
from drivepipe.cloudsigma.upload import UploadOptions
from drivepipe.jobs.images import ReadOptions
from drivepipe.jobs.plan import Item
from drivepipe.jobs.upload import MetaNotStored, upload
from drivepipe.transport.curl import TlsOptions
from drivepipe.transport.retry import RetryPolicy, is_transient

#: the batch's own meta field, beside the upload command's digest and size
META_KEY: Final = "drivepipe_batch_key"

Event = dict[str, Any]
OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class Settings:
    """How every item runs; picklable and free of secrets (the password is never here)."""

    endpoint: str | None = None
    direct_endpoint: str | None = None
    location: str | None = None
    user: str | None = None
    cacert: str | None = None
    insecure_http: bool = False
    #: connections of one chunked upload or download (the executor sets its share)
    connections: int = 4
    chunk_size: int = 32 << 20
    read_size: int = 4 << 20
    threads: int = 2
    #: chunked-upload journals, one per item key
    journal_dir: str = ""
    #: where a compressed image whose inner format needs random reads is decoded first
    spool_dir: str | None = None
    progress_interval: float = 0.5
    #: download: bytes per ranged request (None: the download's automatic size, see
    #: ``DownloadOptions``; memory: connections + 2 of them) and per journaled block
    range_size: int | None = None
    block_size: int = 4 << 20
    #: seconds without a byte moving before a connection is cut (the CLI's --stall-timeout)
    stall_timeout: float = 120.0
    #: bytes a second of this item, split over its connections (0: no cap); the local
    #: executor sets each item's share of the batch's ``--limit-rate``
    limit_rate: int = 0
    #: attempts without progress before a download range or an upload chunk gives up,
    #: and the first delay between them (seconds, doubling)
    retries: int = 8
    retry_delay: float = 0.5


@dataclass(frozen=True)
class Access:
    """A resolved endpoint and account: built once per process, never sent anywhere."""

    endpoint: Endpoint
    creds: Credentials
    tls: TlsOptions

    @classmethod
    def resolve(cls, settings: Settings) -> Access:
        """From the settings, the environment and config files, like the CLI."""
        ep = resolve_endpoint(settings.endpoint, settings.direct_endpoint, settings.location)
        creds = resolve_credentials(ep, settings.user)
        tls = TlsOptions(cacert=settings.cacert, insecure_http=settings.insecure_http,
                         stall_timeout=settings.stall_timeout)
        with ApiClient(ep, creds, tls) as api:
            ep = api.resolve_direct()
        return cls(ep, creds, tls)

    def connection(self) -> Connection:
        """A fresh :class:`~drivepipe.cloudsigma.connection.Connection` (one per item: handles are
        not shared between threads)."""
        return Connection(self.endpoint, self.creds, self.tls,
                          ApiClient(self.endpoint, self.creds, self.tls))


@dataclass
class ItemResult:
    key: str
    op: str
    source: str
    target: str
    #: done (transferred now), skipped (done before, checked), failed
    status: str
    uuid: str | None = None
    output: str | None = None
    xxh128: str | None = None
    size: int | None = None
    seconds: float = 0.0
    #: when the item started and ended (UTC, ISO 8601)
    started_at: str = ""
    finished_at: str = ""
    error: str | None = None
    #: a chunked upload or a download that continued from its journal
    resumed: bool = False
    #: bytes this run moved (0 for a skipped item)
    bytes: int = 0
    #: the host name of the machine that ran it, and on Dask the worker's address
    host: str = ""
    worker: str = ""
    attempts: int = 1
    #: failed on the network side: another attempt may succeed
    retryable: bool = False
    notes: list[str] = field(default_factory=list)
    #: what a rerun checks the result against
    source_size: int | None = None
    source_mtime_ns: int | None = None
    mtime_ns: int | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def journal_path(settings: Settings, item: Item) -> str:
    return os.path.join(settings.journal_dir, f"{item.key}.upload.json")


def execute_item(
    item: Item,
    settings: Settings,
    previous: dict[str, Any] | None = None,
    on_event: OnEvent | None = None,
    access: Access | None = None,
) -> ItemResult:
    """Run one item (see the module docstring); the result says how it went."""
    emit = on_event or (lambda event: None)
    started = time.monotonic()
    result = ItemResult(item.key, item.op, item.source, item.target, "failed",
                        host=socket.gethostname(), started_at=_now())
    emit({"event": "start", "key": item.key, "op": item.op, "host": result.host})
    stats = RunStats(title=item.label)
    try:
        with _ticker(item, stats, emit, settings.progress_interval):
            access = capped(access or Access.resolve(settings), item, settings)
            if not _still_done(item, previous, access, result):
                if item.op == "upload":
                    _upload(item, settings, access, stats, result)
                else:
                    _download(item, settings, access, stats, result)
                result.status = "done"
    except DrivepipeError as exc:
        result.status, result.error = "failed", exc.one_line()
        result.retryable = _may_pass_later(exc)
    except OSError as exc:  # translated where drivepipe reads; a last net for the rest
        result.status = "failed"
        result.error = f"{exc.filename or item.source}: {exc.strerror or exc}"
    except Exception as exc:  # a bug must not stop the other items; one line all the same
        result.status = "failed"
        result.error = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}"
    result.seconds = round(time.monotonic() - started, 3)
    result.finished_at = _now()
    return result


def capped(access: Access, item: Item, settings: Settings) -> Access:
    """``access`` with the item's rate cap, shared by the connections it opens."""
    if not settings.limit_rate:
        return access
    spread = settings.connections if item.chunked or item.op == "download" else 1
    tls = replace(access.tls, limit_rate=settings.limit_rate).shared(spread)
    return replace(access, tls=tls)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _may_pass_later(exc: DrivepipeError) -> bool:
    return is_transient(exc)


@contextlib.contextmanager
def _ticker(item: Item, stats: RunStats, emit: OnEvent, interval: float) -> Iterator[None]:
    """``progress`` events from the item's counters, sampled in a thread of their own."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            done = stats.stages[-1].bytes if stats.stages else 0
            emit({"event": "progress", "key": item.key, "bytes": done, "total": stats.total})

    thread = threading.Thread(target=run, name=f"progress-{item.key}", daemon=True)
    if interval > 0:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


# --- was it done already? --------------------------------------------------------------

def _still_done(
    item: Item, previous: dict[str, Any] | None, access: Access, result: ItemResult
) -> bool:
    """True (result filled as skipped) when the previous run's result still holds."""
    if not previous or previous.get("status") != "done":
        return False
    if item.op == "upload":
        ok = _upload_holds(item, previous, access, result)
    else:
        ok = _download_holds(item, previous, result)
    if ok:
        result.status = "skipped"
        for name in ("uuid", "output", "xxh128", "size", "source_size", "source_mtime_ns",
                     "mtime_ns"):
            setattr(result, name, previous.get(name))
    return ok


def _source_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _upload_holds(
    item: Item, previous: dict[str, Any], access: Access, result: ItemResult
) -> bool:
    uuid = str(previous.get("uuid") or "")
    if _source_stat(item.source) != (previous.get("source_size"),
                                     previous.get("source_mtime_ns")):
        result.notes.append(f"{item.source} changed since its upload to drive {uuid}: "
                            "uploading it again")
        return False
    api = ApiClient(access.endpoint, access.creds, access.tls)
    try:
        drive = api.drive(uuid)
    except HTTPError as exc:
        if exc.status != 404:
            raise
        result.notes.append(f"drive {uuid} is gone: uploading again")
        return False
    finally:
        api.close()
    meta = drive.get("meta") if isinstance(drive.get("meta"), dict) else {}
    if (meta or {}).get(META_DIGEST) == previous.get("xxh128") and \
            str((meta or {}).get(META_SIZE)) == str(previous.get("size")):
        return True
    result.notes.append(f"drive {uuid} no longer holds the checksum of its upload: "
                        "uploading again")
    return False


def _download_holds(item: Item, previous: dict[str, Any], result: ItemResult) -> bool:
    st = _source_stat(item.target)
    if st is None:
        result.notes.append(f"{item.target} is gone: downloading again")
        return False
    if st == (previous.get("size"), previous.get("mtime_ns")):
        return True
    got = digest_file(item.target).whole
    if got == previous.get("xxh128"):
        return True
    raise DrivepipeError(f"{item.target} changed since the batch downloaded it (xxh128 "
                         f"{got}, was {previous.get('xxh128')}); move it away to download "
                         "it again")


# --- the transfers ---------------------------------------------------------------------

def _upload(
    item: Item, settings: Settings, access: Access, stats: RunStats, result: ItemResult
) -> None:
    st = _source_stat(item.source)
    chunked = item.chunked
    if chunked:
        os.makedirs(settings.journal_dir, exist_ok=True)
    options = UploadOptions(
        chunked=chunked, name=item.target, chunk_size=settings.chunk_size,
        connections=settings.connections,
        journal_path=journal_path(settings, item) if chunked else None,
        extra_meta={**item.meta, META_KEY: item.key},
        policy=RetryPolicy(retries=settings.retries, base=settings.retry_delay / 2))
    read = ReadOptions(format=item.format, read_size=settings.read_size,
                       threads=settings.threads, spool_dir=settings.spool_dir)
    conn = access.connection()
    try:
        sent = upload(item.source, connection=conn, options=options, read=read, stats=stats,
                      notify=result.notes.append)
    except MetaNotStored as exc:
        result.uuid = exc.result.uuid
        raise
    finally:
        conn.close()
    result.uuid, result.xxh128, result.size = sent.uuid, sent.xxh128, sent.size
    result.resumed, result.bytes = sent.resumed, sent.sent_bytes
    if st is not None:
        result.source_size, result.source_mtime_ns = st


def _download(
    item: Item, settings: Settings, access: Access, stats: RunStats, result: ItemResult
) -> None:
    """``drivepipe download SOURCE -o PATH`` as a library call, its notes kept in the
    result (a drive by UUID with its meta, or a URL: the account only on the endpoint's
    origin; the ``.part`` journal resumes)."""
    from drivepipe.jobs.download import DownloadOptions, download  # noqa: PLC0415

    os.makedirs(os.path.dirname(item.target) or ".", exist_ok=True)
    result.resumed = os.path.exists(f"{item.target}.part.journal")
    options = DownloadOptions(
        connections=settings.connections, range_size=settings.range_size,
        block_size=settings.block_size, retries=settings.retries,
        retry_delay=settings.retry_delay, force=item.force)
    got = download(item.source, item.target, auth=Auth(access.endpoint, access.creds),
                   tls=access.tls, options=options, stats=stats, notify=result.notes.append)
    if got.expected is None:
        result.notes.append(f"{item.source}: no checksum to verify against")
    st = os.stat(got.output)
    result.output, result.xxh128, result.size = got.output, got.xxh128, st.st_size
    result.mtime_ns = st.st_mtime_ns
    result.bytes = got.received

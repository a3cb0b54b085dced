"""The public Python API: a :class:`Client` for an endpoint, and the local jobs.

The CLI is built on exactly this (parse, one call here, render), so a script
can do whatever a command does::

    import drivepipe

    digest = drivepipe.checksum("disk.qcow2")            # xxh3-128 of the raw disk
    drivepipe.convert("disk.qcow2.xz", "disk.raw")       # a sparse, durable raw file

    with drivepipe.Client("http://127.0.0.1:8443/api/2.0/", user="me@example.com",
                          password=secret) as client:
        sent = client.upload("disk.qcow2", name="web")   # one POST of the raw bytes
        got = client.download(sent.uuid, "copy.raw")     # verified against its meta

Progress: pass a :class:`~drivepipe.RunStats` (``stats=``) and read it from
another thread (bytes, rates per stage, phases); notes that a command would
print (a resumed download, a grown drive) go to ``notify``.  Nothing here
prints, and signal handlers are installed only with ``handle_signals=True``.
Every failure is a :class:`~drivepipe.DrivepipeError` subclass.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import cast

from drivepipe._errors import ConfigError, UsageError
from drivepipe._remote import Auth
from drivepipe._stage import Source
from drivepipe._stats import RunStats
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import (
    Credentials,
    Endpoint,
    resolve_credentials,
    resolve_endpoint,
)
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.drives import Drive, delete_drive, get_drive, list_drives
from drivepipe.cloudsigma.upload import UploadOptions
from drivepipe.jobs.download import DownloadOptions, DownloadResult, download, open_remote
from drivepipe.jobs.images import (
    LOCAL_QUEUE_DEPTH,
    ConvertResult,
    ImageInfo,
    ReadOptions,
    checksum,
    convert,
    inspect,
    open_input,
)
from drivepipe.jobs.upload import UploadResult, upload, upload_stream
from drivepipe.transport.curl import UUID_RE, TlsOptions

#: where the notes of a job go (a command prints them on stderr)
Notify = Callable[[str], None]

#: ``drive:UUID`` (or a bare UUID) as a copy's source; ``drive:`` / ``drive:NAME`` as its
#: destination (a new drive)
DRIVE_PREFIX = "drive:"
_UUID = re.compile(UUID_RE.pattern.strip("^$"))


@dataclass(frozen=True)
class CopyResult:
    """What a copy made: a drive (``uuid``) or an output (``output``), and its digest."""

    #: ``upload``, ``download``, ``drive-to-drive`` or ``convert``
    kind: str
    size: int
    #: xxh3-128 of the raw bytes (None for a convert, which does not hash)
    xxh128: str | None
    uuid: str | None = None
    output: str | None = None


def drive_ref(spec: str) -> str | None:
    """The UUID a copy's source names (``drive:UUID`` or a bare UUID), else None."""
    text = spec[len(DRIVE_PREFIX):] if spec.startswith(DRIVE_PREFIX) else spec
    if UUID_RE.match(text):
        return text.lower()
    if spec.startswith(DRIVE_PREFIX):
        raise UsageError(f"{spec!r}: a drive source is drive:UUID")
    return None


def new_drive(spec: str) -> tuple[bool, str | None]:
    """Whether a copy's destination is a new drive (``drive:`` or ``drive:NAME``), and the
    name it asks for."""
    if not spec.startswith(DRIVE_PREFIX):
        return False, None
    name = spec[len(DRIVE_PREFIX):]
    if _UUID.fullmatch(name):
        raise UsageError(f"{spec!r}: a copy makes a new drive (drive:NAME); it does not "
                         "write into an existing one")
    return True, name or None


class Client:
    """An endpoint and an account, and the transfers against them.

    ``endpoint`` is the API base (``https://zrh.cloudsigma.com/api/2.0/``); None
    takes it from ``location``, ``DRIVEPIPE_ENDPOINT`` or ``~/.cloudsigma.conf``
    like the CLI.  ``user``/``password`` default to the environment, the config
    file and ``~/.netrc`` (prompted for only with ``prompt=True``, or ``None``: when
    standard input is a terminal).  ``limit_rate`` caps the
    bytes a second of each transfer over all its connections (0: none).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        direct_endpoint: str | None = None,
        location: str | None = None,
        cacert: str | None = None,
        insecure_http: bool = False,
        limit_rate: int = 0,
        stall_timeout: float = 120.0,
        prompt: bool | None = False,
    ) -> None:
        self.endpoint: Endpoint = resolve_endpoint(endpoint, direct_endpoint, location)
        if password is not None:
            if not user:
                raise ConfigError("a password was given without a user")
            self.creds = Credentials(user, password)
        else:
            self.creds = resolve_credentials(self.endpoint, user, prompt=prompt)
        self.tls = TlsOptions(cacert=cacert, insecure_http=insecure_http,
                              limit_rate=limit_rate, stall_timeout=stall_timeout)
        self._api: ApiClient | None = None

    def __repr__(self) -> str:
        return f"Client({self.endpoint.api!r}, user={self.creds.username!r})"

    # -- the connection --

    @property
    def api(self) -> ApiClient:
        """The JSON API client (made on first use; the direct host resolved then)."""
        if self._api is None:
            api = ApiClient(self.endpoint, self.creds, self.tls)
            try:
                self.endpoint = api.endpoint = api.resolve_direct()
            except BaseException:
                api.close()
                raise
            self._api = api
        return self._api

    def connection(self, connections: int = 1) -> Connection:
        """A fresh connection of its own (handles are not shared between threads);
        ``connections`` splits the rate cap over that many parallel transfers."""
        endpoint = self.api.endpoint
        tls = self.tls.shared(connections)
        return Connection(endpoint, self.creds, tls, ApiClient(endpoint, self.creds, tls))

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- transfers --

    def upload(
        self,
        image: str,
        *,
        name: str | None = None,
        chunked: bool = False,
        chunk_size: int = 32 << 20,
        connections: int = 4,
        options: UploadOptions | None = None,
        read: ReadOptions | None = None,
        stats: RunStats | None = None,
        notify: Notify | None = None,
        handle_signals: bool = False,
    ) -> UploadResult:
        """Upload the raw disk of ``image`` (a path, ``-`` or a URL) into a new drive.

        Direct: one POST of exactly the raw size.  ``chunked``: resumable chunks over
        ``connections``; calling again with the same image continues a killed upload.
        ``options`` gives every other knob (see :class:`UploadOptions`)."""
        opts = options or UploadOptions()
        opts = replace(opts, name=name if name is not None else opts.name,
                       chunked=chunked or opts.chunked, chunk_size=chunk_size,
                       connections=connections)
        read = read or ReadOptions()
        if read.notify is None:
            read = replace(read, notify=notify)
        with self.connection(connections if opts.is_chunked else 1) as conn:
            return upload(image, connection=conn, options=opts, read=read, stats=stats,
                          notify=notify, handle_signals=handle_signals)

    def download(
        self,
        source: str,
        output: str | None = None,
        *,
        connections: int = 4,
        expect: str | None = None,
        force: bool = False,
        options: DownloadOptions | None = None,
        stats: RunStats | None = None,
        notify: Notify | None = None,
        handle_signals: bool = False,
    ) -> DownloadResult:
        """Download a drive (its UUID) or an http(s) URL to ``output``: a file (sparse,
        resumable, verified, published only when complete), a block device, or ``-``.

        Verified against ``expect`` (``xxh128:HEX``) or the digest our upload stored in
        the drive's meta; nothing is read back from the output to verify it."""
        opts = options or DownloadOptions()
        opts = replace(opts, connections=connections, expect=expect or opts.expect,
                       force=force or opts.force)
        endpoint = self.api.endpoint
        return download(source, output, auth=Auth(endpoint, self.creds),
                        tls=self.tls.shared(connections), options=opts, stats=stats,
                        notify=notify, handle_signals=handle_signals)

    def copy(
        self,
        src: str,
        dst: str,
        *,
        to: Client | None = None,
        connections: int = 4,
        chunked: bool = False,
        expect: str | None = None,
        force: bool = False,
        read: ReadOptions | None = None,
        stats: RunStats | None = None,
        notify: Notify | None = None,
        handle_signals: bool = False,
    ) -> CopyResult:
        """:func:`copy` with this client as the source's (and, unless ``to``, the new
        drive's) client."""
        return copy(src, dst, client=self, to=to, connections=connections, chunked=chunked,
                    expect=expect, force=force, read=read, stats=stats, notify=notify,
                    handle_signals=handle_signals)

    # -- drives --

    def drives(self) -> list[Drive]:
        """Every drive of the account."""
        return list_drives(self.api)

    def drive(self, uuid: str) -> Drive:
        return get_drive(self.api, uuid)

    def delete(self, uuid: str) -> None:
        delete_drive(self.api, uuid)


def needs_client(src: str, dst: str) -> bool:
    """Whether a copy from ``src`` to ``dst`` involves a drive (and so an endpoint)."""
    return drive_ref(src) is not None or new_drive(dst)[0]


def copy(
    src: str,
    dst: str,
    *,
    client: Client | None = None,
    to: Client | None = None,
    connections: int = 4,
    chunked: bool = False,
    expect: str | None = None,
    force: bool = False,
    read: ReadOptions | None = None,
    queue_depth: int = LOCAL_QUEUE_DEPTH,
    stats: RunStats | None = None,
    notify: Notify | None = None,
    handle_signals: bool = False,
) -> CopyResult:
    """Any source to any target, streaming, with the guarantees of each side.

    ``src``: an image (a path, ``-``, an http(s) URL) or a drive (``drive:UUID`` or a
    bare UUID) of ``client``.  ``dst``: a new drive (``drive:`` or ``drive:NAME``) of
    ``to`` (default: ``client``; another one copies between accounts or locations), or
    any output of :func:`convert` (a file, a directory, a block device, ``-``,
    ``NAME:ARG``): an image to such an output needs no client at all.  A drive's bytes
    are verified against its meta on the way (a drive-to-drive copy that does not
    verify leaves no drive)."""
    uuid = drive_ref(src)
    to_drive, name = new_drive(dst)
    if uuid is None and not to_drive:
        done = convert(src, dst, read=read, force=force, queue_depth=queue_depth, stats=stats)
        return CopyResult("convert", done.size, None, output=done.output)
    if client is None:
        raise ConfigError(f"copying {src} to {dst} involves a drive: it needs a client (an "
                          "endpoint and an account)")
    target = to or client
    if uuid is None:
        sent = target.upload(src, name=name, chunked=chunked, connections=connections,
                             read=read, stats=stats, notify=notify,
                             handle_signals=handle_signals)
        return CopyResult("upload", sent.size, sent.xxh128, uuid=sent.uuid)
    if not to_drive:
        got = client.download(uuid, dst, connections=connections, expect=expect, force=force,
                              stats=stats, notify=notify, handle_signals=handle_signals)
        return CopyResult("download", got.size, got.xxh128, uuid=uuid, output=got.output)
    return _drive_to_drive(client, uuid, target, name, connections, chunked, expect, stats,
                           notify)


def _drive_to_drive(
    client: Client, uuid: str, target: Client, name: str | None, connections: int,
    chunked: bool, expect: str | None, stats: RunStats | None, notify: Notify | None,
) -> CopyResult:
    """Download from ``client`` and upload to ``target`` at once: the ranges come in order
    over ``connections``, are verified as they flow, and are sent as one direct upload
    (or chunks); a mismatch fails before the upload ends, so no drive is left."""
    if name is None:
        name = client.drive(uuid).name
    remote = open_remote(uuid, auth=Auth(client.api.endpoint, client.creds),
                         tls=client.tls.shared(connections),
                         options=DownloadOptions(connections=connections, expect=expect))
    try:
        with target.connection(connections if chunked else 1) as conn:
            sent = upload_stream(
                cast(Source, remote.receiver), remote.stages, remote.size, connection=conn,
                options=UploadOptions(chunked=chunked, connections=connections),
                stats=stats, notify=notify, name=name, label=f"drive {uuid}")
    except BaseException:
        remote.receiver.close()
        raise
    return CopyResult("drive-to-drive", sent.size, sent.xxh128, uuid=sent.uuid)


__all__ = [
    "Client",
    "ConvertResult",
    "CopyResult",
    "DownloadOptions",
    "DownloadResult",
    "ImageInfo",
    "Notify",
    "ReadOptions",
    "UploadOptions",
    "UploadResult",
    "checksum",
    "convert",
    "copy",
    "inspect",
    "needs_client",
    "open_input",
]

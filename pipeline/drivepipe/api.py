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

from collections.abc import Callable
from types import TracebackType

from drivepipe._errors import ConfigError
from drivepipe.cloudsigma.config import (
    Credentials,
    Endpoint,
    resolve_credentials,
    resolve_endpoint,
)
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.drives import Drive, delete_drive, get_drive, list_drives
from drivepipe.jobs.images import (
    ConvertResult,
    ImageInfo,
    ReadOptions,
    checksum,
    convert,
    inspect,
    open_input,
)
from drivepipe.transport.http import ApiClient, TlsOptions

#: where the notes of a job go (a command prints them on stderr)
Notify = Callable[[str], None]


class Client:
    """An endpoint and an account, and the transfers against them.

    ``endpoint`` is the API base (``https://zrh.cloudsigma.com/api/2.0/``); None
    takes it from ``location``, ``DRIVEPIPE_ENDPOINT`` or ``~/.cloudsigma.conf``
    like the CLI.  ``user``/``password`` default to the environment, the config
    file and ``~/.netrc`` (never prompted for here).  ``limit_rate`` caps the
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
    ) -> None:
        self.endpoint: Endpoint = resolve_endpoint(endpoint, direct_endpoint, location)
        if password is not None:
            if not user:
                raise ConfigError("a password was given without a user")
            self.creds = Credentials(user, password)
        else:
            self.creds = resolve_credentials(self.endpoint, user, prompt=False)
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

    # -- drives --

    def drives(self) -> list[Drive]:
        """Every drive of the account."""
        return list_drives(self.api)

    def drive(self, uuid: str) -> Drive:
        return get_drive(self.api, uuid)

    def delete(self, uuid: str) -> None:
        delete_drive(self.api, uuid)


__all__ = [
    "Client",
    "ConvertResult",
    "ImageInfo",
    "Notify",
    "ReadOptions",
    "checksum",
    "convert",
    "inspect",
    "open_input",
]

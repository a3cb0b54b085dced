"""Options and set-up shared by the commands that talk to an endpoint.

The six account options (``--endpoint``, ``--direct-endpoint``, ``--location``,
``--user``, ``--cacert``, ``--insecure-http``) are declared once, as the fields of
:class:`Account`: a command decorated with :func:`~drivepipe.cli._common.grouped_options`
takes one ``account: Account = FROM_OPTIONS`` parameter instead of the six.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from typing import Annotated

import typer

from drivepipe._errors import UsageError
from drivepipe._sizes import parse_size
from drivepipe.cli._common import optional
from drivepipe.cloudsigma.connection import Connection, connect
from drivepipe.transport.curl import TlsOptions

EndpointOpt = Annotated[str | None, optional(
    "--endpoint", "URL", "API base URL ending in /api/2.0/ (env DRIVEPIPE_ENDPOINT, or "
    "api_endpoint in ~/.cloudsigma.conf).")]
DirectOpt = Annotated[str | None, optional(
    "--direct-endpoint", "URL", "Base URL of the direct (bytes) host, if it differs from "
    "the API host.")]
LocationOpt = Annotated[str | None, optional(
    "--location", "CODE", "CloudSigma location code (zrh, sjc, ...); the direct host comes "
    "from GET /locations/.")]
UserOpt = Annotated[str | None, optional(
    "--user", "EMAIL", "Account e-mail (env CLOUDSIGMA_USERNAME). The password is never "
    "taken from the command line: CLOUDSIGMA_PASSWORD, ~/.cloudsigma.conf, ~/.netrc, or a "
    "prompt.")]
CacertOpt = Annotated[str | None, optional(
    "--cacert", "PATH", "PEM file of the CA that signed the server's certificate.")]
LimitRateOpt = Annotated[str | None, optional(
    "--limit-rate", "RATE", "Bytes a second at most, over all connections, as curl's "
    "--limit-rate (50M: 50 MiB/s).")]
StallOpt = Annotated[
    float,
    typer.Option("--stall-timeout", metavar="SECONDS", help="A connection that moves no byte "
                 "for this long is cut, retried where the transfer can be, else the command "
                 "fails in one line."),
]
InsecureHttpOpt = Annotated[
    bool,
    typer.Option("--insecure-http", help="Allow sending the password over plain http to a "
        "non-loopback host."),
]


@dataclass(frozen=True)
class Account:
    """Where to connect and as whom, as the six account options give it."""

    endpoint: EndpointOpt = None
    direct_endpoint: DirectOpt = None
    location: LocationOpt = None
    user: UserOpt = None
    cacert: CacertOpt = None
    insecure_http: InsecureHttpOpt = False

    def given(self) -> bool:
        """True when any of the options was given on the command line."""
        return any(astuple(self))

    def tls(self, limit_rate: str | None = None, stall_timeout: float = 120.0,
            connections: int = 1) -> TlsOptions:
        """The transport policy of this account's options and ``--limit-rate`` /
        ``--stall-timeout`` (see :func:`transport`)."""
        return transport(self.cacert, self.insecure_http, limit_rate, stall_timeout,
                         connections)

    def connect(self, tls: TlsOptions | None = None) -> Connection:
        """Resolve endpoint and credentials (env, config files, a prompt) and connect."""
        return connect(self.endpoint, self.direct_endpoint, self.location, self.user,
                       self.cacert, self.insecure_http, tls)

    @contextmanager
    def connection(self, tls: TlsOptions | None = None) -> Iterator[Connection]:
        """:meth:`connect`, closed when the block ends."""
        conn = self.connect(tls)
        try:
            yield conn
        finally:
            conn.close()


def transport(
    cacert: str | None,
    insecure_http: bool,
    limit_rate: str | None = None,
    stall_timeout: float = 120.0,
    connections: int = 1,
) -> TlsOptions:
    """The transport policy from the options; ``--limit-rate`` split over ``connections``."""
    try:
        rate = parse_size(limit_rate) if limit_rate else 0
    except UsageError as exc:
        raise UsageError(f"--limit-rate: {exc}") from None
    if limit_rate and rate <= 0:
        raise UsageError("--limit-rate must be more than 0 bytes a second")
    if stall_timeout < 1:
        raise UsageError("--stall-timeout must be at least 1 second")
    tls = TlsOptions(cacert=cacert, insecure_http=insecure_http, limit_rate=rate,
                     stall_timeout=stall_timeout)
    return tls.shared(connections)


__all__ = ["Account", "Connection", "connect", "transport"]

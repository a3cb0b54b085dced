"""Options and set-up shared by the commands that talk to an endpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from drivepipe._errors import UsageError
from drivepipe._sizes import parse_size
from drivepipe.cloudsigma.connection import Connection, connect
from drivepipe.transport.curl import TlsOptions

EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint", metavar="URL",
        help="API base URL ending in /api/2.0/ (env DRIVEPIPE_ENDPOINT, "
        "or api_endpoint in ~/.cloudsigma.conf).", show_default=False),
]
DirectOpt = Annotated[
    str | None,
    typer.Option(
        "--direct-endpoint", metavar="URL",
        help="Base URL of the direct (bytes) host, if it differs "
        "from the API host.", show_default=False),
]
LocationOpt = Annotated[
    str | None,
    typer.Option(
        "--location", metavar="CODE",
        help="CloudSigma location code (zrh, sjc, ...); the direct host "
        "comes from GET /locations/.", show_default=False),
]
UserOpt = Annotated[
    str | None,
    typer.Option(
        "--user", metavar="EMAIL",
        help="Account e-mail (env CLOUDSIGMA_USERNAME). The password is "
        "never taken from the command line: CLOUDSIGMA_PASSWORD, ~/.cloudsigma.conf, "
        "~/.netrc, or a prompt.", show_default=False),
]
CacertOpt = Annotated[
    str | None,
    typer.Option(
        "--cacert", metavar="PATH",
        help="PEM file of the CA that signed the server's certificate.",
                 show_default=False),
]
LimitRateOpt = Annotated[
    str | None,
    typer.Option("--limit-rate", metavar="RATE", help="Bytes a second at most, over all "
                 "connections, as curl's --limit-rate (50M: 50 MiB/s).", show_default=False),
]
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


__all__ = ["Connection", "connect", "transport"]

"""Options and set-up shared by the commands that talk to an endpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from .._config import Credentials, Endpoint, resolve_credentials, resolve_endpoint
from .._http import ApiClient, TlsOptions

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
InsecureHttpOpt = Annotated[
    bool,
    typer.Option("--insecure-http", help="Allow sending the password over plain http to a "
        "non-loopback host."),
]


@dataclass
class Connection:
    endpoint: Endpoint
    creds: Credentials
    tls: TlsOptions
    api: ApiClient

    def close(self) -> None:
        self.api.close()


def connect(
    endpoint: str | None,
    direct_endpoint: str | None,
    location: str | None,
    user: str | None,
    cacert: str | None,
    insecure_http: bool,
) -> Connection:
    """Resolve endpoint and credentials from the options, env and config files."""
    ep = resolve_endpoint(endpoint, direct_endpoint, location)
    creds = resolve_credentials(ep, user)
    tls = TlsOptions(cacert=cacert, insecure_http=insecure_http)
    api = ApiClient(ep, creds, tls)
    ep = api.resolve_direct()
    return Connection(ep, creds, tls, api)

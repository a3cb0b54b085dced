"""A connection to a CloudSigma endpoint: who we are, where, and the API client."""

from __future__ import annotations

from dataclasses import dataclass

from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import (
    Credentials,
    Endpoint,
    resolve_credentials,
    resolve_endpoint,
)
from drivepipe.transport.curl import TlsOptions


@dataclass
class Connection:
    endpoint: Endpoint
    creds: Credentials
    tls: TlsOptions
    api: ApiClient

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    endpoint: str | None,
    direct_endpoint: str | None,
    location: str | None,
    user: str | None,
    cacert: str | None,
    insecure_http: bool,
    tls: TlsOptions | None = None,
) -> Connection:
    """Resolve endpoint and credentials from the arguments, env and config files."""
    ep = resolve_endpoint(endpoint, direct_endpoint, location)
    creds = resolve_credentials(ep, user)
    tls = tls or TlsOptions(cacert=cacert, insecure_http=insecure_http)
    api = ApiClient(ep, creds, tls)
    ep = api.resolve_direct()
    return Connection(ep, creds, tls, api)

"""Old home of the transport: re-exports :mod:`.curl` and the API client.

Kept only until every importer uses :mod:`drivepipe.transport.curl`,
:mod:`drivepipe.transport.retry` and :mod:`drivepipe.cloudsigma.api` directly; new code
must not import this module.
"""

from __future__ import annotations

from drivepipe.cloudsigma.api import ApiClient
from drivepipe.transport.curl import (
    UUID_RE,
    HeaderCollector,
    Response,
    TlsOptions,
    check_auth_transport,
    configure,
    curl_failure,
    error_detail,
    http_failure,
    parse_uuid,
    safe_url,
)
from drivepipe.transport.retry import TRANSIENT_CURL

__all__ = [
    "TRANSIENT_CURL",
    "UUID_RE",
    "ApiClient",
    "HeaderCollector",
    "Response",
    "TlsOptions",
    "check_auth_transport",
    "configure",
    "curl_failure",
    "error_detail",
    "http_failure",
    "parse_uuid",
    "safe_url",
]

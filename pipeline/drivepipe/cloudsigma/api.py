"""The CloudSigma JSON API of one endpoint and account: drives, locations, capabilities.

:class:`ApiClient` holds one curl handle for keep-alive, so use one client per thread.
Each request is set up by :func:`~drivepipe.transport.curl.configure` (credentials only
to the endpoint's origin), translated by :class:`~drivepipe.transport.curl.Exchange` and
retried by the one :class:`~drivepipe.transport.retry.RetryPolicy` (``API_POLICY`` unless
given): transient answers and network failures for idempotent methods, and for a POST
only what the server surely did not act on (408, 429, 503, no connection), so that a
repeated ``initupload`` never makes a second drive.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import pycurl

from drivepipe._errors import TransferError
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.transport.curl import Exchange, Response, TlsOptions, configure
from drivepipe.transport.retry import API_POLICY, RetryPolicy

_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})


class ApiClient:
    """The JSON API of one endpoint with one account.  Not thread-safe."""

    def __init__(
        self, endpoint: Endpoint, creds: Credentials, tls: TlsOptions | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.creds = creds
        self.tls = tls or TlsOptions()
        self.policy = policy or API_POLICY
        self._curl = pycurl.Curl()

    def close(self) -> None:
        self._curl.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(
        self, path: str, query: Mapping[str, object] | None = None, direct: bool = False
    ) -> str:
        base = self.endpoint.direct if direct else self.endpoint.api
        url = urljoin(base, path.lstrip("/"))
        return f"{url}?{urlencode(query)}" if query else url

    def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        json_body: object = None,
        what: str | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        timeout: float = 120.0,
        idempotent: bool | None = None,
    ) -> Response:
        """``method url`` with the policy's retries; ``idempotent`` defaults from the method."""
        if json_body is not None:
            body = json.dumps(json_body).encode()
        label = what or f"{method} {urlsplit(url).path}"
        repeatable = method in _IDEMPOTENT if idempotent is None else idempotent
        return self.policy.call(
            lambda: self._once(method, url, body, json_body is not None, label, ok, timeout),
            idempotent=repeatable)

    def _once(
        self, method: str, url: str, body: bytes | None, is_json: bool, label: str,
        ok: tuple[int, ...], timeout: float,
    ) -> Response:
        c = self._curl
        c.reset()
        headers = {"Accept": "application/json"}
        if is_json:
            headers["Content-Type"] = "application/json"
        configure(c, url, tls=self.tls, endpoint=self.endpoint, creds=self.creds,
                  headers=headers)
        c.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
        c.setopt(pycurl.CUSTOMREQUEST, method)
        if body is not None:
            c.setopt(pycurl.POSTFIELDS, body)
        elif method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        exchange = Exchange(c, url, label, limit=1 << 30)  # JSON lists can be long
        try:
            c.perform()
        except pycurl.error as exc:
            return exchange.outcome(c, exc, ok)
        return exchange.outcome(c, None, ok)

    def get_json(self, path: str, query: Mapping[str, object] | None = None) -> Any:
        return self.request("GET", self.url(path, query)).json()

    def drive(self, uuid: str) -> dict[str, Any]:
        data = self.request("GET", self.url(f"drives/{uuid}/"), what=f"get drive {uuid}").json()
        if not isinstance(data, dict):
            raise TransferError(f"drive {uuid}: unexpected answer")
        return data

    def update_drive(
        self, uuid: str, *, name: str | None = None, meta: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Set ``name`` and merge ``meta`` into the drive's meta, keeping its other fields."""
        drive = self.drive(uuid)
        merged = dict(drive.get("meta") or {})
        merged.update(meta or {})
        payload = {
            "name": name if name is not None else drive.get("name", ""),
            "size": drive.get("size"),
            "media": drive.get("media", "disk"),
            "meta": merged,
        }
        resp = self.request("PUT", self.url(f"drives/{uuid}/"), json_body=payload,
                            what=f"update drive {uuid}")
        data = resp.json()
        return data if isinstance(data, dict) else payload

    def resolve_direct(self) -> Endpoint:
        """The endpoint with its direct base taken from ``GET /locations/`` when guessed."""
        if not self.endpoint.direct_guessed:
            return self.endpoint
        try:
            data = self.get_json("locations/")
        except TransferError:
            return self.endpoint  # fall back to direct.{loc}.cloudsigma.com
        api_host = urlsplit(self.endpoint.api).hostname
        for loc in data.get("objects", []) if isinstance(data, dict) else []:
            if not isinstance(loc, dict) or not loc.get("upload_url"):
                continue
            if urlsplit(str(loc.get("api_endpoint", ""))).hostname == api_host or (
                    str(loc.get("id", "")).lower() == (self.endpoint.location or "")):
                self.endpoint = self.endpoint.with_direct(str(loc["upload_url"]))
                break
        return self.endpoint


__all__ = ["ApiClient"]

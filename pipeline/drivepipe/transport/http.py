"""pycurl at the boundary: handles configured safely, errors translated once.

Everything that talks HTTP goes through :func:`configure` so that the same
rules hold everywhere: HTTP/1.1, TLS verification on (``cacert`` for a private
CA), no ``Expect: 100-continue``, Basic credentials attached only to URLs on a
configured endpoint's origin and never over plain HTTP to a non-loopback host
without ``insecure_http``, and never re-sent after a redirect to another
host (libcurl's ``UNRESTRICTED_AUTH`` stays off).  :func:`curl_failure` and
:func:`http_failure` turn pycurl errors and HTTP error answers into one clear
line with the ``X-REQUEST-ID``.

:class:`ApiClient` speaks the JSON API (drives, locations, capabilities).  It
holds one curl handle for keep-alive, so use one client per thread.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from io import BytesIO
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import pycurl

from drivepipe._errors import AuthError, ConfigError, HTTPError, NetworkError, TransferError
from drivepipe.cloudsigma.config import Credentials, Endpoint, is_loopback
from drivepipe.transport.retry import TRANSIENT_CURL, retry_after_of

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}$")
USER_AGENT = "drivepipe/0.1"

#: curl error codes worth a friendlier word than libcurl's own
_CURL_WORDS = {
    pycurl.E_COULDNT_RESOLVE_HOST: "cannot resolve host",
    pycurl.E_COULDNT_CONNECT: "cannot connect",
    pycurl.E_OPERATION_TIMEDOUT: "timed out",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
    pycurl.E_PEER_FAILED_VERIFICATION: "TLS certificate not trusted (use --cacert for a "
                                       "private CA)",
    pycurl.E_GOT_NOTHING: "server closed the connection without answering",
    pycurl.E_SEND_ERROR: "connection broken while sending",
    pycurl.E_RECV_ERROR: "connection broken while receiving",
    pycurl.E_PARTIAL_FILE: "transfer cut short",
    pycurl.E_TOO_MANY_REDIRECTS: "too many redirects",
}
#: attempts of one JSON API call while the server says "retry later" (503, 429), or while
#: the connection breaks under an idempotent method; the API documents 503 as "retry later"
API_ATTEMPTS = 4
API_BACKOFF = 0.25
_RETRY_LATER = frozenset({429, 503})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})


@dataclass(frozen=True)
class TlsOptions:
    """Transport policy: private CA, and whether plain-HTTP auth is allowed."""

    cacert: str | None = None
    insecure_http: bool = False
    connect_timeout: float = 30.0
    #: abort a transfer that moves fewer than 1 byte/s for this long
    stall_timeout: float = 120.0
    #: bytes a second at most, per transfer (libcurl's MAX_SEND/RECV_SPEED); 0: no cap
    limit_rate: int = 0

    def shared(self, connections: int) -> TlsOptions:
        """The same policy with ``limit_rate`` split over ``connections`` transfers."""
        if not self.limit_rate or connections <= 1:
            return self
        return replace(self, limit_rate=max(1, self.limit_rate // connections))


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    url: str = ""

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise TransferError(f"{self.url}: answer is not JSON (HTTP {self.status})") from exc


class HeaderCollector:
    """HEADERFUNCTION target: keeps the headers of the last response (after redirects)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        #: the blank line ending the header section arrived; libcurl reports an answer
        #: cut inside its headers as a success with an empty body, this tells them apart
        self.complete = False

    def __call__(self, line: bytes) -> None:
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text.startswith("HTTP/"):
            parts = text.split(None, 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}
            self.complete = False
        elif not text:
            self.complete = True
        elif ":" in text:
            key, _, value = text.partition(":")
            self.headers[key.strip().lower()] = value.strip()


def safe_url(url: str) -> str:
    """``url`` without query string (signed links carry secrets there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def check_auth_transport(url: str, tls: TlsOptions) -> None:
    """Refuse to send Basic credentials in clear text over a real network."""
    if urlsplit(url).scheme == "http" and not is_loopback(url) and not tls.insecure_http:
        host = urlsplit(url).netloc
        raise ConfigError(f"refusing to send the password over plain http to {host}; use "
                          "https, or --insecure-http if you really mean it")


def configure(
    c: pycurl.Curl,
    url: str,
    *,
    tls: TlsOptions,
    endpoint: Endpoint | None = None,
    creds: Credentials | None = None,
    headers: Mapping[str, str] | None = None,
    follow: bool = False,
) -> None:
    """Set the options every drivepipe request shares on a fresh or reset handle."""
    c.setopt(pycurl.URL, url)
    c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
    c.setopt(pycurl.NOSIGNAL, 1)
    c.setopt(pycurl.USERAGENT, USER_AGENT)
    c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    c.setopt(pycurl.CONNECTTIMEOUT_MS, int(tls.connect_timeout * 1000))
    c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
    c.setopt(pycurl.LOW_SPEED_TIME, max(1, int(tls.stall_timeout)))
    c.setopt(pycurl.MAX_SEND_SPEED_LARGE, tls.limit_rate)
    c.setopt(pycurl.MAX_RECV_SPEED_LARGE, tls.limit_rate)
    c.setopt(pycurl.SSL_VERIFYPEER, 1)
    c.setopt(pycurl.SSL_VERIFYHOST, 2)
    if tls.cacert:
        c.setopt(pycurl.CAINFO, tls.cacert)
    c.setopt(pycurl.FOLLOWLOCATION, 1 if follow else 0)
    c.setopt(pycurl.MAXREDIRS, 10)
    # Credentials go to the original host only, never to a redirect target elsewhere.
    c.setopt(pycurl.UNRESTRICTED_AUTH, 0)
    if creds is not None and endpoint is not None and endpoint.owns(url):
        check_auth_transport(url, tls)
        c.setopt(pycurl.HTTPAUTH, pycurl.HTTPAUTH_BASIC)
        c.setopt(pycurl.USERNAME, creds.username)
        c.setopt(pycurl.PASSWORD, creds.password)
    lines = [f"{k}: {v}" for k, v in (headers or {}).items()]
    c.setopt(pycurl.HTTPHEADER, [*lines, "Expect:"])


def curl_failure(exc: pycurl.error, url: str, what: str = "request") -> NetworkError:
    """Translate a pycurl error into one line naming the host, never the credentials."""
    code = exc.args[0] if exc.args else 0
    detail = exc.args[1] if len(exc.args) > 1 else ""
    word = _CURL_WORDS.get(code, detail or f"curl error {code}")
    err = NetworkError(f"{what} to {urlsplit(url).netloc} failed: {word}")
    err.transient = code in TRANSIENT_CURL
    err.curl_code = code
    return err


def error_detail(body: bytes) -> str:
    """The documented JSON error list as ``type: message (point)``; else a short body."""
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return " ".join(text.split())[:200]
    items = data if isinstance(data, list) else [data]
    parts = []
    for item in items:
        if isinstance(item, dict) and ("error_message" in item or "error_type" in item):
            msg = f"{item.get('error_type', 'error')}: {item.get('error_message', '')}"
            if item.get("error_point"):
                msg += f" ({item['error_point']})"
            parts.append(msg)
    return "; ".join(parts) if parts else " ".join(str(data).split())[:200]


def http_failure(resp: Response, what: str) -> HTTPError:
    """One line for an HTTP error answer, with the server's words and request id."""
    detail = error_detail(resp.body)
    rid = f" [request {resp.request_id}]" if resp.request_id else ""
    where = urlsplit(resp.url).netloc
    msg = f"{what} failed: HTTP {resp.status} from {where}" + (f": {detail}" if detail else "")
    cls = AuthError if resp.status in (401, 403) else HTTPError
    if resp.status == 401:
        msg = f"{what} failed: authentication refused by {where} (HTTP 401, wrong user or " \
              f"password?)" + (f": {detail}" if detail else "")
    return cls(msg + rid, resp.status, resp.request_id, retry_after_of(resp.headers))


def parse_uuid(body: bytes) -> str:
    """The drive UUID of an upload answer: plain text, or JSON ``uuid``/``objects[0].uuid``."""
    text = body.decode("utf-8", "replace").strip()
    candidate = text
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            objects = data.get("objects")
            if isinstance(objects, list) and objects and isinstance(objects[0], dict):
                candidate = str(objects[0].get("uuid", ""))
            else:
                candidate = str(data.get("uuid", ""))
    candidate = candidate.strip().strip('"')
    if not UUID_RE.match(candidate):
        raise TransferError(f"upload answer holds no drive UUID: {text[:80]!r}")
    return candidate.lower()


def _backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1-based): doubling, with jitter."""
    return float(API_BACKOFF * 2 ** (attempt - 1) * (0.5 + random.random() / 2))


class ApiClient:
    """The JSON API of one endpoint with one account.  Not thread-safe."""

    def __init__(self, endpoint: Endpoint, creds: Credentials, tls: TlsOptions | None = None):
        self.endpoint = endpoint
        self.creds = creds
        self.tls = tls or TlsOptions()
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
    ) -> Response:
        c = self._curl
        c.reset()
        headers = {"Accept": "application/json"}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        configure(c, url, tls=self.tls, endpoint=self.endpoint, creds=self.creds,
                  headers=headers)
        c.setopt(pycurl.TIMEOUT_MS, int(timeout * 1000))
        c.setopt(pycurl.CUSTOMREQUEST, method)
        if body is not None:
            c.setopt(pycurl.POSTFIELDS, body)
        elif method == "HEAD":
            c.setopt(pycurl.NOBODY, 1)
        out = BytesIO()
        hdr = HeaderCollector()
        c.setopt(pycurl.WRITEDATA, out)
        c.setopt(pycurl.HEADERFUNCTION, hdr)
        label = what or f"{method} {urlsplit(url).path}"
        for attempt in range(1, API_ATTEMPTS + 1):
            out.seek(0)
            out.truncate()
            try:
                c.perform()
            except pycurl.error as exc:
                failure: TransferError = curl_failure(exc, url, label)
                if not (failure.transient and method in _IDEMPOTENT) or attempt == API_ATTEMPTS:
                    raise failure from exc
            else:
                resp = Response(c.getinfo(pycurl.RESPONSE_CODE), hdr.headers, out.getvalue(),
                                url)
                if not hdr.complete:
                    cut = NetworkError(f"{label} to {urlsplit(url).netloc} failed: the answer "
                                       "was cut off in its headers")
                    if method not in _IDEMPOTENT or attempt == API_ATTEMPTS:
                        raise cut
                elif resp.status in ok:
                    return resp
                elif resp.status not in _RETRY_LATER or attempt == API_ATTEMPTS:
                    raise http_failure(resp, label)
            time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")  # the last attempt returned or raised

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

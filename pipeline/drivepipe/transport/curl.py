"""pycurl at the boundary: handles configured safely, answers collected, errors translated once.

Everything that talks HTTP goes through :func:`configure` so that the same rules hold
everywhere: HTTP/1.1, TLS verification on (``cacert`` for a private CA), no
``Expect: 100-continue``, a stall timeout and a rate cap (:class:`TlsOptions`), Basic
credentials attached only to URLs on a configured endpoint's origin and never over plain
HTTP to a non-loopback host unless ``insecure_http``, and never re-sent after a redirect
to another host (libcurl's ``UNRESTRICTED_AUTH`` stays off).

:class:`Exchange` is one request on a handle: it collects the answer's headers and (the
first 64 KiB of) its body, and :meth:`Exchange.outcome` turns whatever happened - a curl
error, an answer cut off in its headers, an HTTP error status - into one
:class:`~drivepipe.TransferError` whose line names the host (never the credentials) and
the ``X-REQUEST-ID``, classified by :mod:`drivepipe.transport.retry`.  Retrying is the
caller's loop with the one :class:`~drivepipe.transport.retry.RetryPolicy`.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, Final
from urllib.parse import urlsplit

import pycurl

from drivepipe._errors import AuthError, ConfigError, HTTPError, NetworkError, TransferError
from drivepipe.cloudsigma.config import Credentials, Endpoint, is_loopback
from drivepipe.transport.retry import TRANSIENT_CURL, retry_after_of

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}$")
USER_AGENT = "drivepipe/0.1"
#: an answer we read into memory (a UUID, a link, JSON, an error list) is at most this long
MAX_ANSWER: Final = 64 << 10

#: curl error codes worth a friendlier word than libcurl's own
_CURL_WORDS = {
    pycurl.E_COULDNT_RESOLVE_HOST: "cannot resolve host",
    pycurl.E_COULDNT_CONNECT: "cannot connect",
    pycurl.E_OPERATION_TIMEDOUT: "timed out",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
    pycurl.E_PEER_FAILED_VERIFICATION: "TLS certificate not trusted (a private CA's "
                                       "certificate must be given)",
    pycurl.E_GOT_NOTHING: "server closed the connection without answering",
    pycurl.E_SEND_ERROR: "connection broken while sending",
    pycurl.E_RECV_ERROR: "connection broken while receiving",
    pycurl.E_PARTIAL_FILE: "transfer cut short",
    pycurl.E_TOO_MANY_REDIRECTS: "too many redirects",
}


@dataclass(frozen=True)
class TlsOptions:
    """Transport policy of every handle: private CA, plain-HTTP auth, timeouts, rate cap."""

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


class CappedAnswer:
    """WRITEFUNCTION target keeping the first ``limit`` bytes of an answer's body."""

    __slots__ = ("_parts", "kept", "limit")

    def __init__(self, limit: int = MAX_ANSWER) -> None:
        self._parts: list[bytes] = []
        self.kept = 0
        self.limit = limit

    def __call__(self, data: bytes) -> None:
        if self.kept < self.limit:
            self._parts.append(data[: self.limit - self.kept])
            self.kept += len(self._parts[-1])

    def body(self) -> bytes:
        return b"".join(self._parts)


def safe_url(url: str) -> str:
    """``url`` without query string (signed links carry secrets there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def check_auth_transport(url: str, tls: TlsOptions) -> None:
    """Refuse to send Basic credentials in clear text over a real network."""
    if urlsplit(url).scheme == "http" and not is_loopback(url) and not tls.insecure_http:
        host = urlsplit(url).netloc
        raise ConfigError(f"refusing to send the password over plain http to {host}; use "
                          "https, or allow plain http explicitly if you really mean it")


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


def cut_off(url: str, what: str) -> NetworkError:
    """An answer that ended inside its headers: the request may or may not have been done."""
    err = NetworkError(f"{what} to {urlsplit(url).netloc} failed: the answer was cut off "
                       "in its headers")
    err.transient = True  # for an idempotent request; see retry.is_transient
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


class Exchange:
    """One request on ``curl`` (configured by the caller): its answer and its outcome.

    Installs the header and body collectors; after ``perform()`` (or a multi handle's
    completion) :meth:`outcome` gives the :class:`Response` of an accepted answer or
    raises the translated failure.
    """

    __slots__ = ("answer", "headers", "url", "what")

    def __init__(self, curl: Any, url: str, what: str, *, limit: int = MAX_ANSWER) -> None:
        self.url = url
        self.what = what
        self.headers = HeaderCollector()
        self.answer = CappedAnswer(limit)
        curl.setopt(pycurl.HEADERFUNCTION, self.headers)
        curl.setopt(pycurl.WRITEFUNCTION, self.answer)

    def response(self, curl: Any) -> Response:
        return Response(int(curl.getinfo(pycurl.RESPONSE_CODE)), self.headers.headers,
                        self.answer.body(), self.url)

    def failure(self, error: pycurl.error) -> TransferError:
        """The error of a failed transfer: the server's answer if it refused early
        (a 503 while we were still sending), else the network's."""
        if self.headers.status >= 400:
            return http_failure(Response(self.headers.status, self.headers.headers,
                                         self.answer.body(), self.url), self.what)
        return curl_failure(error, self.url, self.what)

    def outcome(
        self, curl: Any, error: pycurl.error | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
    ) -> Response:
        """The answer when its status is in ``ok``; else raise what went wrong."""
        if error is not None:
            raise self.failure(error) from error
        if not self.headers.complete:
            raise cut_off(self.url, self.what)
        resp = self.response(curl)
        if resp.status not in ok:
            raise http_failure(resp, self.what)
        return resp


class Interrupts:
    """Ctrl-C during ``perform()``: a flag the callbacks turn into an abort.

    A KeyboardInterrupt raised inside a pycurl callback would be printed by
    pycurl as a traceback; so while curl runs, SIGINT only sets ``requested``
    (in the main thread, see :meth:`catching`), the read callback and this
    XFERINFOFUNCTION (called at least once a second even when the socket is
    stuck) abort the transfer, and the caller raises KeyboardInterrupt after.

    The library installs that handler only when its caller asked for it
    (``handle_signals``: the CLI does); otherwise ``catching`` changes nothing and a
    Ctrl-C is the caller's KeyboardInterrupt as usual.
    """

    __slots__ = ("handle_signals", "requested")

    def __init__(self, handle_signals: bool = True) -> None:
        self.requested = False
        self.handle_signals = handle_signals

    def __call__(self, dltotal: int, dlnow: int, ultotal: int, ulnow: int) -> int:
        return 1 if self.requested else 0

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Route SIGINT to ``requested`` while the block runs (main thread only)."""
        previous = signal.getsignal(signal.SIGINT)
        if (not self.handle_signals or threading.current_thread() is not threading.main_thread()
                or previous is None):
            yield  # only the main thread gets signals; None: a handler not set from Python
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


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


__all__ = [
    "MAX_ANSWER",
    "USER_AGENT",
    "UUID_RE",
    "CappedAnswer",
    "Exchange",
    "HeaderCollector",
    "Interrupts",
    "Response",
    "TlsOptions",
    "check_auth_transport",
    "configure",
    "curl_failure",
    "cut_off",
    "error_detail",
    "http_failure",
    "parse_uuid",
    "safe_url",
]

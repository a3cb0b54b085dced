"""HTTP plumbing shared by every view: answers, errors, auth, request bodies.

Every answer carries ``X-REQUEST-ID`` and a ``Content-Length`` (HTTP/1.1
keep-alive); errors are the documented JSON list.  An answer sent while part
of the request body is still unread closes the connection (the unread bytes
cannot be told from the next request).  Refused here: missing or wrong Basic
credentials (401 with a ``WWW-Authenticate`` challenge), bodies without
``Content-Length`` or with ``Transfer-Encoding`` (411), malformed lengths and
JSON (400), JSON bodies over 1 MiB (413).  A request line and headers that take
longer than ``header_timeout`` in all (slowloris) end the connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import re
import socket
import ssl
import struct
import time
import uuid as uuidlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from drivepipe.server._config import StoreContext
from drivepipe.server._errors import ApiError, validation

log = logging.getLogger("drivepipe.server")

JSON_TYPE: Final = "application/json; charset=utf-8"
MAX_JSON_BODY: Final = 1 << 20
# After an early answer, read and drop at most this much for at most this long.
LINGER_SECONDS: Final = 5.0
LINGER_BYTES: Final = 64 << 20
_HOST_RE: Final = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")


class ClientGone(ConnectionError):
    """The client stopped sending or receiving mid-request."""


class HeadDeadlineIO(socket.SocketIO):
    """The connection's reads; while a request head is awaited, none waits past its deadline."""

    def __init__(self, handler: HandlerBase) -> None:
        super().__init__(handler.connection, "rb")
        self._handler = handler

    def readinto(self, b: Any) -> int | None:
        deadline = self._handler.head_deadline
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head took too long")
            self._handler.connection.settimeout(min(left, self._handler.ctx.config.idle_timeout))
        return super().readinto(b)


class HandlerBase(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "drivepipe-store/0.1"
    # Small JSON answers go out at once instead of waiting for a delayed ACK.
    disable_nagle_algorithm = True

    ctx: StoreContext
    request_id: str
    body_left: int
    replied: bool
    path_only: str
    query: dict[str, str]
    _parsed: bool = False
    #: The connection is being reset on purpose (no lingering close).
    aborted: bool = False
    #: monotonic time by which the current request's line and headers must be in
    head_deadline: float | None = None

    # --- lifecycle --------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.ctx = self.server.context  # type: ignore[attr-defined]  # set by StoreServer
        self.timeout = self.ctx.config.idle_timeout  # type: ignore[misc]  # stdlib reads it per instance
        self._fresh_request()
        super().setup()
        self.rfile = io.BufferedReader(HeadDeadlineIO(self))
        if isinstance(self.connection, ssl.SSLSocket):
            # Done here, in the connection's own thread, under its timeout.
            self.connection.do_handshake()
        else:
            # Bodies are read in blocking mode (see _body): the kernel keeps the timeout.
            whole = int(self.ctx.config.idle_timeout)
            fraction = int((self.ctx.config.idle_timeout - whole) * 1_000_000)
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, fraction)
            )

    def _fresh_request(self) -> None:
        self.request_id = uuidlib.uuid4().hex
        self.body_left = 0
        self.replied = False

    def handle_one_request(self) -> None:
        self.head_deadline = time.monotonic() + self.ctx.config.header_timeout
        try:
            super().handle_one_request()
        finally:
            self.head_deadline = None

    def parse_request(self) -> bool:
        self._fresh_request()
        self._parsed = False
        parsed = super().parse_request()  # reads the headers, under the head deadline
        self.end_of_head()
        return parsed and self.request_facts()

    def end_of_head(self) -> None:
        """The head is in: reads wait the idle timeout again (the body has no deadline)."""
        self.head_deadline = None
        self.connection.settimeout(self.ctx.config.idle_timeout)

    def request_facts(self) -> bool:
        """Path, query and announced body of the parsed request (once per request).

        Runs from ``handle_expect_100`` too, which the stdlib calls from inside
        ``parse_request``.
        """
        if not self._parsed:
            self._parsed = True
            parts = urlsplit(self.path)
            self.path_only = parts.path
            self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            self.body_left = self._announced_body()
        return True

    def _announced_body(self) -> int:
        """Unread body bytes the request announced (1 if unknown, to force a close)."""
        if self.headers.get("Transfer-Encoding"):
            return 1
        length = self.headers.get("Content-Length", "0").strip()
        return int(length) if length.isdigit() else 1

    def log_message(self, format: str, *args: Any) -> None:  # stdlib's name
        log.info("%s %s", self.address_string(), format % args)

    # --- answering --------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self.replied = True
        self.send_header("X-REQUEST-ID", self.request_id)
        if self.body_left > 0:
            self.close_connection = True
            self.send_header("Connection", "close")

    def reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = JSON_TYPE,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        if content_type and status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Type", content_type)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def reply_json(
        self, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.reply(status, json.dumps(obj).encode() + b"\n", JSON_TYPE, headers)

    def reply_error(self, err: ApiError) -> None:
        if self.replied:
            # Too late for an error answer: the client sees a cut connection.
            self.close_connection = True
            return
        self.reply_json(err.status, err.body(), err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, 414, 431, 501...) as JSON."""
        self.close_connection = True
        self.body_left = max(self.body_left, 1)
        kind = "backend" if code >= 500 else "validation"
        text = message or HTTPStatus(code).phrase
        with contextlib.suppress(OSError):  # the client may be gone already
            self.reply_error(ApiError(code, kind, text))

    def abort_connection(self) -> None:
        """Reset the connection (RST, no orderly close): a fault or a broken body."""
        self.close_connection = True
        self.aborted = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )

    def finish(self) -> None:
        if self.replied and self.body_left > 0 and not self.aborted:
            self._linger()
        super().finish()

    def _linger(self) -> None:
        """Drop what the client still sends after an early answer, then close.

        Closing a socket with unread data resets it, and the reset can destroy our
        answer (a 401, a 413) in the client's buffers before it reads it: the
        client sees "connection reset while sending" instead.  So, like nginx's
        lingering close, stop writing and read for a while first (bounded).
        """
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            left = LINGER_BYTES
            sink = bytearray(1 << 16)
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                n = self.connection.recv_into(sink)
                if not n:
                    break
                left -= n

    # --- request facts ----------------------------------------------------

    def base_url(self) -> str:
        """This server's ``.../api/2.0/`` as the client addressed it."""
        host = self.headers.get("Host", "")
        if not _HOST_RE.match(host):
            addr, port = self.connection.getsockname()[:2]
            host = f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}"
        return f"{self.ctx.config.scheme}://{host}/api/2.0/"

    def check_auth(self) -> None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                decoded = b""
            user, _, password = decoded.partition(b":")
            ok_user = hmac.compare_digest(user, self.ctx.config.username.encode())
            ok_pass = hmac.compare_digest(password, self.ctx.password.encode())
            if ok_user and ok_pass:
                return
        challenge = f'Basic realm="{self.ctx.config.realm}", charset="UTF-8"'
        raise ApiError(
            401, "permission",
            "authentication required: HTTP Basic with the account's email and password",
            headers=(("WWW-Authenticate", challenge),),
        )

    def require_length(self) -> int:
        """The exact body length; refuses chunked or length-less bodies."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(
                411, "validation",
                "chunked request bodies are not accepted: send the exact Content-Length",
            )
        values = set(self.headers.get_all("Content-Length") or ())
        if not values:
            raise ApiError(411, "validation", "a Content-Length header is required")
        text = values.pop().strip()
        if values or not text.isdigit():
            raise validation("Content-Length is not a single whole number", "Content-Length")
        return int(text)

    def int_query(self, name: str, default: int) -> int:
        text = self.query.get(name)
        if text is None or text == "":
            return default
        if not text.isdigit():
            raise validation(f"{name} must be a whole number >= 0", name)
        return int(text)

    def read_json(self) -> Any:
        """The request's JSON body (None when empty)."""
        if self.headers.get("Transfer-Encoding"):
            self.require_length()
        length = self.body_left if self.headers.get("Content-Length") else 0
        if length > MAX_JSON_BODY:
            raise ApiError(413, "validation", f"a JSON body may have at most {MAX_JSON_BODY} bytes")
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise ClientGone("the JSON body ended early")
        self.body_left = 0
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise validation(f"the body is not valid JSON: {exc}") from exc


"""Helpers the reliability suites share.

- :class:`FaultTable`: the rows of the fault table (``conftest.py`` prints it);
- :func:`make_image`, :func:`drive_holds`, :func:`one_error_line`: test images and the
  checks every scenario ends with;
- :class:`Recorder`: an HTTP server on a chosen loopback address that records every
  request's headers (credentials on the wire) and answers as told (hostile servers);
- :class:`CuttingProxy`: a TCP proxy in front of the store that cuts chosen answers
  part-way, for faults the store's own injection cannot make (a JSON answer or an
  upload's UUID lost after the request was done).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from drivepipe.server import RunningServer

MiB = 1 << 20

#: ``cli(*argv, env=None) -> (exit code, stdout, stderr)`` (the conftest fixture)
Cli = Callable[..., tuple[int, str, str]]


@dataclass
class Row:
    """One fault scenario against one operation, summed over its runs."""

    scenario: str
    operation: str
    tried: int = 0
    survived: int = 0
    data_lost: int = 0
    how: set[str] = field(default_factory=set)


class FaultTable:
    """Collects one row per (scenario, operation); prints them as a markdown table."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Row] = {}

    def record(
        self, scenario: str, operation: str, *, survived: bool, how: str, data_lost: int = 0
    ) -> None:
        row = self.rows.setdefault((scenario, operation), Row(scenario, operation))
        row.tried += 1
        row.survived += int(survived)
        row.data_lost += data_lost
        row.how.add(how)

    def lines(self) -> list[str]:
        out = [
            "| fault | operation | tried | survived | data lost | outcome |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in self.rows.values():
            how = ", ".join(sorted(row.how))
            out.append(f"| {row.scenario} | {row.operation} | {row.tried} | {row.survived} "
                       f"| {row.data_lost} | {how} |")
        tried = sum(r.tried for r in self.rows.values())
        survived = sum(r.survived for r in self.rows.values())
        lost = sum(r.data_lost for r in self.rows.values())
        out.append(f"| **total** | | {tried} | {survived} | {lost} | |")
        return out


def make_image(path: Path, size: int, seed: int, pieces: int = 6) -> Path:
    """A sparse raw image: random data pieces, holes between, data in the last MiB."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(pieces):
            length = rng.randrange(1, MiB)
            f.seek(rng.randrange(0, size - length))
            f.write(rng.randbytes(length))
        f.seek(size - rng.randrange(1, MiB))
        f.write(rng.randbytes(1000))
    os.truncate(path, size)
    return path


def drive_holds(store: RunningServer, uuid: str, image: Path) -> bool:
    """The drive's bytes are the image's, then zeros up to the drive's size."""
    want = image.read_bytes()
    with open(store.store.raw_path(uuid), "rb") as f:
        got = f.read(len(want))
        if got != want:
            return False
        while block := f.read(4 * MiB):
            if block.count(0) != len(block):
                return False
    return True


def one_error_line(err: str) -> bool:
    """stderr ends with exactly one ``drivepipe: error:`` line and holds no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("drivepipe: error:")]
    return len(errors) == 1 and "Traceback" not in err


# --- a recording HTTP server for wire checks and hostile answers ---------------------------------


class QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer is no error here (the stdlib prints a traceback)."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """An HTTP server on ``host`` that records every request and answers with ``answer``."""

    host: str
    answer: Callable[[BaseHTTPRequestHandler], None]
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Recorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # the stdlib's dispatch names
                recorder.seen.append(Seen(self.command, self.path, dict(self.headers)))
                recorder.answer(self)

            do_POST = do_PUT = do_HEAD = do_GET  # noqa: N815

        self.server = QuietServer((self.host, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://{self.host}:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def authorized(self) -> list[Seen]:
        return [s for s in self.seen if any(k.lower() == "authorization" for k in s.headers)]


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    if handler.command != "HEAD":
        with contextlib.suppress(OSError):  # the client may hang up: that is its right
            handler.wfile.write(body)
    handler.close_connection = True


# --- a proxy that cuts answers: faults the store's own injection cannot make --------------------


@dataclass
class CutRule:
    """Cut the answer to the next ``count`` requests holding ``pattern`` after ``after`` bytes."""

    pattern: bytes
    after: int
    count: int = 1


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of the store that resets the connection part-way
    through chosen answers (JSON API answers, the UUID of an upload)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.rules: list[CutRule] = []
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopped = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def cut(self, pattern: bytes, after: int = 0, count: int = 1) -> None:
        with self._lock:
            self.rules.append(CutRule(pattern, after, count))

    def stop(self) -> None:
        """Close everything (shutdown first: it wakes the threads blocked on the sockets)."""
        self._stopped = True
        with self._lock:
            socks = [self._listener, *self._socks]
            self._socks.clear()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _arm(self, data: bytes) -> int | None:
        with self._lock:
            for rule in self.rules:
                if rule.count > 0 and rule.pattern in data:
                    rule.count -= 1
                    return rule.after
        return None

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            budget: list[int | None] = [None]  # answer bytes still allowed, when armed
            threading.Thread(target=self._up, args=(client, server, budget), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, budget),
                             daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, budget: list[int | None]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 20):
                after = self._arm(data[:4096])
                if after is not None:
                    budget[0] = after
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket,
              budget: list[int | None]) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(1 << 20):
                left = budget[0]
                if left is not None and len(data) >= left:
                    client.sendall(data[:left])
                    self._reset(client, server)
                    return
                if left is not None:
                    budget[0] = left - len(data)
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def _reset(self, client: socket.socket, server: socket.socket) -> None:
        with self._lock:
            self.cuts += 1
        # shutdown(), not close(): close() would not wake the other pump, blocked in recv()
        # on the same socket, and the client would never learn of the cut (stop() closes)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for sock in (client, server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

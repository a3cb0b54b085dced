"""Helpers the reliability suites share: test images, drive and error-line checks."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from drivepipe.server import RunningServer

MiB = 1 << 20

#: ``make_store(**ServerConfig fields) -> RunningServer`` (the conftest fixture)
MakeStore = Callable[..., RunningServer]
#: ``cli(*argv, env=None) -> (exit code, stdout, stderr)`` (the conftest fixture)
Cli = Callable[..., tuple[int, str, str]]


@dataclass
class Row:
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

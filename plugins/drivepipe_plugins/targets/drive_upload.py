"""Direct upload target ``drive``: the raw image stream in, one POST, a new drive out.

In: the pipeline's extents (holes explicit) and the exact raw size.  The body
goes out as ``POST {direct}drives/upload/`` with ``Content-Type:
application/octet-stream`` and ``Content-Length`` equal to that size (never
chunked transfer encoding: the size is the drive's size).  libcurl pulls the
body through a read callback that hands it views of the current extent and,
for holes, views of the one shared zero buffer, so no byte is copied in Python
and no hole is ever allocated.

Out: a :class:`~drivepipe.cloudsigma.upload.SentDrive` with the new drive's UUID,
parsed from the answer.

Refused (the transfer is aborted, so the server never sees a complete body and
creates no drive): a stream that produces fewer or more bytes than announced -
the end of the stream is confirmed *before* the last byte is handed to curl -,
any exception inside the pipeline, and Ctrl-C.  Exceptions raised inside a curl
callback are stored and re-raised after ``perform()`` instead of surfacing as
curl error 42.  The handle is set up by :func:`drivepipe.transport.curl.configure`
and its outcome translated by :class:`~drivepipe.transport.curl.Exchange`.  The sink
does not retry (its stream is consumed once); :func:`drivepipe.jobs.upload.upload`
runs the pipeline again when the server refused the request before taking it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final
from urllib.parse import urljoin

import pycurl

from drivepipe._errors import SizeMismatch, TransferError
from drivepipe._extent import ZERO_SIZE, ZERO_VIEW, Extent
from drivepipe._stage import ImageInput, Sink
from drivepipe._stats import StageStats
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.upload import (
    DEFAULT_BUFFER_SIZE,
    MAX_BUFFER_SIZE,
    MIN_BUFFER_SIZE,
    SentDrive,
    UploadOptions,
)
from drivepipe.transport.curl import Exchange, Interrupts, TlsOptions, configure, parse_uuid

# libcurl's upload buffer (DEFAULT_BUFFER_SIZE): 512 KiB-2 MiB measured ~1.4x faster than
# 64 KiB on loopback
UPLOAD_PATH: Final = "drives/upload/"
#: seconds of silence tolerated: after the last byte of a large image the direct host
#: may finalise the drive for a while before it answers (not measured; generous on purpose)
ANSWER_WAIT: Final = 900

_EMPTY: Final = memoryview(b"")
_READ_ABORT: Final[int] = pycurl.READFUNC_ABORT


class BodyReader:
    """libcurl's READFUNCTION: serves the body from an extent iterator.

    Returns memoryview slices (pycurl copies them straight into curl's buffer).
    Any exception - a SizeMismatch from the pipeline, Ctrl-C - is kept in
    ``error`` and the transfer aborted; the caller re-raises it.
    """

    __slots__ = ("_extents", "_hole_left", "_interrupts", "_view", "error", "sent", "size",
                 "stats")

    def __init__(
        self,
        extents: Iterator[Extent],
        size: int,
        interrupts: Interrupts | None = None,
        stats: StageStats | None = None,
    ) -> None:
        self._extents = extents
        #: counts what is handed to libcurl (at most its upload buffer ahead of the wire)
        self.stats = stats
        self._interrupts = interrupts or Interrupts()
        self.size = size
        self.sent = 0
        self._view = _EMPTY
        self._hole_left = 0
        self.error: BaseException | None = None

    def __call__(self, want: int) -> memoryview | int:
        try:
            return self._read(want)
        except BaseException as exc:  # kept and re-raised after perform(), see module doc
            self.error = exc
            return _READ_ABORT

    def _read(self, want: int) -> memoryview:
        if self._interrupts.requested:
            raise KeyboardInterrupt
        while not self._view and not self._hole_left:
            self._advance()
        want = min(want, self.size - self.sent)  # never more than Content-Length
        hole = bool(self._hole_left)
        if hole:
            n = min(want, self._hole_left, ZERO_SIZE)
            self._hole_left -= n
            chunk = ZERO_VIEW[:n]
        else:
            chunk = self._view[:want]
            self._view = self._view[len(chunk) :]
        self.sent += len(chunk)
        if self.stats is not None:
            self.stats.count(len(chunk), hole)
        if self.sent == self.size:
            # Confirm the stream really ends here before curl gets the last byte:
            # a request whose body is complete would create a drive.
            self.expect_end()
        return chunk

    def _advance(self) -> None:
        if self.sent >= self.size:
            raise SizeMismatch(f"image produced more than the announced {self.size} bytes")
        try:
            ext = next(self._extents)
        except StopIteration:
            raise SizeMismatch(
                f"image produced {self.sent} bytes, announced {self.size}"
            ) from None
        if ext.data is None:
            self._hole_left = ext.length
        else:
            self._view = memoryview(ext.data).cast("B")

    def expect_end(self) -> None:
        """Raise SizeMismatch unless the stream is exhausted (empty extents allowed)."""
        more = self._view or self._hole_left or any(ext.length for ext in self._extents)
        if more:
            raise SizeMismatch(f"image produced more than the announced {self.size} bytes")


class DirectUploadSink(Sink[SentDrive]):
    """Sends the stream as one POST to the direct host; returns the new drive."""

    name = "send"

    def __init__(
        self,
        endpoint: Endpoint,
        creds: Credentials,
        tls: TlsOptions | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        handle_signals: bool = False,
    ) -> None:
        if not MIN_BUFFER_SIZE <= buffer_size <= MAX_BUFFER_SIZE:
            raise ValueError(f"upload buffer must be between {MIN_BUFFER_SIZE} and "
                             f"{MAX_BUFFER_SIZE} bytes, got {buffer_size}")
        self.endpoint = endpoint
        self.creds = creds
        self.tls = tls or TlsOptions()
        self.buffer_size = buffer_size
        self.handle_signals = handle_signals
        self.url = urljoin(endpoint.direct, UPLOAD_PATH)
        self._curl: pycurl.Curl | None = None
        self._stats: StageStats | None = None

    @classmethod
    def for_upload(
        cls, conn: Connection, options: UploadOptions, image: ImageInput
    ) -> DirectUploadSink:
        return cls(conn.endpoint, conn.creds, conn.tls, buffer_size=options.buffer_size,
                   handle_signals=options.handle_signals)

    def meter(self, stats: StageStats) -> bool:
        self._stats = stats
        return True

    def consume(self, extents: Iterator[Extent], size: int) -> SentDrive:
        interrupts = Interrupts(self.handle_signals)
        body = BodyReader(extents, size, interrupts, self._stats)
        if size == 0:
            body.expect_end()
        c = self._curl = pycurl.Curl()
        self._setup(c, size, body, interrupts)
        exchange = Exchange(c, self.url, "upload")
        with interrupts.catching():
            try:
                c.perform()
            except pycurl.error as exc:
                if interrupts.requested:
                    raise KeyboardInterrupt from None  # Ctrl-C, not the abort it caused
                if body.error is not None:  # ours first, then the server's or the network's
                    raise body.error from None
                raise exchange.failure(exc) from exc
        # A Ctrl-C after the last callback is ignored: the drive exists, its UUID matters.
        if body.error is not None:
            raise body.error
        resp = exchange.outcome(c, None, ok=(200, 201, 202))
        if body.sent != size:
            raise TransferError(f"upload: server answered HTTP {resp.status} after "
                                f"{body.sent} of {size} bytes")
        return SentDrive(parse_uuid(resp.body), sent_bytes=size, wire_bytes=body.sent)

    def _setup(
        self, c: pycurl.Curl, size: int, body: BodyReader, interrupts: Interrupts
    ) -> None:
        configure(c, self.url, tls=self.tls, endpoint=self.endpoint, creds=self.creds,
                  headers={"Content-Type": "application/octet-stream"})
        # POST with a known size: libcurl sends Content-Length, never chunked encoding.
        c.setopt(pycurl.POST, 1)
        c.setopt(pycurl.POSTFIELDSIZE_LARGE, size)
        c.setopt(pycurl.READFUNCTION, body)
        c.setopt(pycurl.UPLOAD_BUFFERSIZE, self.buffer_size)
        c.setopt(pycurl.LOW_SPEED_TIME, max(int(self.tls.stall_timeout), ANSWER_WAIT))
        c.setopt(pycurl.NOPROGRESS, 0)
        c.setopt(pycurl.XFERINFOFUNCTION, interrupts)

    def abort(self) -> None:
        # Closing the connection mid-body is the abort: the store keeps nothing.
        self.close()

    def close(self) -> None:
        if self._curl is not None:
            self._curl.close()
            self._curl = None


__all__ = ["BodyReader", "DirectUploadSink", "Interrupts"]

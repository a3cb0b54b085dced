"""Direct upload sink ("send"): the raw image stream in, one POST, a drive UUID out.

In: the pipeline's extents (holes explicit) and the exact raw size.  The body
goes out as ``POST {direct}drives/upload/`` with ``Content-Type:
application/octet-stream`` and ``Content-Length`` equal to that size (never
chunked transfer encoding: the size is the drive's size).  libcurl pulls the
body through a read callback that hands it views of the current extent and,
for holes, views of the one shared zero buffer, so no byte is copied in Python
and no hole is ever allocated.

Out: the new drive's UUID, parsed from the answer.

Refused (the transfer is aborted, so the server never sees a complete body and
creates no drive): a stream that produces fewer or more bytes than announced -
the end of the stream is confirmed *before* the last byte is handed to curl -,
any exception inside the pipeline, and Ctrl-C.  Exceptions raised inside a curl
callback are stored and re-raised after ``perform()`` instead of surfacing as
curl error 42.  HTTP error answers become one line with the server's words and
its ``X-REQUEST-ID``.

:func:`direct_upload` runs a whole upload: the image's decoders, an xxh3-128
stage, and this sink, with reading/decoding/hashing in a producer thread.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Final
from urllib.parse import urljoin

import pycurl

from drivepipe._errors import SizeMismatch, TransferError
from drivepipe._extent import ZERO_SIZE, ZERO_VIEW, Extent
from drivepipe._runner import run_pipeline
from drivepipe._stage import ImageInput, Sink
from drivepipe._stats import RunStats, StageStats
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.transport.http import (
    HeaderCollector,
    Response,
    TlsOptions,
    configure,
    curl_failure,
    http_failure,
    parse_uuid,
)
from drivepipe_plugins.stages.xxh3 import Xxh3Stage

#: libcurl's upload buffer; 512 KiB-2 MiB measured ~1.4x faster than 64 KiB on loopback
DEFAULT_BUFFER_SIZE: Final = 1 << 20
#: libcurl refuses upload buffers outside this range (CURLOPT_UPLOAD_BUFFERSIZE)
MIN_BUFFER_SIZE: Final = 16 << 10
MAX_BUFFER_SIZE: Final = 2 << 20
#: an upload answer is a UUID or a short JSON error list; more is not worth keeping
MAX_ANSWER: Final = 64 << 10
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


class _Answer:
    """WRITEFUNCTION target keeping the first MAX_ANSWER bytes of the response body."""

    __slots__ = ("kept", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.kept = 0

    def __call__(self, data: bytes) -> None:
        if self.kept < MAX_ANSWER:
            self.parts.append(data[: MAX_ANSWER - self.kept])
            self.kept += len(self.parts[-1])

    def body(self) -> bytes:
        return b"".join(self.parts)


class Interrupts:
    """Ctrl-C during ``perform()``: a flag the callbacks turn into an abort.

    A KeyboardInterrupt raised inside a pycurl callback would be printed by
    pycurl as a traceback; so while curl runs, SIGINT only sets ``requested``
    (in the main thread, see :meth:`catching`), the read callback and this
    XFERINFOFUNCTION (called at least once a second even when the socket is
    stuck) abort the transfer, and the caller raises KeyboardInterrupt after.
    """

    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, dltotal: int, dlnow: int, ultotal: int, ulnow: int) -> int:
        return 1 if self.requested else 0

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Route SIGINT to ``requested`` while the block runs (main thread only)."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or previous is None:
            yield  # only the main thread gets signals; None: a handler not set from Python
            return
        signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def check_buffer_size(size: int) -> int:
    if not MIN_BUFFER_SIZE <= size <= MAX_BUFFER_SIZE:
        raise ValueError(f"upload buffer must be between {MIN_BUFFER_SIZE} and "
                         f"{MAX_BUFFER_SIZE} bytes, got {size}")
    return size


class CurlUploadSink(Sink[str]):
    """Sends the stream as one POST to the direct host; returns the drive UUID."""

    name = "send"

    def __init__(
        self,
        endpoint: Endpoint,
        creds: Credentials,
        tls: TlsOptions | None = None,
        *,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        self.endpoint = endpoint
        self.creds = creds
        self.tls = tls or TlsOptions()
        self.buffer_size = check_buffer_size(buffer_size)
        self.url = urljoin(endpoint.direct, UPLOAD_PATH)
        self._curl: pycurl.Curl | None = None
        self._stats: StageStats | None = None

    def meter(self, stats: StageStats) -> bool:
        self._stats = stats
        return True

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        interrupts = Interrupts()
        body = BodyReader(extents, size, interrupts, self._stats)
        if size == 0:
            body.expect_end()
        c = self._curl = pycurl.Curl()
        answer = _Answer()
        headers = HeaderCollector()
        self._setup(c, size, body, interrupts, answer, headers)
        with interrupts.catching():
            try:
                c.perform()
            except pycurl.error as exc:
                if interrupts.requested:
                    raise KeyboardInterrupt from None  # Ctrl-C, not the abort it caused
                raise self._failure(exc, body, headers, answer) from exc
        # A Ctrl-C after the last callback is ignored: the drive exists, its UUID matters.
        if body.error is not None:
            raise body.error
        resp = Response(c.getinfo(pycurl.RESPONSE_CODE), headers.headers, answer.body(), self.url)
        if resp.status not in (200, 201, 202):
            raise http_failure(resp, "upload")
        if body.sent != size:
            raise TransferError(f"upload: server answered HTTP {resp.status} after "
                                f"{body.sent} of {size} bytes")
        return parse_uuid(resp.body)

    def _setup(
        self,
        c: pycurl.Curl,
        size: int,
        body: BodyReader,
        interrupts: Interrupts,
        answer: _Answer,
        headers: HeaderCollector,
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
        c.setopt(pycurl.WRITEFUNCTION, answer)
        c.setopt(pycurl.HEADERFUNCTION, headers)

    def _failure(
        self,
        exc: pycurl.error,
        body: BodyReader,
        headers: HeaderCollector,
        answer: _Answer,
    ) -> BaseException:
        """The exception to raise for a failed perform(): ours first, then the server's."""
        if body.error is not None:
            return body.error
        if headers.status >= 400:
            # The server refused early (401, 503...) and closed while we were sending.
            resp = Response(headers.status, headers.headers, answer.body(), self.url)
            return http_failure(resp, "upload")
        return curl_failure(exc, self.url, "upload")

    def abort(self) -> None:
        # Closing the connection mid-body is the abort: the store keeps nothing.
        self.close()

    def close(self) -> None:
        if self._curl is not None:
            self._curl.close()
            self._curl = None


@dataclass(frozen=True)
class DirectOptions:
    """Tuning of a direct upload (see ``benchmarks/bench_upload.py`` for the numbers)."""

    buffer_size: int = DEFAULT_BUFFER_SIZE
    queue_depth: int = 16


@dataclass(frozen=True)
class UploadResult:
    uuid: str
    #: xxh3-128 hex digest of the raw bytes sent
    xxh128: str
    #: raw bytes sent (the image's size before the store grows it to its minimum)
    size: int


def direct_upload(
    image: ImageInput,
    endpoint: Endpoint,
    creds: Credentials,
    tls: TlsOptions | None = None,
    options: DirectOptions | None = None,
    stats: RunStats | None = None,
) -> UploadResult:
    """Upload ``image`` in one POST, hashing it on the way; the image is closed after."""
    options = options or DirectOptions()
    hasher = Xxh3Stage()
    sink = CurlUploadSink(endpoint, creds, tls, buffer_size=options.buffer_size)
    uuid = run_pipeline(
        image.source, [*image.stages, hasher], sink, size=image.size, stats=stats,
        queue_depth=options.queue_depth,
    )
    return UploadResult(uuid, hasher.hexdigest(), image.size)

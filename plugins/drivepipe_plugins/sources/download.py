"""The download source ("receive"): an http(s) URL in, its bytes out in order.

What goes in: a URL (a drive's ``/download/`` link or any http(s) URL), the
transport policy, and optionally an endpoint with credentials.
:meth:`RangeReceiver.probe` asks for ``Range: bytes=0-0`` following redirects
and learns the final (often signed) URL, the size, the ETag and whether ranges
work (a :class:`~drivepipe._remote.ProbeResult`).  :meth:`RangeReceiver.extents`
then fetches ``[start, size)`` from that final URL over N connections (one
pycurl multi, ranges of ``range_size`` bytes, by default the bytes to fetch split
over the connections within 4-64 MiB (:func:`range_step`), each with ``If-Range``
when the ETag is strong) and yields the bytes **in order**: ranges that finish early wait
in a bounded window (at most ``connections + window_extra`` ranges in flight or
waiting, so memory stays about that many times ``range_size``, and never much
more than ``window_bytes``: many connections get smaller ranges), and the range at
the head of the window is yielded as it arrives, in pieces of up to 1 MiB (each
a fresh buffer, never reused: consumers may keep them).  Between two pieces the
connections are served (a non-blocking round of the multi handle), so a slow
consumer taking a backlog of finished ranges does not stall the transfers.

Transient failures (reset, timeout, cut-short body, 5xx, 429) are retried by
the one retry policy (backoff with jitter, ``Retry-After``), resuming at the
first byte not received; a range that keeps failing without progress (not one
more piece finished) gives up after ``retries`` attempts.  An expired signed
link (401/403/404/410 after a redirect) is renewed by probing the original URL
again.  A server that ignores
``Range`` gets one whole-file stream instead (the bytes before the resume
point are dropped as they arrive).

What is refused: a server that gives no size; a source whose size or ETag
changes under us (:class:`~drivepipe.SourceChanged`: the caller restarts
cleanly); error answers (one line with the server's words).  Credentials are
attached only by :func:`drivepipe.transport.curl.configure` (endpoint origin
only, never after a cross-host redirect) and never to the ranges fetched from a
redirect target.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import pycurl

from drivepipe._errors import DrivepipeError, NetworkError, SourceChanged, TransferError
from drivepipe._extent import Extent
from drivepipe._remote import Auth, ProbeResult
from drivepipe._stage import Source
from drivepipe.transport.curl import (
    HeaderCollector,
    Response,
    TlsOptions,
    configure,
    curl_failure,
    http_failure,
)
from drivepipe.transport.retry import RetryPolicy, retry_after_of

#: libcurl hands us the body in pieces up to this size (fewer Python callbacks)
RECV_BUFFER = 1 << 20
#: bytes per yielded extent at most (aligned to the stream), each a buffer of its own
PIECE = 1 << 20
#: the automatic range size: the bytes to fetch split over the connections, within
#: these bounds (aria2 splits a file into ``--split`` pieces of at least 20 MiB,
#: rclone's multi-thread download asks for 64 MiB chunks).  Every range costs a
#: request's round trip, during which its connection moves nothing (on a 50 MB/s
#: flow with 100 ms of latency: 5 MB), so short ranges waste a capped or distant
#: link; the floor still gives a small file's bytes to every connection.
AUTO_RANGE_MIN = 4 << 20
AUTO_RANGE_MAX = 64 << 20
#: keep at most this much of an error answer's body for the message
_ERROR_BODY_MAX = 64 << 10
#: answers on a signed link that mean "ask for a new link"
_LINK_EXPIRED = frozenset({401, 403, 404, 410})
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSIZED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class _RangeIgnored(Exception):
    """A ranged request was answered with the whole file (200): switch to one stream."""


@dataclass(frozen=True)
class ReceiveOptions:
    connections: int = 4
    #: bytes asked for in one ranged request; None: :func:`range_step` picks them
    range_size: int | None = None
    #: consecutive attempts without progress before a range gives up
    retries: int = 8
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: renewals of an expired signed link before giving up
    relinks: int = 5
    #: ranges that may wait, finished or in flight, beyond one per connection
    window_extra: int = 2
    #: the window's bytes at most: with many connections the ranges get smaller instead
    window_bytes: int = 112 << 20

    def policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, base=self.backoff_base, cap=self.backoff_cap)


def range_step(remaining: int, options: ReceiveOptions) -> int:
    """Bytes per ranged request for ``remaining`` bytes still to fetch.

    ``options.range_size`` if given, else the remaining bytes split evenly over the
    connections, rounded up to whole pieces, within :data:`AUTO_RANGE_MIN` and
    :data:`AUTO_RANGE_MAX`.  Either way at most the window's share
    (``window_bytes / (connections + window_extra)``, whole pieces, never below one
    piece): memory stays within ``window_bytes``, and many connections get smaller
    ranges instead of a bigger window.
    """
    room = max(1, options.connections) + max(0, options.window_extra)
    share = max(PIECE, options.window_bytes // room // PIECE * PIECE)
    if options.range_size is not None:
        return max(1, min(options.range_size, share))
    even = -(-max(0, remaining) // max(1, options.connections))
    pieces = -(-even // PIECE) * PIECE
    return min(share, max(AUTO_RANGE_MIN, min(AUTO_RANGE_MAX, pieces)))


# --- the probe -------------------------------------------------------------------------

def _collect(limit: int, sink: BytesIO) -> Callable[[bytes], int | None]:
    def write(chunk: bytes) -> int | None:
        if sink.tell() + len(chunk) > limit:
            return 0  # enough of the body: abort (the caller expects E_WRITE_ERROR)
        sink.write(chunk)
        return None

    return write


def probe(url: str, *, tls: TlsOptions, auth: Auth, policy: RetryPolicy | None = None
          ) -> ProbeResult:
    """:func:`probe_once`, repeated by the retry policy while the failure is transient."""
    policy = policy or RetryPolicy(retries=0)
    return policy.call(lambda: probe_once(url, tls=tls, auth=auth))


def probe_once(url: str, *, tls: TlsOptions, auth: Auth) -> ProbeResult:
    """``GET url`` with ``Range: bytes=0-0``, following redirects; the body is not kept."""
    c = pycurl.Curl()
    hdr = HeaderCollector()
    body = BytesIO()
    try:
        configure(c, url, tls=tls, endpoint=auth.endpoint, creds=auth.creds, follow=True)
        c.setopt(pycurl.RANGE, "0-0")
        c.setopt(pycurl.HEADERFUNCTION, hdr)
        c.setopt(pycurl.WRITEFUNCTION, _collect(_ERROR_BODY_MAX, body))
        try:
            c.perform()
        except pycurl.error as exc:
            if exc.args[0] != pycurl.E_WRITE_ERROR:  # our own abort after the headers
                raise curl_failure(exc, url, "download") from exc
        final = c.getinfo(pycurl.EFFECTIVE_URL) or url
        redirects = int(c.getinfo(pycurl.REDIRECT_COUNT))
    finally:
        c.close()
    return _probe_result(url, final, redirects > 0, hdr, body.getvalue())


def _probe_result(
    url: str, final: str, redirected: bool, hdr: HeaderCollector, body: bytes
) -> ProbeResult:
    status, headers = hdr.status, hdr.headers
    if status == 416:
        unsized = _UNSIZED_RANGE_RE.match(headers.get("content-range", ""))
        if unsized and int(unsized.group(1)) == 0:
            return _result(url, final, redirected, 0, True, headers)
    if status == 206:
        m = _CONTENT_RANGE_RE.match(headers.get("content-range", ""))
        if not m or m.group(3) == "*":
            raise TransferError(f"download from {urlsplit(final).netloc}: the answer does not "
                                "say the file's size (Content-Range)")
        return _result(url, final, redirected, int(m.group(3)), True, headers)
    if status == 200:
        length = headers.get("content-length", "")
        if not length.isdigit() or headers.get("content-encoding", "identity") != "identity":
            raise TransferError(f"download from {urlsplit(final).netloc}: the server does not "
                                "say the file's size (no Content-Length)")
        return _result(url, final, redirected, int(length), False, headers)
    raise http_failure(Response(status, headers, body, final), "download")


def _result(
    url: str, final: str, redirected: bool, size: int, ranges: bool, headers: dict[str, str]
) -> ProbeResult:
    return ProbeResult(url, final, redirected, size, ranges, headers.get("etag"),
                       headers.get("last-modified"), headers.get("content-disposition"))


# --- ranges and transfers --------------------------------------------------------------

@dataclass(eq=False)
class _Range:
    """Bytes ``[pos, end)`` still to come of one range, and its finished pieces.

    ``whole``: asked for without ``Range`` (the server sends from byte 0, the bytes
    before ``pos`` are dropped).  The pieces are yielded once the range is at the
    head of the window; a retry continues at ``pos``, so nothing is fetched twice.
    """

    pos: int
    end: int
    whole: bool = False
    attempt: int = 0
    not_before: float = 0.0
    busy: bool = False
    pieces: deque[Extent] = field(default_factory=deque)
    buf: bytearray | None = None
    buf_start: int = 0
    fill: int = 0

    @property
    def received(self) -> bool:
        return self.pos >= self.end

    def take(self, view: memoryview) -> None:
        """Copy ``view`` (the bytes at ``pos``) into pieces aligned to :data:`PIECE`."""
        while view:
            buf = self.buf
            if buf is None:
                n = min(PIECE - self.pos % PIECE, self.end - self.pos)
                buf = self.buf = bytearray(n)
                self.buf_start, self.fill = self.pos, 0
            k = min(len(buf) - self.fill, len(view))
            buf[self.fill : self.fill + k] = view[:k]
            self.fill += k
            self.pos += k
            view = view[k:]
            if self.fill == len(buf):
                self.pieces.append(Extent(self.buf_start, len(buf), buf))
                self.buf = None


@dataclass(eq=False)
class _Transfer:
    """One GET in flight for a :class:`_Range`, from ``range.pos`` on."""

    range: _Range
    size: int
    etag: str | None
    counters: dict[str, Any]
    handle: pycurl.Curl = field(default_factory=pycurl.Curl)
    headers: HeaderCollector = field(default_factory=HeaderCollector)
    error_body: BytesIO = field(default_factory=BytesIO)
    failure: BaseException | None = None
    checked: bool = False
    accepted: bool = False
    handle_url: str = ""

    def __post_init__(self) -> None:
        self.first = self.range.pos
        #: offset of the next byte of the answer (a whole answer starts at 0)
        self.wire = 0 if self.range.whole else self.first

    def on_body(self, chunk: bytes) -> int | None:
        try:
            if not self.checked:
                self.checked = True
                self.accepted = self._check_answer()
            if not self.accepted:
                return _collect(_ERROR_BODY_MAX, self.error_body)(chunk)
            self._take(memoryview(chunk))
        except BaseException as exc:  # raised from the loop, never through libcurl
            self.failure = exc
            return 0
        return None

    def _take(self, view: memoryview) -> None:
        r = self.range
        n = len(view)
        self.counters["received"] += n
        if self.wire < r.pos:  # a whole answer, before where this stream resumes
            drop = min(r.pos - self.wire, n)
            view, self.wire = view[drop:], self.wire + drop
        if self.wire + len(view) > r.end:
            # No getinfo() here: libcurl refuses it while perform() runs.
            raise TransferError(f"download: the server sent more bytes than asked for "
                                f"(bytes {self.first}-{r.end - 1})")
        self.wire += len(view)
        r.take(view)

    def _check_answer(self) -> bool:
        """True if the body is our bytes; False for an error answer; raises on a change."""
        status, headers = self.headers.status, self.headers.headers
        etag = headers.get("etag")
        if etag and self.etag and etag != self.etag:
            raise SourceChanged(f"the source changed (ETag {self.etag} -> {etag})")
        if status == 206 and not self.range.whole:
            self._check_content_range(headers.get("content-range", ""))
            return True
        if status == 200:
            if not self.range.whole:
                raise _RangeIgnored()
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != self.size:
                raise SourceChanged(f"the source changed (size {self.size} -> {length})")
            return True
        if status == 416:
            raise SourceChanged("the source changed (the range asked for is past its end)")
        return False

    def _check_content_range(self, value: str) -> None:
        m = _CONTENT_RANGE_RE.match(value)
        if not m:
            raise TransferError(f"download: bad Content-Range {value!r}")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != self.size:
            raise SourceChanged(f"the source changed (size {self.size} -> {total})")
        if first != self.first or last != self.range.end - 1:
            raise TransferError(f"download: asked for bytes {self.first}-{self.range.end - 1}, "
                                f"got {first}-{last}")

    def cut_short(self) -> NetworkError:
        return NetworkError(f"download from {urlsplit(self.handle_url).netloc} failed: the "
                            f"answer ended at byte {self.range.pos} of {self.first}-"
                            f"{self.range.end - 1}")


# --- the source ------------------------------------------------------------------------

class RangeReceiver(Source):
    """The bytes of ``url`` from ``start`` on, in order, fetched over N connections.

    Build it, :meth:`probe` it (which sets ``size``), optionally set ``start`` (a
    resume), then pull :meth:`extents`.  ``relink`` renews an expired signed link
    (by default: probe ``url`` again).  ``counters`` (a stage's ``extra``) gets
    ``received`` (bytes off the wire), ``retries``, ``relinks``, ``connections``
    (the most at once) and ``in_flight``.
    """

    name = "receive"
    #: what ``options`` is (the download job builds one without importing this module)
    options_type = ReceiveOptions

    def __init__(
        self,
        url: str,
        *,
        tls: TlsOptions,
        auth: Auth | None = None,
        options: ReceiveOptions | None = None,
        probed: ProbeResult | None = None,
        start: int = 0,
        relink: Callable[[], ProbeResult] | None = None,
        counters: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.tls = tls
        self.auth = auth or Auth()
        self.opts = options or ReceiveOptions()
        self.policy = self.opts.policy()
        self.probed = probed
        self.size = probed.size if probed is not None else 0
        self.start = start
        self.relink = relink or self.probe
        self.relinks = 0
        self.counters: dict[str, Any] = counters if counters is not None else {}
        self.multi: pycurl.CurlMulti | None = None
        self.active: dict[pycurl.Curl, _Transfer] = {}
        self.window: deque[_Range] = deque()
        self.next_start = 0
        self.ranges = True
        #: bytes per range, set when the stream starts (:func:`range_step`)
        self.step = range_step(self.size - self.start, self.opts)

    def probe(self) -> ProbeResult:
        """Ask the URL what it is (size, ranges, validators); sets ``size``."""
        self.probed = probe(self.url, tls=self.tls, auth=self.auth, policy=self.policy)
        self.size = self.probed.size
        return self.probed

    # -- the stream --

    def extents(self) -> Iterator[Extent]:
        if self.probed is None:
            self.probe()
        for key in ("received", "retries", "relinks", "connections", "in_flight"):
            self.counters.setdefault(key, 0)
        self._plan()
        self.multi = pycurl.CurlMulti()
        try:
            while self._grow_window():
                head = self.window[0]
                while head.pieces:
                    yield head.pieces.popleft()
                    # A yield waits while the writer is busy, and a range that became
                    # the head may hold tens of pieces: the connections are served
                    # between the pieces, or every one of them stalls meanwhile (a
                    # paced server does not make the pause up).
                    self._serve(wait=False)
                if head.received and head.buf is None:
                    self.window.popleft()
                    continue
                self._serve(wait=True)
        finally:
            self._close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        self._abort_all()
        if self.multi is not None:
            self.multi.close()
            self.multi = None

    def _plan(self) -> None:
        assert self.probed is not None
        self.ranges = self.probed.ranges
        self.next_start = self.start
        self.step = range_step(self.size - self.start, self.opts)
        if self.start < self.size and not self.ranges:
            self.window.append(_Range(self.start, self.size, whole=True))
            self.next_start = self.size

    def _grow_window(self) -> bool:
        """Add ranges up to the window's size; False when nothing is left to yield."""
        room = max(1, self.opts.connections) + max(0, self.opts.window_extra)
        while self.ranges and len(self.window) < room and self.next_start < self.size:
            end = min(self.next_start + self.step, self.size)
            self.window.append(_Range(self.next_start, end))
            self.next_start = end
        return bool(self.window)

    def _start_transfers(self) -> None:
        now = time.monotonic()
        for r in self.window:
            if len(self.active) >= max(1, self.opts.connections):
                break
            if not r.busy and not r.received and r.not_before <= now:
                self._start(r)
        self.counters["in_flight"] = len(self.active)
        self.counters["connections"] = max(self.counters["connections"], len(self.active))

    def _start(self, r: _Range) -> None:
        assert self.probed is not None and self.multi is not None
        t = _Transfer(r, self.size, self.probed.etag, self.counters)
        url = self.probed.final_url
        # A redirect target is a signed link: it gets no credentials at all.
        auth = Auth() if self.probed.redirected else self.auth
        etag = self.probed.strong_etag
        headers = {"If-Range": etag} if etag and not r.whole else {}
        configure(t.handle, url, tls=self.tls, endpoint=auth.endpoint, creds=auth.creds,
                  headers=headers)
        if not r.whole:
            t.handle.setopt(pycurl.RANGE, f"{r.pos}-{r.end - 1}")
        t.handle.setopt(pycurl.BUFFERSIZE, RECV_BUFFER)
        t.handle.setopt(pycurl.HEADERFUNCTION, t.headers)
        t.handle.setopt(pycurl.WRITEFUNCTION, t.on_body)
        self.multi.add_handle(t.handle)
        self.active[t.handle] = t
        r.busy = True

    def _serve(self, *, wait: bool) -> None:
        """Start what may start, then move every transfer on (``wait``: until one has
        something to do, at most 0.2 s)."""
        self._grow_window()
        self._start_transfers()
        self._pump(wait=wait)

    def _pump(self, *, wait: bool = True) -> None:
        assert self.multi is not None
        while True:
            ret, _ = self.multi.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        while True:
            queued, ok, failed = self.multi.info_read()
            ended = [(handle, 0, "") for handle in ok] + list(failed)
            for handle, code, message in ended:
                transfer = self.active.get(handle)
                if transfer is not None:  # None: aborted by a switch to one stream
                    self._finish(transfer, code, message)
            if not queued:
                break
        if not wait:
            return
        if self.active:
            self.multi.select(0.2)
        else:
            waiting = [r.not_before for r in self.window if not r.received]
            if waiting:
                time.sleep(min(max(min(waiting) - time.monotonic(), 0.0), 0.2))

    # -- a transfer ends --

    def _finish(self, t: _Transfer, code: int, message: str) -> None:
        self._drop(t)
        if isinstance(t.failure, _RangeIgnored):
            self._switch_to_one_stream()
            return
        if t.failure is not None:
            raise t.failure
        status = t.headers.status
        if t.accepted and t.range.received:
            return  # every byte asked for is here, whatever ended the connection after
        if (t.checked and not t.accepted) or (code == 0 and status not in (200, 206)):
            self._http_error(t)
            return
        if code == 0:
            self._retry(t, t.cut_short())
            return
        failure = curl_failure(pycurl.error(code, message), t.handle_url, "download")
        self._retry(t, failure)

    def _drop(self, t: _Transfer) -> None:
        assert self.multi is not None
        t.handle_url = str(t.handle.getinfo(pycurl.EFFECTIVE_URL))
        self.multi.remove_handle(t.handle)
        t.handle.close()
        del self.active[t.handle]
        t.range.busy = False

    def _http_error(self, t: _Transfer) -> None:
        resp = Response(t.headers.status, t.headers.headers, t.error_body.getvalue(),
                        t.handle_url)
        err = http_failure(resp, "download")
        if resp.status == 416:
            raise SourceChanged("the source changed (the range asked for is past its end)")
        assert self.probed is not None
        if resp.status in _LINK_EXPIRED and self.probed.redirected and self._renew_link():
            return  # the range starts again at once, from the fresh link
        self._retry(t, err)

    def _renew_link(self) -> bool:
        assert self.probed is not None
        if self.relinks >= self.opts.relinks:
            return False
        self.relinks += 1
        self.counters["relinks"] = self.relinks
        old = self.probed
        fresh = self.relink()
        if fresh.size != old.size or (fresh.etag or None) != (old.etag or None):
            raise SourceChanged("the source changed while its link was renewed")
        self.probed, self.size = fresh, old.size
        return True

    def _retry(self, t: _Transfer, err: DrivepipeError) -> None:
        r = t.range
        # progress is a whole piece finished: a server that cuts every answer after a
        # few bytes still runs out of attempts (the bytes it did send are kept)
        attempt = 1 if r.pos // PIECE > t.first // PIECE else r.attempt + 1
        headers = t.headers.headers if t.checked else {}
        if isinstance(err, TransferError) and err.retry_after is None:
            err.retry_after = retry_after_of(headers)
        delay = self.policy.next_delay(err, attempt)
        if delay is None:
            raise err
        r.attempt, r.not_before = attempt, time.monotonic() + delay
        self.counters["retries"] += 1

    def _switch_to_one_stream(self) -> None:
        """The server ignores Range: keep what the head has, fetch the rest in one stream."""
        if not self.ranges:
            return
        self.ranges = False
        self._abort_all()
        head = self.window[0]
        head.end, head.whole, head.busy, head.attempt, head.not_before = \
            self.size, True, False, 0, 0.0
        self.window = deque([head])
        self.next_start = self.size

    def _abort_all(self) -> None:
        for t in list(self.active.values()):
            if self.multi is not None:
                self.multi.remove_handle(t.handle)
            t.handle.close()
            t.range.busy = False
        self.active.clear()

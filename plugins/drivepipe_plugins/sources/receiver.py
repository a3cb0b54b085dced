"""The download receiver: an HTTP(S) URL in, the bytes written in place into a sparse file.

What goes in: a URL (a drive's ``/download/`` link or any http(s) URL), the
transport policy, and optionally an endpoint with credentials.  :func:`probe`
asks for ``Range: bytes=0-0`` following redirects and learns the final (often
signed) URL, the size, the ETag and whether ranges work.  :class:`Receiver`
then fetches the blocks the journal lacks from that final URL over N
connections (one pycurl multi, ranges of ``range_size`` bytes, each with
``If-Range`` when the ETag is strong) and writes every finished block in place
from a writer thread (:class:`BlockWriter`, so disk writes overlap receiving)
with :meth:`SparseOutput.write_at` (all-zero 4 KiB blocks are never written),
recording its xxh3-64 in the journal.

What comes out: ``NAME.part`` with every block present and a journal listing
them.  Transient failures (reset, timeout, cut-short body, 5xx, 429) are
retried with exponential backoff and jitter, resuming at the first unfinished
block; a range that keeps failing without progress gives up after
``retries`` attempts.  An expired signed link (401/403/404/410 after a
redirect) is renewed by probing the original URL again.

What is refused: a server that gives no size; a source whose size or ETag
changes under us (:class:`SourceChanged`, the caller restarts cleanly); error
answers (one line with the server's words).  Credentials are attached only by
:func:`drivepipe.transport.http.configure` (endpoint origin only, never after a
cross-host redirect) and never to the ranges fetched from a redirect target.
A server that ignores ``Range`` gets one whole-file stream instead.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import pycurl

from drivepipe._errors import (
    Cancelled,
    DrivepipeError,
    NetworkError,
    TransferError,
)
from drivepipe._files import SparseOutput, output_error
from drivepipe._stats import StageStats
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.resume.download_journal import DownloadJournal, SourceIdentity, block_digest
from drivepipe.transport.http import (
    HeaderCollector,
    Response,
    TlsOptions,
    configure,
    curl_failure,
    http_failure,
)

#: libcurl hands us the body in pieces up to this size (fewer Python callbacks)
RECV_BUFFER = 1 << 20
#: keep at most this much of an error answer's body for the message
_ERROR_BODY_MAX = 64 << 10
#: answers on a signed link that mean "ask for a new link"
_LINK_EXPIRED = frozenset({401, 403, 404, 410})
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSIZED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


class SourceChanged(TransferError):
    """The source's size or ETag is not what the download started with."""


class _RangeIgnored(Exception):
    """A ranged request was answered with the whole file (200): switch to one stream."""


@dataclass
class Auth:
    """Who we are towards ``endpoint``; credentials go only to its origin."""

    endpoint: Endpoint | None = None
    creds: Credentials | None = None


@dataclass
class ProbeResult:
    """What the first request taught us about the source."""

    url: str
    final_url: str
    redirected: bool
    size: int
    ranges: bool
    etag: str | None
    last_modified: str | None
    disposition: str | None

    def identity(self, source: str) -> SourceIdentity:
        return SourceIdentity(source, self.size, self.etag, self.last_modified)

    @property
    def strong_etag(self) -> str | None:
        """The ETag if ``If-Range`` may use it (weak validators may not)."""
        return self.etag if self.etag and not self.etag.startswith("W/") else None


def _collect(limit: int, sink: BytesIO) -> Callable[[bytes], int | None]:
    def write(chunk: bytes) -> int | None:
        if sink.tell() + len(chunk) > limit:
            return 0  # enough of the body: abort (the caller expects E_WRITE_ERROR)
        sink.write(chunk)
        return None

    return write


def probe(
    url: str, *, tls: TlsOptions, auth: Auth, retries: int = 0, backoff_base: float = 0.5,
    backoff_cap: float = 30.0,
) -> ProbeResult:
    """:func:`probe_once`, repeated with backoff while the failure is transient."""
    rng = random.Random()
    for attempt in range(retries + 1):
        try:
            return probe_once(url, tls=tls, auth=auth)
        except TransferError as exc:
            if not exc.transient or attempt == retries:
                raise
            time.sleep(backoff_delay(attempt, backoff_base, backoff_cap, rng))
    raise AssertionError("unreachable")


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


# --- the receiver ----------------------------------------------------------------------

@dataclass
class ReceiveOptions:
    connections: int = 4
    #: bytes asked for in one ranged request (a multiple of the block size)
    range_size: int = 32 << 20
    #: consecutive attempts without progress before a range gives up
    retries: int = 8
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: seconds between journal checkpoints
    checkpoint_interval: float = 1.0
    #: renewals of an expired signed link before giving up
    relinks: int = 5
    #: finished blocks waiting for the writer thread (memory: this many blocks)
    write_queue: int = 8


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: ``[0.5, 1) * min(cap, base * 2**attempt)``."""
    return min(cap, base * 2.0**attempt) * (0.5 + rng.random() / 2)


def retry_after(headers: dict[str, str], cap: float) -> float:
    """Seconds a 503/429 answer asks us to wait (``Retry-After: N``), at most ``cap``."""
    value = headers.get("retry-after", "").strip()
    return min(float(value), cap) if value.isdigit() else 0.0


@dataclass
class Span:
    """Blocks ``[first, last)`` still to fetch, and its retry state."""

    first: int
    last: int
    attempt: int = 0
    not_before: float = 0.0


def missing_spans(journal: DownloadJournal, blocks_per_range: int) -> list[Span]:
    """Runs of blocks the journal lacks, cut to at most ``blocks_per_range`` blocks."""
    spans: list[Span] = []
    index, count = 0, journal.block_count
    while index < count:
        if index in journal.blocks:
            index += 1
            continue
        start = index
        while index < count and index not in journal.blocks and index - start < blocks_per_range:
            index += 1
        spans.append(Span(start, index))
    return spans


@dataclass(eq=False)
class _Transfer:
    """One ranged (or whole-file) GET in flight, assembling whole blocks.

    The body is copied into a block-sized buffer; each full block is handed to
    ``on_block``, which returns another buffer for the next one.  ``on_body``
    runs once per piece libcurl hands over (often 16 KiB), so the common case -
    the piece fits in the current block - is kept to a few operations.
    """

    span: Span
    start: int
    end: int
    whole: bool
    block_size: int
    #: ``(block index, buffer, length) -> a buffer for the next block``
    on_block: Callable[[int, bytearray, int], bytearray]
    counter: StageStats
    expect: SourceIdentity
    handle: pycurl.Curl = field(default_factory=pycurl.Curl)
    headers: HeaderCollector = field(default_factory=HeaderCollector)
    error_body: BytesIO = field(default_factory=BytesIO)
    failure: BaseException | None = None
    checked: bool = False
    accepted: bool = False
    handle_url: str = ""
    buf: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        if len(self.buf) < self.block_size:
            self.buf = bytearray(self.block_size)
        self.fill = 0
        self._enter_block(self.start)

    def _enter_block(self, offset: int) -> None:
        self.block_start = offset
        self.block_len = min(self.block_size, self.end - offset)
        self.fill = 0

    @property
    def pos(self) -> int:
        """Offset of the next byte expected."""
        return self.block_start + self.fill

    @property
    def resume_block(self) -> int:
        """The first block this transfer has not finished."""
        return self.block_start // self.block_size

    def on_body(self, chunk: bytes) -> int | None:
        n = len(chunk)
        fill = self.fill
        if self.accepted and fill + n < self.block_len:
            self.buf[fill : fill + n] = chunk
            self.fill = fill + n
            counter = self.counter
            counter.bytes += n
            counter.data_bytes += n  # over the wire every byte is data, zeros included
            return None
        try:
            if not self.checked:
                self.checked = True
                self.accepted = self._check_answer()
            if not self.accepted:
                return _collect(_ERROR_BODY_MAX, self.error_body)(chunk)
            self._take(memoryview(chunk))
        except BaseException as exc:
            self.failure = exc
            return 0
        return None

    def _take(self, view: memoryview) -> None:
        if self.pos + len(view) > self.end:
            # No getinfo() here: libcurl refuses it while perform() runs (a pycurl.error,
            # which escaped as a traceback).
            raise TransferError(f"download: the server sent more bytes than asked for "
                                f"(bytes {self.start}-{self.end - 1})")
        self.counter.bytes += len(view)
        self.counter.data_bytes += len(view)
        while view:
            n = min(self.block_len - self.fill, len(view))
            self.buf[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == self.block_len:
                self.buf = self.on_block(self.block_start // self.block_size, self.buf,
                                         self.fill)
                self._enter_block(self.block_start + self.block_len)

    def _check_answer(self) -> bool:
        """True if the body is our bytes; False for an error answer; raises on a change."""
        status, headers = self.headers.status, self.headers.headers
        etag = headers.get("etag")
        if etag and self.expect.etag and etag != self.expect.etag:
            raise SourceChanged(f"the source changed (ETag {self.expect.etag} -> {etag})")
        if status == 206 and not self.whole:
            self._check_content_range(headers.get("content-range", ""))
            return True
        if status == 200:
            if not self.whole:
                raise _RangeIgnored()
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != self.expect.size:
                raise SourceChanged(f"the source changed (size {self.expect.size} -> {length})")
            return True
        if status == 416:
            raise SourceChanged("the source changed (the range asked for is past its end)")
        return False

    def _check_content_range(self, value: str) -> None:
        m = _CONTENT_RANGE_RE.match(value)
        if not m:
            raise TransferError(f"download: bad Content-Range {value!r}")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != self.expect.size:
            raise SourceChanged(f"the source changed (size {self.expect.size} -> {total})")
        if first != self.start or last != self.end - 1:
            raise TransferError(f"download: asked for bytes {self.start}-{self.end - 1}, "
                                f"got {first}-{last}")


def _cut_short(t: _Transfer) -> NetworkError:
    return NetworkError(f"download from {urlsplit(t.handle_url).netloc} failed: the answer "
                        f"ended at byte {t.pos} of {t.start}-{t.end - 1}")


@dataclass
class _Written:
    index: int
    digest: str
    length: int
    written: int


class BlockWriter:
    """A thread that writes finished blocks in place and digests them.

    The receiving loop hands over whole blocks (``submit`` blocks when ``depth``
    blocks wait, which in turn stops reading the sockets: memory stays bounded);
    the thread ``pwrite``s them (zero blocks skipped, stale blocks written whole),
    computes their journal digest, and lists them in ``written`` for the loop to
    journal.  So disk writes overlap with receiving instead of stalling it.
    Buffers are recycled through ``buffer()``.
    """

    def __init__(self, out: SparseOutput, block_size: int, stale: set[int],
                 stats: StageStats, depth: int = 8) -> None:
        self.out = out
        self.block_size = block_size
        self.stale = stale
        self.stats = stats
        self.written: deque[_Written] = deque()
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, bytearray, int] | None] = queue.Queue(depth)
        self._free: deque[bytearray] = deque()
        self._thread = threading.Thread(target=self._run, daemon=True, name="drivepipe-write")
        self._thread.start()

    def buffer(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.block_size)

    def submit(self, index: int, buf: bytearray, length: int) -> bytearray:
        """Queue a block for writing; returns a buffer for the next one."""
        self._queue.put((index, buf, length))
        return self.buffer()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self.written.append(self._write(*item))
                except BaseException as exc:  # handed to the receiving loop
                    self.error = exc
            self._free.append(item[1])

    def _write(self, index: int, buf: bytearray, length: int) -> _Written:
        t0 = time.perf_counter()
        data = memoryview(buf)[:length]
        offset = index * self.block_size
        before = self.out.written
        if index in self.stale:
            self._overwrite(offset, data)
        else:
            self.out.write_at(offset, data)
        done = _Written(index, block_digest(data), length, self.out.written - before)
        self.stats.inclusive += time.perf_counter() - t0
        return done

    def _overwrite(self, offset: int, data: memoryview) -> None:
        try:
            while data:
                n = os.pwrite(self.out.fd, data, offset)
                data, offset = data[n:], offset + n
                self.out.written += n
        except OSError as exc:
            raise output_error(self.out.path, exc) from exc


class _StopSignals:
    """While active, SIGINT/SIGTERM only set a flag (main thread only; else a no-op)."""

    def __init__(self) -> None:
        self.signalled = False
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.signalled = True

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


class Receiver:
    """Fetches the journal's missing blocks into ``out`` over N connections."""

    def __init__(
        self,
        out: SparseOutput,
        journal: DownloadJournal,
        journal_path: str,
        probed: ProbeResult,
        *,
        tls: TlsOptions,
        auth: Auth,
        options: ReceiveOptions,
        receive: StageStats,
        write: StageStats,
        relink: Callable[[], ProbeResult] | None = None,
        stale: set[int] | None = None,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.out = out
        #: called after each block is written and journaled (wakes the prefix hasher)
        self.on_stored = on_stored
        #: blocks to fetch that hold old bytes on disk: written whole, zeros included,
        #: since skipping a zero block would leave the old bytes under it
        self.stale = stale or set()
        self.journal = journal
        self.journal_path = journal_path
        self.probed = probed
        self.tls = tls
        self.auth = auth
        self.opts = options
        self.receive = receive
        self.write = write
        self.relink = relink
        self.relinks = 0
        self.ranges = probed.ranges
        self.multi = pycurl.CurlMulti()
        self.writer = BlockWriter(out, journal.block_size, self.stale, write,
                                  depth=options.write_queue)
        self.active: dict[pycurl.Curl, _Transfer] = {}
        self.pending: deque[Span] = deque()
        self.rng = random.Random()
        self.dirty = False
        self.last_checkpoint = time.monotonic()
        self.save_seconds = 0.0
        # connections: the most that ran at once (what the summary reports);
        # in_flight: how many run now
        receive.extra.update(retries=0, relinks=0, connections=0, in_flight=0)

    # -- the loop --

    def run(self) -> None:
        """Fetch every missing block; the journal is checkpointed whatever happens.

        Ctrl-C and SIGTERM are turned into :class:`Cancelled` between transfers'
        pieces (never inside a libcurl callback), after the journal is saved.
        """
        self._plan()
        self.receive.started = time.perf_counter()
        try:
            with _StopSignals() as stop:
                while self.pending or self.active:
                    if stop.signalled:
                        raise Cancelled()
                    self._start_transfers()
                    self._pump()
                    self._journal_written()
                    self._maybe_checkpoint()
        except BaseException:
            self._close()
            with contextlib.suppress(DrivepipeError):  # keep the original error
                self._journal_written()
                self.checkpoint()
            raise
        self._close()
        self._journal_written()
        self.checkpoint()

    def _close(self) -> None:
        self._abort_all()
        self.multi.close()
        self.writer.close()
        self.receive.finished = time.perf_counter()

    def _plan(self) -> None:
        if not self.ranges:
            if self.journal.block_count and len(self.journal.blocks) < self.journal.block_count:
                self.pending.append(Span(0, self.journal.block_count))
            return
        per_range = max(1, self.opts.range_size // self.journal.block_size)
        self.pending.extend(missing_spans(self.journal, per_range))

    def _start_transfers(self) -> None:
        now = time.monotonic()
        for _ in range(len(self.pending)):
            if len(self.active) >= max(1, self.opts.connections):
                break
            span = self.pending.popleft()
            if span.not_before > now:
                self.pending.append(span)
                continue
            self._start(span)
        extra = self.receive.extra
        extra["in_flight"] = len(self.active)
        extra["connections"] = max(extra.get("connections", 0), len(self.active))

    def _start(self, span: Span) -> None:
        start, _ = self.journal.block_span(span.first)
        last_start, last_len = self.journal.block_span(span.last - 1)
        t = _Transfer(span, start, last_start + last_len, not self.ranges,
                      self.journal.block_size, self._submit_block, self.receive,
                      self.journal.identity, buf=self.writer.buffer())
        url = self.probed.final_url
        # A redirect target is a signed link: it gets no credentials at all.
        auth = Auth() if self.probed.redirected else self.auth
        configure(t.handle, url, tls=self.tls, endpoint=auth.endpoint, creds=auth.creds,
                  headers=self._range_headers())
        if not t.whole:
            t.handle.setopt(pycurl.RANGE, f"{t.start}-{t.end - 1}")
        t.handle.setopt(pycurl.BUFFERSIZE, RECV_BUFFER)
        t.handle.setopt(pycurl.HEADERFUNCTION, t.headers)
        t.handle.setopt(pycurl.WRITEFUNCTION, t.on_body)
        self.multi.add_handle(t.handle)
        self.active[t.handle] = t

    def _range_headers(self) -> dict[str, str]:
        etag = self.probed.strong_etag
        return {"If-Range": etag} if etag and self.ranges else {}

    def _pump(self) -> None:
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
        if self.active:
            self.multi.select(0.2)
        elif self.pending:
            wait = min(s.not_before for s in self.pending) - time.monotonic()
            time.sleep(min(max(wait, 0.0), 0.2))

    # -- bytes in --

    def _submit_block(self, index: int, buf: bytearray, length: int) -> bytearray:
        return self.writer.submit(index, buf, length)

    def _journal_written(self) -> None:
        """Record the blocks the writer finished (only written blocks get journaled)."""
        while self.writer.written:
            block = self.writer.written.popleft()
            self.journal.blocks[block.index] = block.digest
            self.write.bytes += block.length
            self.write.data_bytes += block.written
            self.write.hole_bytes += block.length - block.written
            self.dirty = True
            if self.on_stored is not None:
                self.on_stored()
        if self.writer.error is not None:
            raise self.writer.error

    # -- a transfer ends --

    def _finish(self, t: _Transfer, code: int, message: str) -> None:
        self._drop(t)
        if isinstance(t.failure, _RangeIgnored):
            self._switch_to_one_stream()
            return
        if t.failure is not None:
            raise t.failure
        status = t.headers.status
        if code == 0 and t.accepted and t.pos == t.end:
            return
        if (t.checked and not t.accepted) or (code == 0 and status not in (200, 206)):
            self._http_error(t)
            return
        if code == 0:
            self._retry(t, _cut_short(t))
            return
        failure = curl_failure(pycurl.error(code, message), t.handle_url, "download")
        if not failure.transient:
            raise failure
        self._retry(t, failure)

    def _drop(self, t: _Transfer) -> None:
        t.handle_url = str(t.handle.getinfo(pycurl.EFFECTIVE_URL))
        self.multi.remove_handle(t.handle)
        t.handle.close()
        del self.active[t.handle]

    def _http_error(self, t: _Transfer) -> None:
        resp = Response(t.headers.status, t.headers.headers, t.error_body.getvalue(),
                        t.handle_url)
        err = http_failure(resp, "download")
        if resp.status == 416:
            raise SourceChanged("the source changed (the range asked for is past its end)")
        if resp.status in _LINK_EXPIRED and self.probed.redirected and self._renew_link():
            self.pending.appendleft(Span(t.resume_block, t.span.last, t.span.attempt))
            return
        if not err.transient:
            raise err
        self._retry(t, err)

    def _renew_link(self) -> bool:
        if self.relink is None or self.relinks >= self.opts.relinks:
            return False
        self.relinks += 1
        self.receive.extra["relinks"] = self.relinks
        fresh = self.relink()
        if fresh.size != self.probed.size or (fresh.etag or None) != (self.probed.etag or None):
            raise SourceChanged("the source changed while its link was renewed")
        self.probed = fresh
        return True

    def _retry(self, t: _Transfer, err: DrivepipeError) -> None:
        progressed = t.resume_block > t.span.first
        attempt = 0 if progressed else t.span.attempt + 1
        if attempt > self.opts.retries:
            raise err
        first = 0 if t.whole else t.resume_block
        delay = backoff_delay(attempt, self.opts.backoff_base, self.opts.backoff_cap, self.rng)
        delay = max(delay, retry_after(t.headers.headers, self.opts.backoff_cap))
        self.pending.append(Span(first, t.span.last, attempt, time.monotonic() + delay))
        self.receive.extra["retries"] += 1

    def _switch_to_one_stream(self) -> None:
        """The server ignores Range: drop the ranged plan, fetch the whole file once."""
        if not self.ranges:
            return
        self.ranges = False
        self._abort_all()
        self.pending.clear()
        self.pending.append(Span(0, self.journal.block_count))

    def _abort_all(self) -> None:
        for t in list(self.active.values()):
            self.multi.remove_handle(t.handle)
            t.handle.close()
        self.active.clear()

    # -- the journal --

    def _maybe_checkpoint(self) -> None:
        # A huge journal (a drive of many blocks) is saved less often: at most ~5% of
        # the time goes to saving it.
        interval = max(self.opts.checkpoint_interval, 20 * self.save_seconds)
        if time.monotonic() - self.last_checkpoint >= interval:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the journal if blocks finished since the last save."""
        started = time.monotonic()
        if self.dirty:
            self.journal.save(self.journal_path)
            self.dirty = False
            self.save_seconds = time.monotonic() - started
        self.last_checkpoint = time.monotonic()

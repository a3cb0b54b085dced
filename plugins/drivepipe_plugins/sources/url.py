"""An http(s) URL as a byte source: ranges for random reads, streams that resume.

In: a URL, the transport policy (:class:`~drivepipe.transport.curl.TlsOptions`)
and optionally an endpoint with its credentials.  The first request is a
``GET`` with ``Range: bytes=0-0`` following redirects; it teaches the final
URL (often a signed one), the size, the ETag / Last-Modified and whether
ranges work.  What the server allows decides what the source is:

- ranges and a size (``206`` with ``Content-Range: bytes 0-0/N``): a *random*
  source.  :meth:`UrlSource.pread` goes through a small cache of aligned
  blocks (:data:`BLOCK`, :data:`CACHE_BLOCKS` of them) that reads ahead when
  reads follow each other, so the metadata reads of qcow2, VHD or VMDK cost a
  few requests, not thousands; a read of :data:`DIRECT_READ` bytes or more is
  one ranged request of its own.  :meth:`UrlSource.read_range` (and
  :meth:`extents`) stream a whole span with one ``GET``;
- a size but no ranges (``200`` with ``Content-Length``): a *sequential*
  source, streamed from the start; every pass (detection, a counting pass, the
  transfer) is a new ``GET``;
- no size (no ``Content-Length``, ``Content-Range: bytes 0-0/*``): a stream
  of unknown length (``size_known`` False), which the registry spools, or
  checks against a size the caller announced, like a pipe.

A transfer that breaks (reset, timeout, a body cut short, 5xx, 429) continues
from the byte where it stopped with a new ranged request carrying ``If-Range``
(strong ETag), after the backoff of the one retry policy
(:data:`drivepipe.transport.retry.TRANSFER_POLICY`, ``Retry-After`` honoured), as
many times in a row without a byte of progress as it allows; without ranges
the whole body is asked for again and what was already passed on is skipped.
An answer whose ETag, Last-Modified or size differ from the first one's - or a
ranged request answered with the whole file - means the file changed on the
server: that is an error, never a mix of two versions.  An expired signed link
(401/403/404/410 after a redirect) is renewed by probing the original URL again.

Credentials (Basic) are attached by :func:`drivepipe.transport.curl.configure`,
only to URLs on the endpoint's origin, never over plain http to a remote host,
and never after a redirect to another origin (libcurl does not re-send them
while following, and the requests that follow go to the final URL without
them).  A URL carrying ``user:password`` is refused without echoing it.
Error lines name the URL without its query string (signed links carry secrets
there).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pycurl

from drivepipe._errors import (
    ImageError,
    NetworkError,
    SourceChanged,
    TransferError,
    UsageError,
)
from drivepipe._extent import Extent, split_zeros
from drivepipe._stage import HEAD_SIZE, ByteSource
from drivepipe.cloudsigma.config import Credentials, Endpoint, origin
from drivepipe.transport import curl
from drivepipe.transport.curl import HeaderCollector, Response, TlsOptions, safe_url
from drivepipe.transport.retry import TRANSFER_POLICY, RetryPolicy, is_transient

#: the cache's unit: reads are rounded out to whole aligned blocks
BLOCK = 1 << 20
#: blocks kept (memory: this many blocks)
CACHE_BLOCKS = 16
#: blocks fetched at most in one request when reads follow each other
READAHEAD_BLOCKS = 8
#: a pread this long skips the cache: one ranged request of its own
DIRECT_READ = 2 * BLOCK
#: libcurl hands the body over in pieces up to this size (fewer Python callbacks)
RECV_BUFFER = 1 << 20
#: keep at most this much of an error answer's body for the message
_ERROR_BODY_MAX = 64 << 10
#: answers on a signed link that mean "ask for a new link"
_LINK_EXPIRED = frozenset({401, 403, 404, 410})
#: renewals of an expired link within one transfer
_RELINKS = 3
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSIZED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def check_url(url: str) -> None:
    """Refuse what is not an http(s) URL, and URLs that carry a user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        has_user = parts.username is not None or parts.password is not None
    except ValueError:
        raise UsageError("not a valid http(s) URL") from None
    if "@" in parts.netloc or has_user:
        # never echoed: the text holds the password
        raise UsageError("an image URL must not contain a user or password; credentials "
                         "come from the configured account, and go only to its endpoint")
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise UsageError(f"not an http(s) URL: {safe_url(url)!r}")


class _Relink(Exception):
    """A signed link expired: probe the original URL again."""


@dataclass
class _Probe:
    final: str
    redirected: bool
    size: int | None
    ranges: bool
    etag: str | None
    last_modified: str | None


@dataclass(eq=False)
class _Conn:
    """One easy handle and the multi that drives it; the multi keeps the connection
    alive between requests."""

    easy: pycurl.Curl = field(default_factory=pycurl.Curl)
    multi: pycurl.CurlMulti = field(default_factory=pycurl.CurlMulti)

    def close(self) -> None:
        self.multi.close()
        self.easy.close()


class _Get:
    """The body of one GET as it arrives: checked once, bytes to skip skipped (a server
    without ranges sends everything again), cut at ``want``, queued in ``pieces``."""

    def __init__(self, pos: int, want: int | None, skip: int, ranged: bool,
                 check: Callable[[], bool], label: str) -> None:
        self.pos, self.want, self.skip, self.ranged = pos, want, skip, ranged
        self.check = check
        self.label = label
        self.checked = self.ok = False
        self.got = 0
        #: we stopped the body ourselves (enough bytes): the write error that follows is ours
        self.stopped = False
        self.failure: BaseException | None = None
        self.error_body = bytearray()
        self.pieces: deque[bytes] = deque()

    def on_body(self, chunk: bytes) -> int | None:
        try:
            if not self.checked:
                self.checked = True
                self.ok = self.check()
            if not self.ok:
                if len(self.error_body) + len(chunk) > _ERROR_BODY_MAX:
                    return 0
                self.error_body += chunk
                return None
            if self.skip:
                n = min(self.skip, len(chunk))
                self.skip -= n
                chunk = chunk[n:]
            if self.want is not None and self.got + len(chunk) >= self.want:
                if self.ranged and self.got + len(chunk) > self.want:
                    raise TransferError(f"{self.label}: the server sent more bytes than "
                                        f"asked for (from byte {self.pos})")
                chunk = chunk[: self.want - self.got]
                self.stopped = not self.ranged
            if chunk:
                self.pieces.append(chunk)
                self.got += len(chunk)
            return 0 if self.stopped else None
        except BaseException as exc:  # perform() reports a write error; raised after it
            self.failure = exc
            return 0


class UrlSource(ByteSource):
    """The bytes at an http(s) URL; random when the server answers ranges.

    Thread-safe: the chunked upload reads ranges from several threads, each
    request on a connection of its own from a small pool."""

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        tls: TlsOptions | None = None,
        endpoint: Endpoint | None = None,
        creds: Credentials | None = None,
        read_size: int = 4 << 20,
        retry: RetryPolicy | None = None,
        cache_blocks: int = CACHE_BLOCKS,
        label: str | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        check_url(url)
        self.url = url
        self.label = label or safe_url(url)
        self.tls = tls or TlsOptions()
        owned = endpoint is not None and creds is not None and endpoint.owns(url)
        #: the account for the URL itself (probes, renewals of a signed link) ...
        self._own_endpoint = endpoint if owned else None
        self._own_creds = creds if owned else None
        #: ... and for the reads from where it led (none after a move to another origin)
        self._endpoint, self._creds = self._own_endpoint, self._own_creds
        self.read_size = max(4096, read_size)
        self.retry = retry or TRANSFER_POLICY
        self.notify = notify
        self.cache_blocks = max(1, cache_blocks)
        #: requests made (the probe included), for tests and statistics
        self.requests = 0
        self._lock = threading.Lock()
        self._pool: list[_Conn] = []
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._last_end = -1
        self._streak = 0
        self._head: bytes | None = None
        self._closed = False
        probe = self._with_retries(self._probe_once)
        self._adopt(probe)
        self.etag = probe.etag
        self.last_modified = probe.last_modified
        self.size_known = probe.size is not None
        self.size = probe.size or 0
        self.ranges = probe.ranges and self.size_known
        self.random = self.ranges

    # -- what the server said ---------------------------------------------------------

    def _adopt(self, probe: _Probe) -> None:
        self._final = probe.final
        self.redirected = probe.redirected
        if origin(probe.final) != origin(self.url):
            # credentials never follow a redirect to another origin, not even later
            self._endpoint, self._creds = None, None
        else:
            self._endpoint, self._creds = self._own_endpoint, self._own_creds

    @property
    def strong_etag(self) -> str | None:
        """The ETag when ``If-Range`` may use it (weak validators may not)."""
        return self.etag if self.etag and not self.etag.startswith("W/") else None

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _probe_once(self) -> _Probe:
        c = pycurl.Curl()
        hdr = HeaderCollector()
        body = bytearray()

        def on_body(chunk: bytes) -> int | None:
            if hdr.status in (200, 206) or len(body) + len(chunk) > _ERROR_BODY_MAX:
                return 0  # the headers are all we wanted
            body.extend(chunk)
            return None

        try:
            curl.configure(c, self.url, tls=self.tls, endpoint=self._own_endpoint,
                           creds=self._own_creds, follow=True)
            c.setopt(pycurl.RANGE, "0-0")
            c.setopt(pycurl.HEADERFUNCTION, hdr)
            c.setopt(pycurl.WRITEFUNCTION, on_body)
            self._count()
            try:
                c.perform()
            except pycurl.error as exc:
                if exc.args[0] != pycurl.E_WRITE_ERROR:  # not our own stop after the headers
                    raise curl.curl_failure(exc, self.url, f"reading {self.label}") from exc
            final = str(c.getinfo(pycurl.EFFECTIVE_URL) or self.url)
            redirected = int(c.getinfo(pycurl.REDIRECT_COUNT)) > 0
        finally:
            c.close()
        return self._probe_result(final, redirected, hdr, bytes(body))

    def _probe_result(
        self, final: str, redirected: bool, hdr: HeaderCollector, body: bytes
    ) -> _Probe:
        status, headers = hdr.status, hdr.headers
        etag, modified = headers.get("etag"), headers.get("last-modified")
        if status == 416:
            unsized = _UNSIZED_RANGE_RE.match(headers.get("content-range", ""))
            if unsized and int(unsized.group(1)) == 0:  # an empty file
                return _Probe(final, redirected, 0, True, etag, modified)
        if status == 206:
            m = _CONTENT_RANGE_RE.match(headers.get("content-range", ""))
            if not m:
                raise TransferError(f"{self.label}: the server answered a range without "
                                    "saying which (no Content-Range)")
            size = None if m.group(3) == "*" else int(m.group(3))
            return _Probe(final, redirected, size, size is not None, etag, modified)
        if status == 200:
            length = headers.get("content-length", "")
            size = int(length) if length.isdigit() else None
            return _Probe(final, redirected, size, False, etag, modified)
        raise curl.http_failure(Response(status, headers, body, final), f"reading {self.label}")

    def _answer_error(self, resp: Response, redirected: bool) -> BaseException:
        """What an error answer means: retry later, renew the link, or fail."""
        if resp.status == 416:
            return SourceChanged(f"{self.label}: the file changed on the server while it "
                                 f"was being read (it is now shorter than {self.size} bytes)")
        if redirected and resp.status in _LINK_EXPIRED:
            return _Relink()
        return curl.http_failure(resp, f"reading {self.label}")

    def _same_file(self, headers: dict[str, str]) -> None:
        """Raise SourceChanged when an answer's validators differ from the probe's."""
        etag, modified = headers.get("etag"), headers.get("last-modified")
        if self.etag and etag and etag != self.etag:
            raise SourceChanged(f"{self.label}: the file changed on the server while it was "
                                f"being read (ETag {self.etag} became {etag}); start again")
        if not self.etag and self.last_modified and modified and modified != self.last_modified:
            raise SourceChanged(f"{self.label}: the file changed on the server while it was "
                                f"being read (Last-Modified {self.last_modified} became "
                                f"{modified}); start again")

    def _relink(self) -> None:
        probe = self._with_retries(self._probe_once)
        if probe.size != (self.size if self.size_known else None) or (
                self.etag and probe.etag != self.etag):
            raise SourceChanged(f"{self.label}: the file changed on the server while it was "
                                "being read (a renewed link points at other bytes); start "
                                "again")
        self._adopt(probe)

    def _with_retries(self, call: Callable[[], _Probe]) -> _Probe:
        def on_retry(exc: BaseException, wait: float) -> None:
            self._note(f"{self.label}: {_one_line(exc)}; asking again in {wait:.1f} s")

        return self.retry.call(call, on_retry=on_retry)

    def _note(self, text: str) -> None:
        if self.notify is not None:
            self.notify(text)

    # -- connections ------------------------------------------------------------------

    def _take_conn(self) -> _Conn:
        with self._lock:
            if self._closed:
                raise ImageError(f"{self.label}: read after close")
            return self._pool.pop() if self._pool else _Conn()

    def _give_back(self, conn: _Conn, clean: bool) -> None:
        with self._lock:
            if clean and not self._closed and len(self._pool) < 8:
                self._pool.append(conn)
                return
        conn.close()

    # -- transfers --------------------------------------------------------------------

    def _transfer(self, start: int, end: int | None) -> Iterator[bytes]:
        """The bytes of ``[start, end)`` (to the end of the body when ``end`` is None),
        in pieces, continuing where a broken request stopped."""
        pos = start
        failures = relinks = 0
        while end is None or pos < end:
            try:
                for piece in self._one_get(pos, end):
                    pos += len(piece)
                    failures = 0
                    yield piece
                return
            except _Relink:
                relinks += 1
                if relinks > _RELINKS:
                    raise TransferError(f"{self.label}: the link kept expiring (renewed "
                                        f"{_RELINKS} times)") from None
                self._note(f"{self.label}: the link expired at byte {pos}; renewing it")
                self._relink()
            except TransferError as exc:
                failures += 1
                wait = self.retry.next_delay(exc, failures)
                if wait is None:
                    if is_transient(exc):
                        raise NetworkError(
                            f"{self.label}: gave up at byte {pos} after {failures} attempts "
                            f"in a row: {exc.one_line()}") from exc
                    raise
                self._note(f"{self.label}: {exc.one_line()}; continuing from byte {pos} in "
                           f"{wait:.1f} s (retry {failures} of {self.retry.retries})")
                time.sleep(wait)

    def _one_get(self, pos: int, end: int | None) -> Iterator[bytes]:
        """One GET of ``[pos, end)``; what may work when asked again raises a transient error."""
        ranged = self.ranges and end is not None
        hdr = HeaderCollector()
        st = _Get(pos, None if end is None else end - pos, 0 if ranged else pos, ranged,
                  lambda: self._check(hdr, pos, end, ranged), self.label)
        conn = self._take_conn()
        c, m = conn.easy, conn.multi
        c.reset()
        headers = {"If-Range": self.strong_etag} if ranged and self.strong_etag else {}
        curl.configure(c, self._final, tls=self.tls, endpoint=self._endpoint,
                       creds=self._creds, headers=headers, follow=True)
        if ranged:
            c.setopt(pycurl.RANGE, f"{pos}-{(end or 0) - 1}")
        c.setopt(pycurl.BUFFERSIZE, RECV_BUFFER)
        c.setopt(pycurl.HEADERFUNCTION, hdr)
        c.setopt(pycurl.WRITEFUNCTION, st.on_body)
        m.add_handle(c)
        self._count()
        clean = False
        try:
            active = 1
            while active:
                ret, active = m.perform()
                while ret == pycurl.E_CALL_MULTI_PERFORM:
                    ret, active = m.perform()
                while st.pieces:
                    yield st.pieces.popleft()
                if active:
                    m.select(1.0)
            self._finished(st, hdr, m.info_read()[2], int(c.getinfo(pycurl.REDIRECT_COUNT)))
            clean = not st.stopped
        finally:
            m.remove_handle(c)
            self._give_back(conn, clean)

    def _finished(self, st: _Get, hdr: HeaderCollector, failed: list[tuple[object, int, str]],
                  redirects: int) -> None:
        """Raise what went wrong with a finished GET, if anything did."""
        if st.failure is not None:
            raise st.failure
        if failed and not (failed[0][1] == pycurl.E_WRITE_ERROR and st.stopped):
            code, message = failed[0][1], failed[0][2]
            raise curl.curl_failure(pycurl.error(code, message), self._final,
                                    f"reading {self.label}")
        if not st.checked:  # an answer without a body
            st.ok = st.check()
        if not st.ok:
            raise self._answer_error(
                Response(hdr.status, hdr.headers, bytes(st.error_body), self._final),
                self.redirected or redirects > 0)
        if st.want is not None and st.got < st.want:
            raise NetworkError(f"reading {self.label}: the answer ended after {st.got} of "
                               f"{st.want} bytes")

    def _check(self, hdr: HeaderCollector, pos: int, end: int | None, ranged: bool) -> bool:
        """True if the answer is the body asked for, False if it is an error answer to
        collect; raises SourceChanged when it is another file's bytes."""
        status, headers = hdr.status, hdr.headers
        if status not in (200, 206):
            return False
        self._same_file(headers)
        if status == 206:
            m = _CONTENT_RANGE_RE.match(headers.get("content-range", ""))
            total = m.group(3) if m else ""
            if (not ranged or m is None or end is None or int(m.group(1)) != pos
                    or int(m.group(2)) != end - 1 or (total != "*" and int(total) != self.size)):
                raise SourceChanged(
                    f"{self.label}: the file changed on the server while it was being read "
                    f"(asked for bytes {pos}-{(end or 0) - 1} of {self.size}, got "
                    f"{headers.get('content-range', 'no Content-Range')}); start again")
            return True
        if ranged and self.strong_etag:
            # If-Range said "only if unchanged": a whole new body means it changed
            raise SourceChanged(f"{self.label}: the file changed on the server while it was "
                                "being read (a ranged request got the whole file back); "
                                "start again")
        if ranged:
            raise TransferError(f"{self.label}: the server stopped answering ranges (it "
                                "sent the whole file for a part of it); a file can only be "
                                "read from it front to back now")
        length = headers.get("content-length", "")
        if self.size_known and length.isdigit() and int(length) != self.size:
            raise SourceChanged(f"{self.label}: the file changed on the server while it was "
                                f"being read (now {length} bytes, not {self.size}); start "
                                "again")
        return True

    # -- ByteSource -------------------------------------------------------------------

    def head(self, length: int = HEAD_SIZE) -> bytes:
        if self.random:
            return self.pread(0, min(length, self.size))
        want = min(length, self.size) if self.size_known else length
        if self._head is None or len(self._head) < want:
            self._head = b"".join(self._transfer(0, want)) if want else b""
        return self._head[:want]

    def pread(self, offset: int, length: int) -> bytes:
        if not self.random:
            return super().pread(offset, length)
        if offset < 0 or length < 0:
            raise ValueError(f"pread({offset}, {length})")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        if end - offset >= DIRECT_READ:
            with self._cache_lock:
                self._note_read(offset, end)
            return self._fetch(offset, end)
        with self._cache_lock:
            ahead = self._note_read(offset, end)
            first, last = offset // BLOCK, (end - 1) // BLOCK
            missing = [b for b in range(first, last + 1) if b not in self._cache]
            if missing:
                lo, hi = missing[0], missing[-1] + 1
                ahead = min(ahead, max(1, self.cache_blocks // 2))
                if hi - lo < ahead:
                    hi = min(lo + ahead, -(-self.size // BLOCK))
                data = self._fetch(lo * BLOCK, min(hi * BLOCK, self.size))
                for index in range(lo, hi):
                    self._cache[index] = data[(index - lo) * BLOCK : (index - lo + 1) * BLOCK]
            parts = []
            for index in range(first, last + 1):
                block = self._cache[index]
                self._cache.move_to_end(index)
                base = index * BLOCK
                parts.append(block[max(offset, base) - base : min(end, base + BLOCK) - base])
            while len(self._cache) > max(self.cache_blocks, last - first + 1):
                self._cache.popitem(last=False)
        return b"".join(parts)

    def _note_read(self, offset: int, end: int) -> int:
        """Blocks to fetch ahead: more while reads follow each other (two threads of a
        format may hand them over slightly out of order), none after a jump."""
        if self._last_end >= 0 and abs(offset - self._last_end) <= 2 * BLOCK:
            self._streak += 1
        else:
            self._streak = 0
        self._last_end = max(end, self._last_end) if self._streak else end
        return min(READAHEAD_BLOCKS, 1 << self._streak) if self._streak else 1

    def _fetch(self, start: int, end: int) -> bytes:
        buf = bytearray()
        for piece in self._transfer(start, end):
            buf += piece
        return bytes(buf)

    def read_range(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents of ``[offset, offset+length)`` from one streamed GET (continued where
        it breaks), in pieces of ``read_size`` aligned to it, zero blocks as holes."""
        if not self.random and offset != 0:
            return super().read_range(offset, length)
        end = min(offset + length, self.size)
        return self._stream(offset, end)

    def _stream(self, offset: int, end: int | None) -> Iterator[Extent]:
        step = self.read_size
        at = offset
        buf = bytearray()
        limit = step - at % step
        for piece in self._transfer(offset, end) if end is None or offset < end else ():
            view = memoryview(piece)
            while view:
                n = min(limit - len(buf), len(view))
                buf += view[:n]
                view = view[n:]
                if len(buf) == limit:
                    yield from split_zeros(Extent(at, len(buf), buf))
                    at += len(buf)
                    buf = bytearray()
                    limit = step
        if buf:
            yield from split_zeros(Extent(at, len(buf), buf))
            at += len(buf)
        if not self.size_known:
            self.size = at

    def extents(self) -> Iterator[Extent]:
        if not self.size_known:
            return self._stream(0, None)
        return self.read_range(0, self.size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()
        self._cache.clear()


def _one_line(exc: BaseException) -> str:
    return exc.one_line() if isinstance(exc, TransferError) else str(exc)


__all__ = ["UrlSource", "check_url"]

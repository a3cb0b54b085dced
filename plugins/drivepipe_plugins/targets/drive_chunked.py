"""Resumable chunked upload: an image in, a drive filled chunk by chunk over N connections.

In: an opened image (:class:`~drivepipe.ImageInput`), a connection to an
endpoint, and :class:`ChunkedOptions`.  The protocol is the link protocol of
``cloudsigma-api.md``: ``POST initupload/`` creates the drive with the image's
exact raw size; for each chunk ``k`` (``n = size // S`` chunks, the last one
absorbing the remainder) ``POST drives/{uuid}/action/?do=upload_chunk`` (with
credentials) returns a one-time link, and the chunk's raw bytes are POSTed to
that link on the API host (without credentials).  Up to ``connections``
transfers run at once on one pycurl multi handle.

Out: :class:`ChunkedResult` with the drive UUID and the xxh3-128 of the whole
raw stream (equal to ``xxh128sum`` of the raw image, also after a resume).

Reading: random-access inputs (raw, qcow2) are read chunk by chunk by a few
reader threads, out of order; stream-only inputs (gzip, xz, ...) run through
their decoders once, in order.  Either way a feeder thread hashes the chunks
in image order, and at most ``connections + 1`` chunks are in memory, fewer
when that would pass 256 MiB (``memory_budget``; never fewer than two); holes
take no memory: they are sent from the shared zero buffer.

Resuming: a journal (:mod:`.upload_journal`) records the drive, the image's
identity and the confirmed chunks.  Rerunning the same command checks the
drive's size, fast-forwards through confirmed chunks (hashed, not sent) and
sends the rest; the journal's chunk size wins over the option's, since the
chunk numbers depend on it.  ``resume_uuid`` resumes a drive without a journal,
the server's 416 answers telling which chunks are already there.  One run per
journal at a time (a lock beside it); the journal is removed once the drive
has left ``uploading``.

Faults: 5xx, 408/429, resets and timeouts are retried with exponential backoff
and jitter, at most ``retries`` times per chunk; a link refused with another
4xx is taken as expired and requested again; other 4xx answers of the API stop
the upload with one line (which names the drive to resume).  Ctrl-C stops at
once, keeping drive and journal.  Refused: an image that changed since its
journal was written, a drive whose size is not the image's, an empty image, a
second run on the same journal.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import json
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import pycurl
import xxhash

from drivepipe._errors import (
    Cancelled,
    HTTPError,
    ImageError,
    NetworkError,
    SizeMismatch,
    TransferError,
    UsageError,
)
from drivepipe._extent import ZERO_SIZE, ZERO_VIEW, Extent, zero_chunks
from drivepipe._runner import exact_size, metered
from drivepipe._stage import ImageInput, RandomAccess
from drivepipe._stats import RunStats, StageStats
from drivepipe.cloudsigma.connection import Connection
from drivepipe.resume.upload_journal import (
    ImageIdentity,
    JournalLock,
    UploadJournal,
    default_journal_path,
)
from drivepipe.transport.http import (
    UUID_RE,
    HeaderCollector,
    Response,
    configure,
    curl_failure,
    http_failure,
    parse_uuid,
)
from drivepipe_plugins.targets.drive_upload import Interrupts

#: libcurl's upload buffer (CURLOPT_UPLOAD_BUFFERSIZE accepts 16 KiB - 2 MiB)
UPLOAD_BUFFER: Final = 1 << 20
#: seconds before the first retry; doubles per attempt up to BACKOFF_CAP
BACKOFF_BASE: Final = 0.25
BACKOFF_CAP: Final = 15.0
T = TypeVar("T")

#: chunk bytes held in memory at most (unless two chunks alone are larger)
MEMORY_BUDGET: Final = 256 << 20
#: how long a drive may stay "uploading" after its last chunk landed
FINISH_TIMEOUT: Final = 30.0
#: link answers that a fresh link will not fix: the request itself is wrong
_FATAL_LINK_STATUS: Final = frozenset({400, 411, 413, 415, 422})
_TRANSIENT_STATUS: Final = frozenset({408, 429})
_SEEK_OK: Final = int(pycurl.SEEKFUNC_OK)
_SEEK_CANT: Final = int(pycurl.SEEKFUNC_CANTSEEK)


class ResumeRefused(UsageError):
    """The journal or the drive does not fit the image: resuming would corrupt the drive."""


@dataclass
class ChunkedOptions:
    chunk_size: int = 32 << 20
    connections: int = 4
    #: resume this drive, with or without a journal
    resume_uuid: str | None = None
    #: default: under $XDG_CACHE_HOME/drivepipe/uploads, keyed by image path and endpoint
    journal_path: str | None = None
    #: attempts per chunk after a transient failure
    retries: int = 8
    #: the drive's name (default: the image's file name)
    name: str | None = None
    media: str = "disk"
    backoff_base: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP
    #: fewer chunks are in flight than ``connections`` when their data would exceed this
    memory_budget: int = MEMORY_BUDGET
    #: seconds the drive may stay "uploading" once every chunk is confirmed
    finish_timeout: float = FINISH_TIMEOUT

    def chunks_in_memory(self, chunk_size: int) -> int:
        """``connections + 1`` chunks (one sent per connection, one being read), within budget."""
        return max(2, min(self.connections + 1, self.memory_budget // max(1, chunk_size)))


@dataclass
class ChunkedResult:
    uuid: str
    #: xxh3-128 hex of the whole raw stream
    xxh128: str
    size: int
    #: body bytes of the chunks this run sent and the server accepted
    sent_bytes: int
    #: chunks not sent: confirmed in the journal or answered 416
    skipped_chunks: int
    chunks: int = 0
    resumed: bool = False
    #: body bytes handed to libcurl, failed attempts included
    wire_bytes: int = 0
    journal_path: str = ""


@dataclass(frozen=True)
class ChunkPlan:
    """How ``size`` bytes split into chunks of nominal size ``chunk_size``."""

    size: int
    chunk_size: int

    @property
    def count(self) -> int:
        return max(1, self.size // self.chunk_size)

    def span(self, number: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``number``; the last one takes the remainder."""
        offset = number * self.chunk_size
        if number == self.count - 1:
            return offset, self.size - offset
        return offset, self.chunk_size


# --- the drive and the journal ----------------------------------------------------------


@dataclass
class Session:
    uuid: str
    journal: UploadJournal
    resumed: bool


def backoff(options: ChunkedOptions, attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): doubling, capped, with jitter."""
    delay = min(options.backoff_cap, options.backoff_base * 2 ** (attempt - 1))
    return random.uniform(delay / 2, delay)


def _transient(exc: TransferError) -> bool:
    return exc.transient


def _not_processed(exc: TransferError) -> bool:
    """True for a failed create that surely created nothing: refused (503/429) or unsent."""
    if isinstance(exc, HTTPError):
        return exc.status in (429, 503)
    return isinstance(exc, NetworkError) and exc.curl_code == pycurl.E_COULDNT_CONNECT


def _retrying(
    call: Callable[[], T], options: ChunkedOptions,
    retry_if: Callable[[TransferError], bool] = _transient,
) -> T:
    """``call()``, repeated after transient failures like a chunk would be."""
    attempt = 0
    while True:
        try:
            return call()
        except TransferError as exc:
            attempt += 1
            if attempt > options.retries or not retry_if(exc):
                raise
            time.sleep(backoff(options, attempt))


def _drive_state(
    conn: Connection, uuid: str, what: str, options: ChunkedOptions
) -> tuple[int, str]:
    """``(size, status)`` of a drive to resume; refused when it is gone."""
    try:
        drive = _retrying(lambda: conn.api.drive(uuid), options)
    except HTTPError as exc:
        if exc.status == 404:
            raise ResumeRefused(f"drive {uuid} ({what}) does not exist") from exc
        raise
    try:
        size = int(float(drive.get("size", -1)))
    except (TypeError, ValueError):
        size = -1
    return size, str(drive.get("status", ""))


def _check_drive(
    conn: Connection, uuid: str, size: int, what: str, options: ChunkedOptions, *,
    ours: bool = False,
) -> None:
    found, status = _drive_state(conn, uuid, what, options)
    # A drive this upload finished (killed before its journal was removed) may have
    # been grown to the minimum drive size: its chunks will all answer 416.
    if found == size or (ours and status != "uploading" and found > size):
        return
    raise ResumeRefused(f"drive {uuid} ({what}) holds {found} bytes but the image is "
                        f"{size} bytes: it is not this image's upload")


def _create_drive(conn: Connection, image: ImageInput, options: ChunkedOptions) -> str:
    name = options.name or os.path.basename(image.path) or "drivepipe"
    body = {"name": name, "size": image.size, "media": options.media}
    resp = _retrying(
        lambda: conn.api.request("POST", conn.api.url("initupload/"), json_body=body,
                                 what="create drive (initupload)"),
        options, _not_processed)
    return parse_uuid(resp.body)


def _resume_explicit(
    conn: Connection, image: ImageInput, options: ChunkedOptions, identity: ImageIdentity,
    journal: UploadJournal | None, path: str,
) -> Session:
    uuid = (options.resume_uuid or "").strip().lower()
    if not UUID_RE.match(uuid):
        raise UsageError(f"--resume takes a drive UUID, got {options.resume_uuid!r}")
    _check_drive(conn, uuid, image.size, "--resume", options)
    if journal is not None and journal.uuid == uuid and not journal.image.differences(identity):
        return Session(uuid, journal, True)
    fresh = UploadJournal(path, uuid, conn.endpoint.api, identity, image.size,
                          options.chunk_size)
    fresh.save()
    return Session(uuid, fresh, True)


def _resume_journal(
    conn: Connection, image: ImageInput, options: ChunkedOptions, identity: ImageIdentity,
    journal: UploadJournal,
) -> Session:
    where = f"journal {journal.path}"
    changed = journal.image.differences(identity)
    if changed or journal.raw_size != image.size:
        what = ", ".join(changed) or "raw size"
        raise ResumeRefused(
            f"{image.path} changed since the interrupted upload to drive {journal.uuid} "
            f"({what} differ); delete {journal.path} to start a new upload, or pass --resume "
            f"{journal.uuid} to continue into that drive anyway")
    if journal.api != conn.endpoint.api:
        raise ResumeRefused(f"{where} belongs to {journal.api}, not {conn.endpoint.api}; "
                            "delete it or pass another journal path")
    try:
        _check_drive(conn, journal.uuid, image.size, where, options, ours=True)
    except ResumeRefused as exc:
        raise ResumeRefused(f"{exc}; delete {journal.path} to start a new upload") from exc
    return Session(journal.uuid, journal, True)


def open_session(
    conn: Connection, image: ImageInput, options: ChunkedOptions, path: str
) -> Session:
    """Resume the journal's (or the given) drive, or create a new one and its journal."""
    identity = ImageIdentity.of(image.path)
    journal = UploadJournal.load(path)
    if options.resume_uuid:
        return _resume_explicit(conn, image, options, identity, journal, path)
    if journal is not None:
        return _resume_journal(conn, image, options, identity, journal)
    uuid = _create_drive(conn, image, options)
    fresh = UploadJournal(path, uuid, conn.endpoint.api, identity, image.size,
                          options.chunk_size)
    fresh.save()
    return Session(uuid, fresh, False)


# --- producing chunks in order -----------------------------------------------------------


@dataclass(eq=False)
class ChunkJob:
    """One chunk on its way to the server; ``extents`` tile ``[offset, offset+length)``."""

    number: int
    offset: int
    length: int
    extents: list[Extent]
    attempts: int = 0
    renewals: int = 0
    link: str | None = None
    not_before: float = 0.0

    def __lt__(self, other: ChunkJob) -> bool:  # heapq orders retries by due time
        return (self.not_before, self.number) < (other.not_before, other.number)


_DONE: Final = object()


def _count(stats: StageStats, extents: list[Extent]) -> None:
    for ext in extents:
        stats.count(ext.length, ext.data is None)


def _check_tiling(extents: list[Extent], offset: int, length: int, path: str) -> None:
    pos = offset
    for ext in extents:
        if ext.offset != pos or (ext.data is not None and len(ext.data) != ext.length):
            raise SizeMismatch(f"{path}: the reader returned a broken range at {pos}")
        pos += ext.length
    if pos != offset + length:
        raise SizeMismatch(f"{path}: the reader returned {pos - offset} bytes of chunk at "
                           f"{offset}, expected {length}")


def _pieces(stream: Iterator[Extent], plan: ChunkPlan) -> Iterator[tuple[int, Extent]]:
    """``(chunk number, extent)`` with each extent cut at chunk boundaries."""
    last = plan.count - 1
    for ext in stream:
        pos = ext.offset
        while pos < ext.end:
            number = min(pos // plan.chunk_size, last)
            chunk_end = plan.size if number == last else (number + 1) * plan.chunk_size
            end = min(ext.end, chunk_end)
            if pos == ext.offset and end == ext.end:
                yield number, ext
            elif ext.data is None:
                yield number, Extent.hole(pos, end - pos)
            else:
                view = memoryview(ext.data)[pos - ext.offset : end - ext.offset]
                yield number, Extent(pos, end - pos, view)
            pos = end


class ChunkFeeder:
    """Produces the chunks to send, in order, hashing every chunk on the way.

    Runs in its own thread.  ``slots`` bounds the chunks held in memory: one is
    taken before a chunk is read and given back (:meth:`release`) once the
    server confirmed it (or, for chunks not sent, once hashed).
    """

    def __init__(
        self, image: ImageInput, plan: ChunkPlan, skip: frozenset[int], slots: int,
        stats: RunStats, readers: int,
    ) -> None:
        self.image = image
        self.plan = plan
        self.skip = skip
        self.readers = max(1, readers)
        self.out: queue.Queue[object] = queue.Queue()
        self._slots = threading.Semaphore(slots)
        self._stop = threading.Event()
        self._hash = xxhash.xxh3_128()
        #: bytes of chunks not to send (confirmed earlier) that were hashed and dropped
        self.passed_bytes = 0
        self.source_stats = stats.add(image.source.name, "source")
        self.stage_stats: list[StageStats] = []
        upstream = self.source_stats
        if image.random_access is None:
            for stage in image.stages:
                st = stats.add(stage.name, "stage")
                st.upstream = upstream
                self.stage_stats.append(st)
                upstream = st
        self.hash_stats = stats.add("xxh3", "stage")
        if image.random_access is None:
            self.hash_stats.upstream = upstream
        self._thread = threading.Thread(target=self._run, name="drivepipe-chunks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def release(self) -> None:
        self._slots.release()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def _acquire(self, block: bool = True) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1 if block else 0):
                return True
            if not block:
                return False
        raise Cancelled()

    def _run(self) -> None:
        item: object = _DONE
        try:
            if self.image.random_access is not None:
                self._feed_random(self.image.random_access)
            else:
                self._feed_stream()
        except BaseException as exc:  # handed to the sending thread and raised there
            item = exc
        self.out.put(item)

    def _hash_extent(self, ext: Extent) -> None:
        update = self._hash.update
        if ext.data is None:
            for zeros in zero_chunks(ext.length):
                update(zeros)
        else:
            update(ext.data)

    def _emit(self, number: int, extents: list[Extent]) -> None:
        """Hash a whole chunk, then queue it for sending or drop it."""
        t0 = time.perf_counter()
        for ext in extents:
            self._hash_extent(ext)
        self.hash_stats.inclusive += time.perf_counter() - t0
        _count(self.hash_stats, extents)
        if number in self.skip:
            self.passed_bytes += self.plan.span(number)[1]
            self._slots.release()
            return
        self._queue(number, extents)

    # random access: reader threads fill chunks out of order, hashed in order here

    def _read_chunk(self, ra: RandomAccess, number: int) -> tuple[list[Extent], float]:
        t0 = time.perf_counter()
        offset, length = self.plan.span(number)
        extents = list(ra.read_range(offset, length))
        _check_tiling(extents, offset, length, self.image.path)
        return extents, time.perf_counter() - t0

    def _feed_random(self, ra: RandomAccess) -> None:
        pending: collections.deque[tuple[int, Future[tuple[list[Extent], float]]]] = (
            collections.deque())
        upcoming = iter(range(self.plan.count))
        next_number = next(upcoming, None)
        with ThreadPoolExecutor(self.readers, thread_name_prefix="drivepipe-read") as pool:
            while next_number is not None or pending:
                if next_number is not None and self._acquire(block=not pending):
                    pending.append((next_number, pool.submit(self._read_chunk, ra, next_number)))
                    next_number = next(upcoming, None)
                    continue
                number, future = pending.popleft()
                extents, seconds = future.result()
                self._count_source(extents, seconds)
                self._emit(number, extents)

    def _count_source(self, extents: list[Extent], seconds: float) -> None:
        self.source_stats.inclusive += seconds
        _count(self.source_stats, extents)

    # stream only: one pass through the decoders, chunk boundaries cut on the way

    def _stream(self) -> Iterator[Extent]:
        feed: Iterator[Extent] = metered(self.image.source.extents(), self.source_stats)
        for stage, st in zip(self.image.stages, self.stage_stats, strict=True):
            feed = metered(stage.process(feed), st)
        return exact_size(feed, self.plan.size, self.image.path)

    def _feed_stream(self) -> None:
        stream = self._stream()
        hashed = metered(self._hashing(stream), self.hash_stats)
        current: int | None = None
        extents: list[Extent] = []
        try:
            for number, ext in _pieces(hashed, self.plan):
                if number != current:
                    self._queue(current, extents)
                    current, extents = number, []
                    if number not in self.skip:
                        self._acquire()
                if number in self.skip:
                    self.passed_bytes += ext.length  # fast-forward: hashed, not kept
                else:
                    extents.append(ext)
            self._queue(current, extents)
        finally:
            close: Callable[[], None] | None = getattr(hashed, "close", None)
            if close is not None:
                close()

    def _hashing(self, stream: Iterator[Extent]) -> Iterator[Extent]:
        for ext in stream:
            self._hash_extent(ext)
            yield ext

    def _queue(self, number: int | None, extents: list[Extent]) -> None:
        if number is None or number in self.skip:
            return
        offset, length = self.plan.span(number)
        self.out.put(ChunkJob(number, offset, length, extents))


# --- sending chunks over a curl multi handle ---------------------------------------------


class ChunkBody:
    """READFUNCTION of one chunk: views of its extents, holes from the shared zero buffer."""

    def __init__(self, extents: list[Extent]) -> None:
        self._extents = extents
        self._index = 0
        self._pos = 0
        self.sent = 0

    def __call__(self, want: int) -> memoryview | bytes:
        while self._index < len(self._extents):
            ext = self._extents[self._index]
            left = ext.length - self._pos
            if left <= 0:
                self._index += 1
                self._pos = 0
                continue
            n = min(want, left, ZERO_SIZE)
            if ext.data is None:
                piece = ZERO_VIEW[:n]
            else:
                piece = memoryview(ext.data).cast("B")[self._pos : self._pos + n]
            self._pos += n
            self.sent += n
            return piece
        return b""

    def seek(self, offset: int, origin: int) -> int:
        """SEEKFUNCTION: libcurl rewinds when it resends on a fresh connection."""
        if origin != os.SEEK_SET:
            return _SEEK_CANT
        self._index, self._pos = 0, offset
        while self._index < len(self._extents) and self._pos >= self._extents[self._index].length:
            self._pos -= self._extents[self._index].length
            self._index += 1
        return _SEEK_OK


class CappedAnswer:
    """WRITEFUNCTION target keeping the first 64 KiB of an answer (links and errors are short)."""

    LIMIT: Final = 64 << 10

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._kept = 0

    def write(self, data: bytes) -> None:
        if self._kept < self.LIMIT:
            self._parts.append(data[: self.LIMIT - self._kept])
            self._kept += len(self._parts[-1])

    def body(self) -> bytes:
        return b"".join(self._parts)


@dataclass(eq=False)
class Slot:
    """One connection: a curl handle and the chunk it is working on."""

    curl: Any  # pycurl.Curl: pycurl ships no type information
    job: ChunkJob | None = None
    phase: str = ""  # "link" (asking the API) or "send" (POSTing the bytes)
    answer: CappedAnswer = field(default_factory=CappedAnswer)
    headers: HeaderCollector = field(default_factory=HeaderCollector)
    body: ChunkBody | None = None
    url: str = ""


class ChunkFailed(TransferError):
    """A chunk that could not be delivered; the upload stops."""


class ChunkSender:
    """Drives every chunk through link request and POST, ``connections`` at a time."""

    def __init__(
        self, conn: Connection, session: Session, plan: ChunkPlan, feeder: ChunkFeeder,
        options: ChunkedOptions, stats: StageStats,
    ) -> None:
        self.conn = conn
        self.session = session
        self.uuid = session.uuid
        self.plan = plan
        self.feeder = feeder
        self.options = options
        self.stats = stats
        self.multi = pycurl.CurlMulti()
        self.slots = [Slot(pycurl.Curl()) for _ in range(max(1, options.connections))]
        self._retry: list[ChunkJob] = []  # heap by due time
        self._ready: collections.deque[ChunkJob] = collections.deque()
        self._feeder_done = False
        self.sent_bytes = 0
        self.done_bytes = 0
        self.wire_bytes = 0
        self.skipped = len(session.journal.confirmed & set(range(plan.count)))
        self._counts = {"retried": 0, "links_renewed": 0, "answered_416": 0}
        #: Ctrl-C only sets a flag while the loop runs: raised inside a curl
        #: callback, KeyboardInterrupt would be printed by pycurl and lost
        self.interrupts = Interrupts()
        self._show()

    # the loop

    def run(self) -> None:
        self.stats.started = time.perf_counter()
        try:
            with self.interrupts.catching():
                self._loop()
        finally:
            self.stats.finished = time.perf_counter()
            self._close()

    def _loop(self) -> None:
        while not self._finished():
            if self.interrupts.requested:
                raise KeyboardInterrupt
            self._fill_idle_slots()
            if self._active():
                self._pump()
            else:
                self._idle_wait()

    def _finished(self) -> bool:
        return (self._feeder_done and not self._retry and not self._ready
                and not self._active())

    def _active(self) -> bool:
        return any(slot.job is not None for slot in self.slots)

    def _pump(self) -> None:
        """Move bytes, settle finished transfers; wait on the sockets only if none finished."""
        while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        finished = 0
        while True:
            left, ok, failed = self.multi.info_read()
            for curl in ok:
                self._completed(self._slot_of(curl), None)
            for curl, code, message in failed:
                self._completed(self._slot_of(curl), pycurl.error(code, message))
            finished += len(ok) + len(failed)
            if left == 0:
                break
        if not finished:
            # An idle slot may get a chunk from the feeder any moment: look again soon.
            idle = not all(slot.job for slot in self.slots) and not self._feeder_done
            self.multi.select(0.01 if idle or self._retry else 0.1)

    def _idle_wait(self) -> None:
        """Nothing on the wire: wait for the feeder or the next retry's due time."""
        t0 = time.perf_counter()
        timeout = 0.5
        if self._retry:
            timeout = max(0.0, min(timeout, self._retry[0].not_before - time.monotonic()))
        if self._feeder_done:
            if self._retry:
                time.sleep(timeout)
        else:
            with contextlib.suppress(queue.Empty):
                self._take(self.feeder.out.get(timeout=timeout))
        self.stats.waiting += time.perf_counter() - t0

    def _slot_of(self, curl: Any) -> Slot:
        return next(slot for slot in self.slots if slot.curl is curl)

    # choosing work

    def _next_job(self) -> ChunkJob | None:
        """A retry that is due, else the feeder's next chunk, else None."""
        if self._retry and self._retry[0].not_before <= time.monotonic():
            return heapq.heappop(self._retry)
        if not self._ready and not self._feeder_done:
            with contextlib.suppress(queue.Empty):
                self._take(self.feeder.out.get_nowait())
        return self._ready.popleft() if self._ready else None

    def _take(self, item: object) -> None:
        """Queue a feeder item; the end marker and errors end the feed."""
        if item is _DONE:
            self._feeder_done = True
            return
        if isinstance(item, BaseException):
            self._feeder_done = True
            raise item
        assert isinstance(item, ChunkJob)
        self._ready.append(item)

    def _fill_idle_slots(self) -> None:
        for slot in self.slots:
            if slot.job is None:
                job = self._next_job()
                if job is None:
                    break
                self._ask_link(slot, job)
        self._show()

    # the two requests of a chunk

    def _start(self, slot: Slot, url: str) -> None:
        slot.url = url
        slot.answer = CappedAnswer()
        slot.headers = HeaderCollector()
        slot.curl.setopt(pycurl.WRITEFUNCTION, slot.answer.write)
        slot.curl.setopt(pycurl.HEADERFUNCTION, slot.headers)
        self.multi.add_handle(slot.curl)

    def _ask_link(self, slot: Slot, job: ChunkJob) -> None:
        c = slot.curl
        c.reset()
        url = self.conn.api.url(f"drives/{self.uuid}/action/", {"do": "upload_chunk"})
        configure(c, url, tls=self.conn.tls, endpoint=self.conn.endpoint,
                  creds=self.conn.creds,
                  headers={"Content-Type": "application/json", "Accept": "application/json"})
        c.setopt(pycurl.POSTFIELDS, json.dumps(
            {"chunk_number": job.number, "chunk_size": self.plan.chunk_size}))
        c.setopt(pycurl.TIMEOUT_MS, 120_000)
        slot.job, slot.phase, slot.body = job, "link", None
        self._start(slot, url)

    def _send(self, slot: Slot, job: ChunkJob) -> None:
        c = slot.curl
        c.reset()
        assert job.link is not None
        url = link_url(self.conn.endpoint.api, job.link)
        # The link is a capability of its own: no credentials go with it.
        configure(c, url, tls=self.conn.tls,
                  headers={"Content-Type": "application/octet-stream"})
        slot.body = ChunkBody(job.extents)
        c.setopt(pycurl.POST, 1)
        c.setopt(pycurl.POSTFIELDSIZE_LARGE, job.length)
        c.setopt(pycurl.READFUNCTION, slot.body)
        c.setopt(pycurl.SEEKFUNCTION, slot.body.seek)
        c.setopt(pycurl.UPLOAD_BUFFERSIZE, UPLOAD_BUFFER)
        slot.job, slot.phase = job, "send"
        self._start(slot, url)

    # outcomes

    def _completed(self, slot: Slot, error: pycurl.error | None) -> None:
        self.multi.remove_handle(slot.curl)
        job = slot.job
        assert job is not None
        if slot.body is not None:
            self.wire_bytes += slot.body.sent
        slot.job = None
        what = f"chunk {job.number} of drive {self.uuid}"
        if error is not None:
            failure = curl_failure(error, slot.url, f"{slot.phase} {what}")
            if not failure.transient:
                raise ChunkFailed(self._resume_hint(failure.one_line()))
            self._retry_later(job, failure.one_line())
            return
        if not slot.headers.complete:
            # libcurl calls an answer cut inside its headers a success with no body
            self._retry_later(job, f"{slot.phase} {what}: the answer was cut off")
            return
        resp = Response(slot.curl.getinfo(pycurl.RESPONSE_CODE), slot.headers.headers,
                        slot.answer.body(), slot.url)
        if slot.phase == "link":
            self._link_answer(slot, job, resp, what)
        else:
            self._send_answer(job, resp, what)

    def _link_answer(self, slot: Slot, job: ChunkJob, resp: Response, what: str) -> None:
        if resp.status == 416:
            self._counts["answered_416"] += 1
            self._confirm(job, sent=False)
        elif 200 <= resp.status < 300:
            job.link = _parse_link(resp, what)
            self._send(slot, job)
        elif resp.status >= 500 or resp.status in _TRANSIENT_STATUS:
            self._retry_later(job, http_failure(resp, f"link for {what}").one_line())
        else:
            raise ChunkFailed(self._resume_hint(
                http_failure(resp, f"link for {what}").one_line()), )

    def _send_answer(self, job: ChunkJob, resp: Response, what: str) -> None:
        if 200 <= resp.status < 300 or resp.status == 416:
            self._confirm(job, sent=resp.status != 416)
        elif resp.status >= 500 or resp.status in _TRANSIENT_STATUS:
            self._retry_later(job, http_failure(resp, f"send {what}").one_line())
        elif resp.status in _FATAL_LINK_STATUS:
            raise ChunkFailed(self._resume_hint(http_failure(resp, f"send {what}").one_line()))
        else:
            self._renew_link(job, http_failure(resp, f"send {what}").one_line())

    def _renew_link(self, job: ChunkJob, reason: str) -> None:
        """The link expired or was used up: ask for a new one at once (bounded)."""
        job.renewals += 1
        self._counts["links_renewed"] += 1
        if job.renewals > self.options.retries:
            raise ChunkFailed(self._resume_hint(f"{reason} (link refused {job.renewals} times)"))
        job.link = None
        job.not_before = 0.0
        heapq.heappush(self._retry, job)

    def _retry_later(self, job: ChunkJob, reason: str) -> None:
        job.attempts += 1
        self._counts["retried"] += 1
        if job.attempts > self.options.retries:
            raise ChunkFailed(self._resume_hint(f"{reason} (gave up after {job.attempts} "
                                                "attempts)"))
        job.link = None
        job.not_before = time.monotonic() + backoff(self.options, job.attempts)
        heapq.heappush(self._retry, job)

    def _confirm(self, job: ChunkJob, *, sent: bool) -> None:
        self.session.journal.confirm(job.number)
        self.done_bytes += job.length
        if sent:
            self.sent_bytes += job.length
            for ext in job.extents:
                if ext.data is None:
                    self.stats.hole_bytes += ext.length
                else:
                    self.stats.data_bytes += ext.length
        else:
            self.skipped += 1
        job.extents = []
        self.feeder.release()

    def _resume_hint(self, message: str) -> str:
        return f"{message}; rerun the same command to resume drive {self.uuid}"

    # bookkeeping

    def _show(self) -> None:
        in_flight = sum(1 for slot in self.slots if slot.job is not None)
        done = len(self.session.journal.confirmed)
        # Done: confirmed by the server in this run, or earlier and passed by the feeder.
        self.stats.bytes = self.done_bytes + self.feeder.passed_bytes
        self.stats.extra.update({
            "chunks_done": done, "chunks_total": self.plan.count,
            "in_flight": in_flight, "retried": self._counts["retried"],
            "skipped": self.skipped,
            "links_renewed": self._counts["links_renewed"],
            "sent_bytes": self.sent_bytes, "wire_bytes": self.wire_bytes,
        })

    def _close(self) -> None:
        for slot in self.slots:
            if slot.job is not None:
                with contextlib.suppress(pycurl.error):
                    self.multi.remove_handle(slot.curl)
                slot.job = None
            slot.curl.close()
        self.multi.close()
        self._show()


def link_url(api: str, link: str) -> str:
    """The absolute URL of a link the API returned: relative links live on the API host."""
    if link.startswith(("http://", "https://")):
        return link
    parts = urlsplit(api)
    return f"{parts.scheme}://{parts.netloc}/{link.lstrip('/')}"


def _parse_link(resp: Response, what: str) -> str:
    try:
        data = json.loads(resp.body)
    except ValueError:
        data = None
    link = data.get("link") if isinstance(data, dict) else None
    if not isinstance(link, str) or not link:
        raise ChunkFailed(f"link for {what}: the answer holds no link (HTTP {resp.status})")
    return link


# --- the whole upload --------------------------------------------------------------------


def _wait_uploaded(conn: Connection, session: Session, options: ChunkedOptions) -> None:
    """Wait until the drive leaves ``uploading``, which it does once every chunk is in."""
    deadline = time.monotonic() + options.finish_timeout
    delay = 0.05
    while True:
        status = str(_retrying(lambda: conn.api.drive(session.uuid), options).get("status", ""))
        if status != "uploading":
            return
        if time.monotonic() > deadline:
            break
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    # The journal's confirmations did not all hold; let the server's 416s decide next time.
    session.journal.confirmed.clear()
    session.journal.save()
    raise TransferError(f"drive {session.uuid} is still 'uploading' after every chunk was "
                        "confirmed; rerun the same command to send what the server lacks")


def chunked_upload(
    image: ImageInput, conn: Connection, options: ChunkedOptions, stats: RunStats
) -> ChunkedResult:
    """Upload ``image`` chunk by chunk into a new or resumed drive; see the module docstring."""
    if options.chunk_size <= 0:
        raise UsageError(f"--chunk-size must be positive, got {options.chunk_size}")
    if options.connections <= 0:
        raise UsageError(f"--connections must be at least 1, got {options.connections}")
    if image.size <= 0:
        raise ImageError(f"{image.path}: the image is empty; there is nothing to upload")
    path = options.journal_path or default_journal_path(image.path, conn.endpoint.api)
    with JournalLock(path):
        session = open_session(conn, image, options, path)
        return _transfer(image, conn, options, stats, session)


def _transfer(
    image: ImageInput, conn: Connection, options: ChunkedOptions, stats: RunStats,
    session: Session,
) -> ChunkedResult:
    """Send what the session's drive lacks, hash everything, and wait for the drive."""
    journal = session.journal
    plan = ChunkPlan(image.size, journal.chunk_size)
    stats.total = image.size
    feeder = ChunkFeeder(image, plan, frozenset(journal.confirmed),
                         options.chunks_in_memory(plan.chunk_size), stats,
                         readers=min(options.connections, 4))
    sender = ChunkSender(conn, session, plan, feeder, options, stats.add("send", "sink"))
    feeder.start()
    try:
        sender.run()
    except KeyboardInterrupt as exc:
        raise Cancelled(f"interrupted; rerun the same command to resume drive "
                        f"{session.uuid}") from exc
    except (ImageError, SizeMismatch) as exc:
        # The drive keeps its chunks (a resume may follow once the image is fixed);
        # the user must learn that it exists, since it is not complete.
        raise type(exc)(f"{exc.one_line()}; drive {session.uuid} stays incomplete "
                        f"(status uploading); delete it if the image is bad") from exc
    finally:
        feeder.stop()
    _wait_uploaded(conn, session, options)
    journal.remove()
    return ChunkedResult(
        uuid=session.uuid, xxh128=feeder.hexdigest(), size=image.size,
        sent_bytes=sender.sent_bytes, skipped_chunks=sender.skipped, chunks=plan.count,
        resumed=session.resumed, wire_bytes=sender.wire_bytes, journal_path=journal.path,
    )


__all__ = [
    "ChunkPlan",
    "ChunkedOptions",
    "ChunkedResult",
    "ResumeRefused",
    "chunked_upload",
    "link_url",
    "open_session",
]

"""Resumable chunked upload target ``drive-chunked``: the raw stream in, a drive filled chunk
by chunk over N connections.

A :class:`~drivepipe.Sink` run by the runner like every target: the runner reads,
decodes, meters, checks the size and (through the xxh3 stage the upload job puts in
front) hashes the stream; this sink cuts it into chunks and sends them.  The protocol
is the link protocol of ``cloudsigma-api.md``: ``POST initupload/`` creates the drive
with the image's exact raw size; for each chunk ``k`` (``n = size // S`` chunks, the
last one absorbing the remainder) ``POST drives/{uuid}/action/?do=upload_chunk`` (with
credentials) returns a one-time link, and the chunk's raw bytes are POSTed to that link
on the API host (without credentials).  Up to ``connections`` transfers run at once on
one pycurl multi handle, in the thread that called ``consume``; a feeder thread inside
the sink pulls the stream and cuts it into chunks.  At most ``connections + 1`` chunks
are in memory, fewer when that would pass ``memory_budget`` (never fewer than two);
holes take no memory: they are sent from the shared zero buffer.

Out: :class:`~drivepipe.cloudsigma.upload.SentDrive` with the drive's UUID and what
went over the wire.

Resuming: a journal (:mod:`drivepipe.resume.upload_journal`) records the drive, the
image's identity and the confirmed chunks.  Running the same upload again checks the
drive's size, passes the confirmed chunks by (they flow through the hash, they are not
sent) and sends the rest; the journal's chunk size wins over the option's, since the
chunk numbers depend on it.  ``resume_uuid`` resumes a drive without a journal, the
server's 416 answers telling which chunks are already there.  One run per journal at a
time (a lock beside it); the journal is removed once the drive has left ``uploading``.

Faults: every answer and curl error is classified by the one retry policy
(:mod:`drivepipe.transport.retry`, ``UploadOptions.policy``): transient ones are
retried per chunk with its backoff and the server's ``Retry-After``; a link refused
with another 4xx is taken as expired and requested again (as often as the policy
retries); other 4xx answers stop the upload with one line (which names the drive to
resume).  Ctrl-C stops at once, keeping drive and journal.  Refused: an image that
changed since its journal was written, a drive whose size is not the image's, an empty
image, a second run on the same journal.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import json
import os
import queue
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import pycurl

from drivepipe._errors import (
    Cancelled,
    HTTPError,
    ImageError,
    ResumeRefused,
    SizeMismatch,
    TransferError,
    UsageError,
)
from drivepipe._extent import ZERO_SIZE, ZERO_VIEW, Extent
from drivepipe._stage import ImageInput, Sink
from drivepipe._stats import StageStats
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.upload import SentDrive, UploadOptions
from drivepipe.resume.saver import BackgroundSaver
from drivepipe.resume.upload_journal import (
    ChunkPlan,
    ImageIdentity,
    JournalLock,
    UploadJournal,
    default_journal_path,
)
from drivepipe.transport.curl import (
    UUID_RE,
    Exchange,
    Interrupts,
    Response,
    configure,
    parse_uuid,
)
from drivepipe.transport.retry import RetryPolicy, is_transient

#: libcurl's upload buffer (CURLOPT_UPLOAD_BUFFERSIZE accepts 16 KiB - 2 MiB)
UPLOAD_BUFFER: Final = 1 << 20
#: link answers that a fresh link will not fix: the request itself is wrong
_FATAL_LINK_STATUS: Final = frozenset({400, 411, 413, 415, 422})
#: answers a chunk's two requests accept: 416 means "that chunk is already there"
_CHUNK_OK: Final = (*range(200, 300), 416)
_SEEK_OK: Final = int(pycurl.SEEKFUNC_OK)
_SEEK_CANT: Final = int(pycurl.SEEKFUNC_CANTSEEK)


def resume_hint(uuid: str) -> str:
    """The words that tell how to go on with an unfinished drive (the CLI adds its flag)."""
    return f"resume into drive {uuid} explicitly"


# --- the drive and the journal ----------------------------------------------------------


@dataclass
class Session:
    uuid: str
    journal: UploadJournal
    resumed: bool


def image_identity(path: str, size: int) -> ImageIdentity:
    """The identity of the image file at ``path``; a stream (standard input, a URL) has
    one that matches nothing, so its journal is never resumed by mistake."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        mode = 0
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return ImageIdentity.of(path)
    return ImageIdentity(path, size, 0, 0, f"stream-{secrets.token_hex(8)}")


def _drive_state(conn: Connection, uuid: str, what: str) -> tuple[int, str]:
    """``(size, status)`` of a drive to resume; refused when it is gone."""
    try:
        drive = conn.api.drive(uuid)
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
    conn: Connection, uuid: str, size: int, what: str, *, ours: bool = False
) -> None:
    found, status = _drive_state(conn, uuid, what)
    # A drive this upload finished (killed before its journal was removed) may have
    # been grown to the minimum drive size: its chunks will all answer 416.
    if found == size or (ours and status != "uploading" and found > size):
        return
    raise ResumeRefused(f"drive {uuid} ({what}) holds {found} bytes but the image is "
                        f"{size} bytes: it is not this image's upload")


def _create_drive(conn: Connection, name: str, size: int, media: str) -> str:
    # A POST: the API client repeats it only after answers that surely created nothing.
    body = {"name": name, "size": size, "media": media}
    resp = conn.api.request("POST", conn.api.url("initupload/"), json_body=body,
                            what="create drive (initupload)")
    return parse_uuid(resp.body)


def open_session(
    conn: Connection, options: UploadOptions, identity: ImageIdentity, size: int,
    name: str, path: str,
) -> Session:
    """Resume the journal's (or the given) drive, or create a new one and its journal."""
    journal = UploadJournal.load(path)
    if options.resume_uuid:
        uuid = options.resume_uuid.strip().lower()
        if not UUID_RE.match(uuid):
            raise UsageError(f"the drive to resume must be a drive UUID, got "
                             f"{options.resume_uuid!r}")
        _check_drive(conn, uuid, size, "the drive to resume")
        if journal is not None and journal.uuid == uuid and not journal.image.differences(
                identity):
            return Session(uuid, journal, True)
        fresh = UploadJournal(path, uuid, conn.endpoint.api, identity, size, options.chunk_size)
        fresh.save()
        return Session(uuid, fresh, True)
    if journal is not None:
        return _resume_journal(conn, identity, size, journal)
    uuid = _create_drive(conn, name, size, options.media)
    fresh = UploadJournal(path, uuid, conn.endpoint.api, identity, size, options.chunk_size)
    fresh.save()
    return Session(uuid, fresh, False)


def _resume_journal(
    conn: Connection, identity: ImageIdentity, size: int, journal: UploadJournal
) -> Session:
    where = f"journal {journal.path}"
    changed = journal.image.differences(identity)
    if changed or journal.raw_size != size:
        what = ", ".join(changed) or "raw size"
        raise ResumeRefused(
            f"{identity.path} changed since the interrupted upload to drive {journal.uuid} "
            f"({what} differ); delete {journal.path} to start a new upload, or "
            f"{resume_hint(journal.uuid)} to continue into that drive anyway")
    if journal.api != conn.endpoint.api:
        raise ResumeRefused(f"{where} belongs to {journal.api}, not {conn.endpoint.api}; "
                            "delete it or give another journal path")
    try:
        _check_drive(conn, journal.uuid, size, where, ours=True)
    except ResumeRefused as exc:
        raise ResumeRefused(f"{exc}; delete {journal.path} to start a new upload") from exc
    return Session(journal.uuid, journal, True)


# --- cutting the stream into chunks ------------------------------------------------------


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
    """Pulls the stream in its own thread and queues the chunks to send, in order.

    ``slots`` bounds the chunks held in memory: one is taken before a chunk is
    collected and given back (:meth:`release`) once the server confirmed it.  Chunks
    the journal already confirmed are passed by (counted in ``passed_bytes``).  The
    stream's end marker, or the exception that ended it, is queued last.
    """

    def __init__(
        self, stream: Iterator[Extent], plan: ChunkPlan, skip: frozenset[int], slots: int
    ) -> None:
        self.stream = stream
        self.plan = plan
        self.skip = skip
        self.out: queue.Queue[object] = queue.Queue()
        self._slots = threading.Semaphore(slots)
        self._stop = threading.Event()
        #: bytes of chunks not to send (confirmed earlier) that were passed by
        self.passed_bytes = 0
        self._thread = threading.Thread(target=self._run, name="drivepipe-chunks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait: the stream must not be running in this thread when the runner
        closes it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def release(self) -> None:
        self._slots.release()

    def _acquire(self) -> None:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=0.1):
                return
        raise Cancelled()

    def _run(self) -> None:
        item: object = _DONE
        try:
            self._feed()
        except BaseException as exc:  # handed to the sending thread and raised there
            item = exc
        self.out.put(item)

    def _feed(self) -> None:
        current: int | None = None
        extents: list[Extent] = []
        for number, ext in _pieces(self.stream, self.plan):
            if self._stop.is_set():
                raise Cancelled()
            if number != current:
                self._queue(current, extents)
                current, extents = number, []
                if number not in self.skip:
                    self._acquire()
            if number in self.skip:
                self.passed_bytes += ext.length  # fast-forward: hashed upstream, not kept
            else:
                extents.append(ext)
        self._queue(current, extents)

    def _queue(self, number: int | None, extents: list[Extent]) -> None:
        if number is None or number in self.skip:
            return
        offset, length = self.plan.span(number)
        self.out.put(ChunkJob(number, offset, length, extents))


# --- the journal, saved beside the sending loop -----------------------------------------


class JournalSaver:
    """The upload journal's confirmations, saved by a :class:`BackgroundSaver`.

    Made in the sending loop, each save (two fsyncs) held every connection's next chunk
    back; the loop now takes the snapshot (a few ranges of numbers) and goes on.  What a
    crash can lose is the last confirmations, never a chunk the server lacks: the next
    run asks for those chunks' links, and the server's 416 answers pass them by unsent.
    """

    def __init__(self, journal: UploadJournal) -> None:
        self.journal = journal
        self._saver = BackgroundSaver(journal.write_snapshot)

    def confirm(self, number: int) -> None:
        """Record ``number`` as confirmed; saved soon (raises an earlier save's error)."""
        self.journal.confirmed.add(number)
        self._saver.submit(self.journal.snapshot())

    def close(self) -> BaseException | None:
        """Write what is pending and stop; the error that stopped a save, if any."""
        return self._saver.close()


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


@dataclass(eq=False)
class Slot:
    """One connection: a curl handle and the chunk it is working on."""

    curl: Any  # pycurl.Curl: pycurl ships no type information
    job: ChunkJob | None = None
    phase: str = ""  # "link" (asking the API) or "send" (POSTing the bytes)
    exchange: Exchange | None = None
    body: ChunkBody | None = None


@dataclass(eq=False)
class LinkSlot:
    """A handle that asks for the link of a chunk still to come (``number``; -1: idle)."""

    curl: Any  # pycurl.Curl
    number: int = -1
    exchange: Exchange | None = None


#: a link asked for ahead was answered 416: that chunk is already on the server
_THERE: Final = ""


class ChunkFailed(TransferError):
    """A chunk that could not be delivered; the upload stops."""


class ChunkSender:
    """Drives every chunk through link request and POST, ``connections`` at a time.

    The links of the next ``connections`` chunks the feeder will bring are asked for
    ahead, on handles of their own, while the bodies send: a connection whose chunk was
    confirmed starts the next body at once instead of waiting one API round trip (the
    link requests are as many as before, one per chunk; only earlier).  A chunk that is
    retried, or whose link came back refused, asks for its link on its own connection.
    """

    def __init__(
        self, conn: Connection, session: Session, plan: ChunkPlan, feeder: ChunkFeeder,
        connections: int, policy: RetryPolicy, stats: StageStats, handle_signals: bool = False,
        saver: JournalSaver | None = None,
    ) -> None:
        self.conn = conn
        self.session = session
        self.uuid = session.uuid
        self.plan = plan
        self.feeder = feeder
        self.policy = policy
        self.stats = stats
        self.multi = pycurl.CurlMulti()
        self.slots = [Slot(pycurl.Curl()) for _ in range(max(1, connections))]
        self.saver = saver
        #: links asked for ahead: the handles, the links got (by chunk number; _THERE:
        #: answered 416), the numbers not to ask ahead again (their request failed)
        self.link_slots = [LinkSlot(pycurl.Curl()) for _ in range(max(1, connections))]
        self._links: dict[int, str] = {}
        self._no_prefetch: set[int] = set()
        self._lookahead = max(1, connections)
        #: links are asked for ahead only once the API gave one (a refusal, such as a
        #: wrong password, is then met once, not once per handle)
        self._link_given = False
        #: the chunk numbers the feeder brings, in its order, and the last one it brought
        skip = feeder.skip
        self._coming = (n for n in range(plan.count) if n not in skip)
        self._next_coming: int | None = next(self._coming, None)
        self._arrived = -1
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
        self.interrupts = Interrupts(handle_signals)
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
        return (any(slot.job is not None for slot in self.slots)
                or any(ls.number >= 0 for ls in self.link_slots))

    def _pump(self) -> None:
        """Move bytes, settle finished transfers; wait on the sockets only if none finished."""
        while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        finished = 0
        while True:
            left, ok, failed = self.multi.info_read()
            for curl in ok:
                self._ended(curl, None)
            for curl, code, message in failed:
                self._ended(curl, pycurl.error(code, message))
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

    def _ended(self, curl: Any, error: pycurl.error | None) -> None:
        for slot in self.slots:
            if slot.curl is curl:
                self._completed(slot, error)
                return
        self._link_got(next(ls for ls in self.link_slots if ls.curl is curl), error)

    # choosing work

    def _next_job(self) -> ChunkJob | None:
        """A retry that is due, else the feeder's next chunk, else None (also while that
        chunk's link, asked for ahead, is still on its way: chunks go in order)."""
        if self._retry and self._retry[0].not_before <= time.monotonic():
            return heapq.heappop(self._retry)
        while not self._feeder_done:
            try:
                self._take(self.feeder.out.get_nowait())
            except queue.Empty:
                break
        if not self._ready:
            return None
        if self._ready[0].link is None and any(
                ls.number == self._ready[0].number for ls in self.link_slots):
            return None
        return self._ready.popleft()

    def _take(self, item: object) -> None:
        """Queue a feeder item; the end marker and errors end the feed."""
        if item is _DONE:
            self._feeder_done = True
            return
        if isinstance(item, BaseException):
            self._feeder_done = True
            raise item
        assert isinstance(item, ChunkJob)
        self._arrived = max(self._arrived, item.number)
        link = self._links.pop(item.number, None)
        if link == _THERE:
            self._counts["answered_416"] += 1
            self._confirm(item, sent=False)
            return
        item.link = link
        self._ready.append(item)

    def _fill_idle_slots(self) -> None:
        for slot in self.slots:
            if slot.job is None:
                job = self._next_job()
                if job is None:
                    break
                if job.link is not None:
                    self._send(slot, job)
                else:
                    self._ask_link(slot, job)
        self._ask_ahead()
        self._show()

    # links asked for ahead

    def _ask_ahead(self) -> None:
        """Ask for the links of the next chunks to come, ``connections`` at most held."""
        if not self._link_given:
            return
        for ls in self.link_slots:
            if ls.number >= 0:
                continue
            held = len(self._links) + sum(1 for other in self.link_slots if other.number >= 0)
            number = self._upcoming()
            if number is None or held >= self._lookahead:
                return
            self._next_coming = next(self._coming, None)
            ls.number = number
            url = self._link_request(ls.curl, number)
            ls.exchange = Exchange(ls.curl, url, self._what("link", number))
            self.multi.add_handle(ls.curl)

    def _upcoming(self) -> int | None:
        """The next chunk number to ask a link for ahead (not yet brought by the feeder)."""
        while self._next_coming is not None and (
                self._next_coming <= self._arrived or self._next_coming in self._no_prefetch):
            self._next_coming = next(self._coming, None)
        return self._next_coming

    def _link_got(self, ls: LinkSlot, error: pycurl.error | None) -> None:
        """A link asked for ahead came back: keep it for its chunk, or give that chunk
        to the ordinary path (its own link request, retried by the policy)."""
        self.multi.remove_handle(ls.curl)
        number, exchange = ls.number, ls.exchange
        ls.number, ls.exchange = -1, None
        assert exchange is not None
        try:
            resp = exchange.outcome(ls.curl, error, ok=_CHUNK_OK)
            link = _THERE if resp.status == 416 else _parse_link(resp, exchange.what)
        except TransferError as exc:
            if not is_transient(exc):
                raise ChunkFailed(self._resume_hint(exc.one_line())) from exc
            self._counts["retried"] += 1
            self._no_prefetch.add(number)
            return
        waiting = next((job for job in self._ready if job.number == number), None)
        if waiting is None:
            if number > self._arrived:  # else its chunk went its own way: drop the link
                self._links[number] = link
        elif link == _THERE:
            self._ready.remove(waiting)
            self._counts["answered_416"] += 1
            self._confirm(waiting, sent=False)
        else:
            waiting.link = link

    # the two requests of a chunk

    def _what(self, phase: str, number: int) -> str:
        chunk = f"chunk {number} of drive {self.uuid}"
        return f"link for {chunk}" if phase == "link" else f"send {chunk}"

    def _start(self, slot: Slot, job: ChunkJob, phase: str, url: str) -> None:
        slot.job, slot.phase = job, phase
        slot.exchange = Exchange(slot.curl, url, self._what(phase, job.number))
        self.multi.add_handle(slot.curl)

    def _ask_link(self, slot: Slot, job: ChunkJob) -> None:
        url = self._link_request(slot.curl, job.number)
        slot.body = None
        self._start(slot, job, "link", url)

    def _link_request(self, c: Any, number: int) -> str:
        """Set ``c`` up to ask the API for chunk ``number``'s link; the URL asked."""
        c.reset()
        url = self.conn.api.url(f"drives/{self.uuid}/action/", {"do": "upload_chunk"})
        configure(c, url, tls=self.conn.tls, endpoint=self.conn.endpoint,
                  creds=self.conn.creds,
                  headers={"Content-Type": "application/json", "Accept": "application/json"})
        c.setopt(pycurl.POSTFIELDS, json.dumps(
            {"chunk_number": number, "chunk_size": self.plan.chunk_size}))
        c.setopt(pycurl.TIMEOUT_MS, 120_000)
        return url

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
        self._start(slot, job, "send", url)

    # outcomes

    def _completed(self, slot: Slot, error: pycurl.error | None) -> None:
        self.multi.remove_handle(slot.curl)
        job, exchange, phase = slot.job, slot.exchange, slot.phase
        assert job is not None and exchange is not None
        if slot.body is not None:
            self.wire_bytes += slot.body.sent
        slot.job = None
        try:
            resp = exchange.outcome(slot.curl, error, ok=_CHUNK_OK)
        except TransferError as exc:
            self._failed(phase, job, exc)
            return
        if resp.status == 416:
            if phase == "link":
                self._counts["answered_416"] += 1
            self._confirm(job, sent=phase == "send")
        elif phase == "link":
            job.link = _parse_link(resp, exchange.what)
            self._link_given = True
            self._send(slot, job)
        else:
            self._confirm(job, sent=True)

    def _failed(self, phase: str, job: ChunkJob, exc: TransferError) -> None:
        """Retry, renew the link, or stop - as the one policy classifies ``exc``."""
        # A link request creates nothing: repeating it is always safe (idempotent).
        if is_transient(exc):
            self._retry_later(job, exc)
        elif (phase == "send" and isinstance(exc, HTTPError) and 400 <= exc.status < 500
              and exc.status not in _FATAL_LINK_STATUS):
            self._renew_link(job, exc)
        else:
            raise ChunkFailed(self._resume_hint(exc.one_line())) from exc

    def _renew_link(self, job: ChunkJob, exc: TransferError) -> None:
        """The link expired or was used up: ask for a new one at once (bounded)."""
        job.renewals += 1
        self._counts["links_renewed"] += 1
        if job.renewals > self.policy.retries:
            raise ChunkFailed(self._resume_hint(
                f"{exc.one_line()} (link refused {job.renewals} times)")) from exc
        job.link = None
        job.not_before = 0.0
        heapq.heappush(self._retry, job)

    def _retry_later(self, job: ChunkJob, exc: TransferError) -> None:
        job.attempts += 1
        self._counts["retried"] += 1
        wait = self.policy.next_delay(exc, job.attempts)
        if wait is None:
            raise ChunkFailed(self._resume_hint(
                f"{exc.one_line()} (gave up after {job.attempts} attempts)")) from exc
        job.link = None
        job.not_before = time.monotonic() + wait
        heapq.heappush(self._retry, job)

    def _confirm(self, job: ChunkJob, *, sent: bool) -> None:
        if self.saver is not None:
            self.saver.confirm(job.number)
        else:
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
        return f"{message}; run the same upload again to resume drive {self.uuid}"

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
        for ls in self.link_slots:
            if ls.number >= 0:
                with contextlib.suppress(pycurl.error):
                    self.multi.remove_handle(ls.curl)
                ls.number = -1
            ls.curl.close()
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
        raise ChunkFailed(f"{what}: the answer holds no link (HTTP {resp.status})")
    return link


# --- the sink ----------------------------------------------------------------------------


def _wait_uploaded(conn: Connection, session: Session, timeout: float) -> None:
    """Wait until the drive leaves ``uploading``, which it does once every chunk is in."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        status = str(conn.api.drive(session.uuid).get("status", ""))
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
                        "confirmed; run the same upload again to send what the server lacks")


@dataclass
class _Run:
    """What one ``consume`` holds, for ``abort``."""

    feeder: ChunkFeeder | None = None
    stats: StageStats = field(default_factory=lambda: StageStats("send", "sink"))


class ChunkedUploadSink(Sink[SentDrive]):
    """Sends the stream in chunks into a new (or resumed) drive; see the module docstring."""

    name = "send"

    def __init__(
        self, conn: Connection, options: UploadOptions, *, path: str, name: str | None = None,
    ) -> None:
        self.conn = conn
        self.options = options
        #: the image (its identity keys and guards the journal)
        self.path = path
        self.drive_name = name or options.name or os.path.basename(path) or "drivepipe"
        self._run = _Run()

    @classmethod
    def for_upload(
        cls, conn: Connection, options: UploadOptions, image: ImageInput
    ) -> ChunkedUploadSink:
        return cls(conn, options, path=image.path)

    def meter(self, stats: StageStats) -> bool:
        self._run.stats = stats
        return True

    def consume(self, extents: Iterator[Extent], size: int) -> SentDrive:
        if size <= 0:
            raise ImageError(f"{self.path}: the image is empty; there is nothing to upload")
        options = self.options
        path = options.journal_path or default_journal_path(self.path, self.conn.endpoint.api)
        identity = image_identity(self.path, size)
        with JournalLock(path):
            session = open_session(self.conn, options, identity, size, self.drive_name, path)
            return self._transfer(extents, size, session)

    def _transfer(self, extents: Iterator[Extent], size: int, session: Session) -> SentDrive:
        """Send what the session's drive lacks, and wait for the drive."""
        journal, options = session.journal, self.options
        plan = journal.plan
        feeder = self._run.feeder = ChunkFeeder(
            extents, plan, frozenset(journal.confirmed), options.chunks_in_memory(plan.chunk_size))
        saver = JournalSaver(journal)
        sender = ChunkSender(self.conn, session, plan, feeder, options.connections,
                             options.policy, self._run.stats, options.handle_signals, saver)
        feeder.start()
        try:
            sender.run()
        except KeyboardInterrupt as exc:
            raise Cancelled(f"interrupted; run the same upload again to resume drive "
                            f"{session.uuid}") from exc
        except (ImageError, SizeMismatch) as exc:
            # The drive keeps its chunks (a resume may follow once the image is fixed);
            # the user must learn that it exists, since it is not complete.
            raise type(exc)(f"{exc.one_line()}; drive {session.uuid} stays incomplete "
                            f"(status uploading); delete it if the image is bad") from exc
        finally:
            feeder.stop()
            # every confirmation on disk before the journal is read, cleared or removed
            save_error = saver.close()
        if save_error is not None:
            raise save_error
        _wait_uploaded(self.conn, session, options.finish_timeout)
        journal.remove()
        return SentDrive(
            uuid=session.uuid, sent_bytes=sender.sent_bytes, wire_bytes=sender.wire_bytes,
            chunks=plan.count, skipped_chunks=sender.skipped, resumed=session.resumed,
            journal_path=journal.path,
        )

    def abort(self) -> None:
        # The drive and its journal stay: the upload resumes from them.
        if self._run.feeder is not None:
            self._run.feeder.stop()


__all__ = [
    "ChunkPlan",
    "ChunkedUploadSink",
    "ResumeRefused",
    "image_identity",
    "link_url",
    "open_session",
    "resume_hint",
]

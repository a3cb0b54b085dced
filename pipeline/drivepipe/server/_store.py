"""Drive storage: one sparse raw file plus one JSON record per drive.

Layout under ``root``::

    drives/<uuid>.raw    the drive's bytes, sparse (all-zero 4 KiB blocks never written)
    drives/<uuid>.json   its record, replaced atomically (temp file, fsync, rename)
    incoming/            direct uploads still arriving; emptied when a store opens
    secret               the key of signed links (see ``_signing``)
    lock                 flock'ed (and holding the pid) while a store has the root open

What goes in: direct uploads (:meth:`DriveStore.begin_direct`: sequential
bytes of an exact size; the drive exists only once :meth:`Incoming.finish`
ran), chunked uploads (:meth:`DriveStore.init_upload`, then
:meth:`DriveStore.begin_chunk` per chunk, progress persisted per chunk),
record updates and deletions.  What comes out: copies of records, open file
descriptors to serve downloads from.  Images smaller than ``min_size`` are
grown to it when their upload completes.

One server per root: opening a store takes an exclusive ``flock`` on
``root/lock`` for as long as it is open (:meth:`DriveStore.close` releases it,
so does the death of the process), and refuses with one line
(:class:`~drivepipe._errors.ConfigError`) if another store holds it; only then
does it remove what a crash left (unfinished direct uploads, data files
without a record, half-written records), which would otherwise be the uploads
in progress of the store already running there.

Refused (as :class:`ApiError`): unknown drives (404), sizes outside
``[1, max_size]``, chunk numbers outside the upload, a chunk size that changes
once chunks have landed (400), chunks already received or uploads already
complete (416), a chunk another request is receiving right now (503), a disk
that is full (503).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from drivepipe._errors import ConfigError
from drivepipe._extent import Buffer, Extent, split_zeros
from drivepipe._files import fsync_dir
from drivepipe.server._errors import ApiError, already_uploaded, backend, busy, notexist, validation
from drivepipe.server._writeback import WriteBehind

log = logging.getLogger("drivepipe.server")

DEFAULT_MIN_SIZE: Final = 512 << 20
# "about 15 TB" in CloudSigma's capabilities for dssd.
DEFAULT_MAX_SIZE: Final = 15 * 10**12
UPLOADING: Final = "uploading"
UNMOUNTED: Final = "unmounted"
DOWNLOADABLE: Final = frozenset({UNMOUNTED, "mounted"})
#: a chunk's writeback starts every this many bytes, so its closing fdatasync has
#: little left (measured: median 29 ms per 16 MiB chunk before, on a shared disk)
CHUNK_WINDOW: Final = 4 << 20
MEDIA: Final = frozenset({"disk", "cdrom"})


@dataclass(slots=True)
class DriveRecord:
    """What the store knows about a drive besides its bytes."""

    uuid: str
    name: str
    size: int
    media: str = "disk"
    status: str = UNMOUNTED
    meta: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    #: Bumped whenever the drive's content changes; part of the download ETag.
    generation: int = 1
    #: Bytes the upload carries (``size`` before growth to the minimum).
    image_size: int = 0
    #: Chunked upload: the nominal chunk size and the chunk numbers received.
    chunk_size: int = 0
    received: set[int] = field(default_factory=set)

    def copy(self) -> DriveRecord:
        return dataclasses.replace(self, meta=dict(self.meta), received=set(self.received))

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["received"] = to_ranges(self.received)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DriveRecord:
        data = dict(data)
        data["received"] = from_ranges(data.get("received", []))
        return cls(**data)

    @property
    def chunks(self) -> int:
        return chunk_count(self.image_size, self.chunk_size) if self.chunk_size else 0


def to_ranges(numbers: set[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` -> ``[[0, 3], [5, 6]]``: compact for uploads of many chunks."""
    out: list[list[int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n:
            out[-1][1] = n + 1
        else:
            out.append([n, n + 1])
    return out


def from_ranges(ranges: list[list[int]]) -> set[int]:
    return {n for start, end in ranges for n in range(start, end)}


def chunk_count(size: int, chunk_size: int) -> int:
    """``size // chunk_size`` chunks (at least one): the last absorbs the remainder."""
    return max(1, size // chunk_size)


def chunk_span(size: int, chunk_size: int, number: int) -> tuple[int, int]:
    """``(offset, length)`` of chunk ``number``; the last one is S..2S-1 bytes."""
    if chunk_size <= 0:
        raise validation("chunk_size must be a positive number of bytes", "chunk_size")
    count = chunk_count(size, chunk_size)
    if not 0 <= number < count:
        raise validation(
            f"chunk_number {number} is outside 0..{count - 1} for this size", "chunk_number"
        )
    offset = number * chunk_size
    length = chunk_size if number < count - 1 else size - offset
    return offset, length


# --- writing sparsely ------------------------------------------------------

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


def _load_fallocate() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        return fn
    return None


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` (reads as zeros); False if unsupported."""
    if _fallocate is None or length <= 0:
        return length <= 0
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return bool(_fallocate(fd, mode, offset, length) == 0)


def _disk_error(exc: OSError) -> ApiError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return backend("the store has no space left for this drive")
    return backend(f"the store cannot write: {exc.strerror}", 500)


def write_sparse(fd: int, offset: int, data: Buffer, *, dense: bool = False) -> None:
    """pwrite ``data`` at ``offset``, skipping all-zero 4 KiB blocks unless ``dense``."""
    pieces: Iterator[Extent] = (
        iter((Extent(offset, len(data), data),)) if dense
        else split_zeros(Extent(offset, len(data), data))
    )
    try:
        for piece in pieces:
            if piece.data is not None:
                _pwrite_all(fd, piece.offset, piece.data)
    except OSError as exc:
        raise _disk_error(exc) from exc


def _pwrite_all(fd: int, offset: int, data: Buffer) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _grow(fd: int, rec: DriveRecord, min_size: int) -> None:
    if rec.size < min_size:
        try:
            os.ftruncate(fd, min_size)
        except OSError as exc:
            raise _disk_error(exc) from exc
        rec.size = min_size


# --- the store ---------------------------------------------------------------


def lock_root(root: str) -> int:
    """An fd holding the exclusive flock on ``root/lock``; ConfigError if another has it."""
    path = os.path.join(root, "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise ConfigError(f"{root} is in use by another drivepipe store{who}; stop it first "
                          "or serve another root directory") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd



class DriveStore:
    """Drives under ``root``; safe to use from many threads at once."""

    def __init__(
        self, root: str, *, min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE
    ) -> None:
        self.root = os.path.abspath(root)
        self.min_size = min_size
        self.max_size = max_size
        self.drives_dir = os.path.join(self.root, "drives")
        self.incoming_dir = os.path.join(self.root, "incoming")
        os.makedirs(self.root, exist_ok=True)
        self._root_lock = lock_root(self.root)
        try:
            os.makedirs(self.drives_dir, exist_ok=True)
            os.makedirs(self.incoming_dir, exist_ok=True)
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._records: dict[str, DriveRecord] = {}
        self._drive_locks: dict[str, threading.Lock] = {}
        self._receiving: dict[tuple[str, int], int] = {}
        self._sweep_incoming()
        self._load()

    def close(self) -> None:
        """Release the root (another store may open it); idempotent."""
        if self._root_lock >= 0:
            os.close(self._root_lock)
            self._root_lock = -1

    # paths and loading

    def raw_path(self, uuid: str) -> str:
        return os.path.join(self.drives_dir, f"{uuid}.raw")

    def record_path(self, uuid: str) -> str:
        return os.path.join(self.drives_dir, f"{uuid}.json")

    def _sweep_incoming(self) -> None:
        for name in os.listdir(self.incoming_dir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.incoming_dir, name))

    def _load(self) -> None:
        names = sorted(os.listdir(self.drives_dir))
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.drives_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    rec = DriveRecord.from_json(json.load(f))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable drive record %s: %s", path, exc)
                continue
            if not os.path.exists(self.raw_path(rec.uuid)):
                log.warning("skipping drive %s: its data file is missing", rec.uuid)
                continue
            self._records[rec.uuid] = rec
            self._drive_locks[rec.uuid] = threading.Lock()
        self._sweep_orphans(names)

    def _sweep_orphans(self, names: list[str]) -> None:
        """Remove what a crash mid-creation or mid-save left: data without record, temp records."""
        for name in names:
            uuid, _, ext = name.partition(".")
            orphan = ext == "raw" and uuid not in self._records
            if orphan or name.endswith(".tmp"):
                log.warning("removing leftover %s", name)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.drives_dir, name))

    def _save(self, rec: DriveRecord) -> None:
        """Write ``rec`` atomically: a reader or a crash sees the old or the new record."""
        path = self.record_path(rec.uuid)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rec.to_json(), f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _disk_error(exc) from exc

    # reading records

    def list(self) -> list[DriveRecord]:
        """Every drive, oldest first."""
        with self._lock:
            records = [r.copy() for r in self._records.values()]
        return sorted(records, key=lambda r: (r.created, r.uuid))

    def get(self, uuid: str) -> DriveRecord:
        with self._lock:
            rec = self._records.get(uuid)
            if rec is None:
                raise notexist(f"drive {uuid} does not exist", "uuid")
            return rec.copy()

    def _locked(self, uuid: str) -> threading.Lock:
        with self._lock:
            lock = self._drive_locks.get(uuid)
        if lock is None:
            raise notexist(f"drive {uuid} does not exist", "uuid")
        return lock

    def _current(self, uuid: str) -> DriveRecord:
        """The live record (caller holds the drive's lock)."""
        rec = self._records.get(uuid)
        if rec is None:
            raise notexist(f"drive {uuid} does not exist", "uuid")
        return rec

    def check_size(self, size: int) -> None:
        if not 1 <= size <= self.max_size:
            raise validation(f"size must be between 1 and {self.max_size} bytes", "size")

    def _register(self, rec: DriveRecord) -> None:
        with self._lock:
            self._records[rec.uuid] = rec
            self._drive_locks[rec.uuid] = threading.Lock()

    # direct upload

    def begin_direct(self, size: int, name: str = "") -> Incoming:
        """A direct upload of ``size`` bytes; ``name`` (default: a timestamp) names the drive."""
        self.check_size(size)
        return Incoming(self, size, name or f"Upload {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def _publish(self, rec: DriveRecord, tmp: str) -> None:
        os.replace(tmp, self.raw_path(rec.uuid))
        self._save(rec)
        self._register(rec)

    # chunked upload

    def init_upload(self, name: str, size: int, media: str) -> DriveRecord:
        """A new drive in status ``uploading`` whose chunks are still to come."""
        self.check_size(size)
        rec = DriveRecord(
            uuid=str(uuidlib.uuid4()), name=name, size=size, media=media,
            status=UPLOADING, created=time.time(), image_size=size,
        )
        path = self.raw_path(rec.uuid)
        try:
            with open(path, "xb") as f:
                f.truncate(size)
        except OSError as exc:
            raise _disk_error(exc) from exc
        self._save(rec)
        self._register(rec)
        return rec.copy()

    def check_chunk(self, uuid: str, number: int, chunk_size: int) -> tuple[int, int]:
        """``(offset, length)`` of a chunk that may be uploaded now; else ApiError."""
        with self._locked(uuid):
            rec = self._current(uuid)
            return self._chunk_allowed(rec, number, chunk_size)

    def _chunk_allowed(self, rec: DriveRecord, number: int, chunk_size: int) -> tuple[int, int]:
        if rec.status != UPLOADING:
            raise already_uploaded(f"drive {rec.uuid} is not uploading: every chunk is there")
        if rec.chunk_size and rec.received and rec.chunk_size != chunk_size:
            raise validation(
                f"chunk_size {chunk_size} differs from this upload's {rec.chunk_size}",
                "chunk_size",
            )
        span = chunk_span(rec.image_size, chunk_size, number)
        if rec.chunk_size == chunk_size and number in rec.received:
            raise already_uploaded(f"chunk {number} of drive {rec.uuid} is already uploaded")
        return span

    def begin_chunk(self, uuid: str, number: int, chunk_size: int) -> ChunkWriter:
        """Claim chunk ``number`` for one request; its old partial bytes are dropped."""
        with self._locked(uuid):
            rec = self._current(uuid)
            offset, length = self._chunk_allowed(rec, number, chunk_size)
            others = {s for (u, _), s in self._receiving.items() if u == uuid}
            if (uuid, number) in self._receiving or others - {chunk_size}:
                raise busy(f"chunk {number} of drive {uuid} is being received right now")
            rec.chunk_size = chunk_size
            self._receiving[(uuid, number)] = chunk_size
        try:
            return ChunkWriter(self, uuid, number, offset, length)
        except BaseException:
            self._release(uuid, number)
            raise

    def chunks_in_flight(self, uuid: str) -> set[int]:
        """Chunk numbers of ``uuid`` that requests are receiving right now."""
        with self._lock:
            return {k for (u, k) in self._receiving if u == uuid}

    def _release(self, uuid: str, number: int) -> None:
        with self._lock:
            self._receiving.pop((uuid, number), None)

    def _chunk_done(self, uuid: str, number: int, fd: int) -> DriveRecord:
        with self._locked(uuid):
            rec = self._current(uuid).copy()
            rec.received.add(number)
            if len(rec.received) >= rec.chunks:
                _grow(fd, rec, self.min_size)
                rec.status = UNMOUNTED
                rec.generation += 1
            self._commit(rec)
            return rec.copy()

    def _commit(self, rec: DriveRecord) -> None:
        """Save a changed copy of a record, then make it the live one (caller holds its lock).

        If saving fails, the live record stays as it was, like the one on disk.
        """
        self._save(rec)
        with self._lock:
            self._records[rec.uuid] = rec

    # updates

    def update(
        self, uuid: str, *, name: str, size: int, media: str, meta: dict[str, str]
    ) -> DriveRecord:
        """Replace name, media and meta; grow the drive to ``size`` (never shrink)."""
        self.check_size(size)
        with self._locked(uuid):
            rec = self._current(uuid).copy()
            if size != rec.size:
                self._resize(rec, size)
            rec.name, rec.media, rec.meta = name, media, dict(meta)
            self._commit(rec)
            return rec.copy()

    def _resize(self, rec: DriveRecord, size: int) -> None:
        if rec.status == UPLOADING:
            raise validation("the size of a drive cannot change while it is uploading", "size")
        if size < rec.size:
            raise validation(f"a drive cannot shrink (it has {rec.size} bytes)", "size")
        try:
            os.truncate(self.raw_path(rec.uuid), size)
        except OSError as exc:
            raise _disk_error(exc) from exc
        rec.size = size
        rec.generation += 1

    def delete(self, uuid: str) -> None:
        with self._locked(uuid):
            self._current(uuid)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record_path(uuid))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.raw_path(uuid))
            fsync_dir(self.record_path(uuid))
            with self._lock:
                del self._records[uuid]
                del self._drive_locks[uuid]

    # reading bytes

    def open_read(self, uuid: str) -> tuple[int, DriveRecord]:
        """An fd on the drive's bytes and its record, for a download."""
        with self._locked(uuid):
            rec = self._current(uuid)
            if rec.status not in DOWNLOADABLE:
                raise validation(f"drive {uuid} is {rec.status}, not downloadable yet", "status")
            try:
                fd = os.open(self.raw_path(uuid), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise backend(f"drive {uuid} cannot be read: {exc.strerror}", 500) from exc
            return fd, rec.copy()


class Incoming:
    """A direct upload arriving: sequential writes; :meth:`finish` creates the drive."""

    def __init__(self, store: DriveStore, size: int, name: str) -> None:
        self.store = store
        self.size = size
        self.name = name
        self.pos = 0
        self.uuid = str(uuidlib.uuid4())
        self.tmp = os.path.join(store.incoming_dir, f"{self.uuid}.raw")
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(self.fd, size)
        except OSError as exc:
            self.abort()
            raise _disk_error(exc) from exc
        self.write_behind = WriteBehind(self.fd, size)

    def write(self, data: Buffer) -> None:
        write_sparse(self.fd, self.pos, data)
        self.pos += len(data)
        self.write_behind.advance(self.pos)

    def finish(self) -> DriveRecord:
        if self.pos != self.size:
            raise validation(f"the body had {self.pos} of {self.size} bytes")
        rec = DriveRecord(
            uuid=self.uuid, name=self.name,
            size=self.size, created=time.time(), image_size=self.size,
        )
        _grow(self.fd, rec, self.store.min_size)
        try:
            os.fsync(self.fd)
            self.store._publish(rec, self.tmp)
        except OSError as exc:
            self.abort()
            raise _disk_error(exc) from exc
        except BaseException:
            self.abort()
            raise
        self._close()
        return rec.copy()

    def _close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Forget the upload: nothing of it stays on disk."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class ChunkWriter:
    """One chunk arriving: writes at the chunk's offset; :meth:`finish` records it."""

    def __init__(self, store: DriveStore, uuid: str, number: int, offset: int, length: int):
        self.store = store
        self.uuid = uuid
        self.number = number
        self.offset = offset
        self.length = length
        self.pos = 0
        try:
            self.fd = os.open(store.raw_path(uuid), os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise notexist(f"drive {uuid} does not exist", "uuid") from exc
        # A failed earlier attempt may have left part of this chunk behind; zero
        # blocks are skipped below, so stale bytes must go first.
        self.dense = not punch_hole(self.fd, offset, length)
        self.write_behind = WriteBehind(self.fd, length, start=offset, window=CHUNK_WINDOW)

    def write(self, data: Buffer) -> None:
        if self.pos + len(data) > self.length:
            raise validation(f"chunk {self.number} is {self.length} bytes long")
        write_sparse(self.fd, self.offset + self.pos, data, dense=self.dense)
        self.pos += len(data)
        self.write_behind.advance(self.offset + self.pos)

    def finish(self) -> DriveRecord:
        try:
            if self.pos != self.length:
                raise validation(f"chunk {self.number} had {self.pos} of {self.length} bytes")
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                raise _disk_error(exc) from exc
            return self.store._chunk_done(self.uuid, self.number, self.fd)
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.store._release(self.uuid, self.number)

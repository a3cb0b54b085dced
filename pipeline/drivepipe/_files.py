"""Output files, shared by the file and device targets and the download.

- :class:`SparseOutput`: writes in place at any offset, skipping holes and
  all-zero 4 KiB blocks, with writeback started behind the cursor and one fsync;
- :func:`publish`/:func:`check_target`: a finished temporary file goes under its
  name only when durable, never over an existing file unless forced;
- :func:`check_free_space`/:func:`free_bytes`, :func:`punch_hole`,
  :func:`remove_stale_parts`;
- :func:`output_error`: an ``OSError`` on an output as one line (``DiskFull``
  for ENOSPC).

Writeback behind the cursor: :class:`SparseOutput` starts the kernel's
writeback of what it wrote every :data:`WRITE_BEHIND` bytes
(``sync_file_range(SYNC_FILE_RANGE_WRITE)`` over the whole file: only dirty
pages not yet being written are queued, in whatever order they were written,
so a download's out-of-order blocks too), so the fsync that makes the output
durable finds little left to write instead of the whole image.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
from collections.abc import Iterator
from typing import Any

from drivepipe._direct import DirectWrites, open_direct
from drivepipe._errors import DiskFull, OutputError
from drivepipe._extent import ZERO_BLOCK, Buffer, Extent, split_zeros

#: largest single pwrite: measured on a busy host, 2 MiB writes into the page cache
#: took 1-3x longer (and more system time) than the same bytes in 128-256 KiB calls
WRITE_SLICE = 256 << 10
#: fallocate(2) modes
_KEEP_SIZE, _PUNCH_HOLE, _ZERO_RANGE = 0x01, 0x02, 0x10
#: bytes written between two starts of writeback (see the module docstring)
WRITE_BEHIND = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


def load_sync_file_range() -> Any:
    """libc's ``sync_file_range(fd, offset, nbytes, flags)``, or None where it is missing."""
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    return None


_sync_file_range = load_sync_file_range()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now (advice: never fails)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def output_error(path: str, exc: OSError) -> OutputError:
    """The OutputError for ``exc``: DiskFull when the disk is full or over quota."""
    cls = DiskFull if exc.errno in (errno.ENOSPC, errno.EDQUOT) else OutputError
    return cls(describe_os_error(path, exc))


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free ``[offset, offset+length)`` of the file (it reads as zeros); False if refused."""
    return fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> bool:
    """Make ``[offset, offset+length)`` read as zeros without writing them (a file or a
    block device); False if refused."""
    return fallocate(fd, _ZERO_RANGE | _KEEP_SIZE, offset, length)


def fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode``; False where it is refused or missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
        call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    except (OSError, AttributeError):
        return False
    return int(call(fd, mode, offset, length)) == 0


def describe_os_error(path: str, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on device"
    if exc.errno == errno.EDQUOT:
        return f"{path}: disk quota exceeded"
    return f"{path}: {exc.strerror or exc}"


def _umask() -> int:
    """The process umask, from /proc (setting it to read it would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: str) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``'s directory."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_free_space(path: str, needed: int | None, what: str) -> None:
    """Refuse in one line when ``needed`` bytes certainly do not fit beside ``path``."""
    free = free_bytes(path)
    if needed is None or free is None or needed <= free:
        return
    where = os.path.dirname(os.path.abspath(path))
    raise OutputError(
        f"{where}: {free} bytes free, but {what} needs {needed} bytes written "
        "(holes take none); free space or write elsewhere"
    )


def remove_stale_parts(target: str) -> list[str]:
    """Remove ``.NAME.*.part`` files of ``target`` that no running writer holds."""
    directory = os.path.dirname(os.path.abspath(target))
    name = glob.escape(os.path.basename(target))
    pattern = os.path.join(glob.escape(directory), f".{name}.*.part")
    removed = []
    for path in glob.glob(pattern):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


class SparseOutput:
    """A file being written sparsely at ``path``; zero blocks are never written.

    ``direct``: data goes to the disk with ``O_DIRECT`` where the file system
    takes it (:mod:`drivepipe._direct`), for an output that is synced anyway;
    then it is in the file only after :meth:`flush` (which :meth:`sync` does).
    """

    def __init__(self, path: str, size: int, *, block: int = ZERO_BLOCK, create: bool = True,
                 fd: int | None = None, direct: bool = False):
        self.path = path
        self.size = size
        self.block = block
        self.written = 0
        #: bytes taken by the write methods (holes and zero blocks too)
        self.taken = 0
        self._behind = 0  # written since writeback was last started
        self._direct: DirectWrites | None = None
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self.fd = os.open(path, flags, 0o644) if fd is None else fd
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
        except OSError as exc:
            raise OutputError(describe_os_error(path, exc)) from exc
        direct_fd = open_direct(self.fd) if direct else None
        if direct_fd is not None:
            self._direct = DirectWrites(self.fd, direct_fd)

    @property
    def direct_bytes(self) -> int:
        """Bytes written with ``O_DIRECT`` so far."""
        return 0 if self._direct is None else self._direct.direct_bytes

    @property
    def landed(self) -> int:
        """How many of the bytes :attr:`taken` are in the file (direct writes are staged:
        a journal must not call a block done before its bytes are there)."""
        found = None if self._direct is None else self._direct.landed()
        return self.taken if found is None else found

    def write_at(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``, skipping its all-zero blocks."""
        start = self.taken
        self.taken += len(data)
        for piece in split_zeros(Extent(offset, len(data), data), self.block):
            if piece.data is not None:  # landed: the bytes taken up to this piece's end
                self._pwrite(piece.offset, piece.data, start + piece.end - offset)

    def write_extent(self, ext: Extent) -> None:
        if ext.data is not None:
            self.write_at(ext.offset, ext.data)
        else:
            self.taken += ext.length

    def write_dense(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``, its zero blocks too (over old contents)."""
        self.taken += len(data)
        self._pwrite(offset, data, self.taken)

    def start_writeback(self, offset: int, length: int) -> None:
        """Ask the kernel to start writing ``[offset, offset+length)`` to disk now.

        Without it, a file smaller than the dirty-page limit is written to disk
        only by the final fsync, after all the copying; started early, the disk
        works while the copy goes on.  (FADV_DONTNEED starts writeback of dirty
        pages and drops the range's clean ones.)  Advice only: errors are ignored.
        """
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    @contextlib.contextmanager
    def _named_errors(self) -> Iterator[None]:
        """An ``OSError`` inside becomes this file's one-line error (a full disk: DiskFull)."""
        try:
            yield
        except OSError as exc:
            raise output_error(self.path, exc) from exc

    def _pwrite(self, offset: int, data: Buffer, mark: int) -> None:
        """Write ``data``; ``mark``: :attr:`taken` as it may count once these bytes are in
        the file (:attr:`landed`)."""
        if self._direct is not None:
            with self._named_errors():
                self._direct.write(offset, data, mark)
            self.written += len(data)
            return
        view = memoryview(data)
        with self._named_errors():
            while view:
                n = os.pwrite(self.fd, view[:WRITE_SLICE], offset)
                view = view[n:]
                offset += n
                self.written += n
                self._behind += n
        if self._behind >= WRITE_BEHIND:
            self._behind = 0
            start_writeback(self.fd)

    def push(self) -> None:
        """Start writing the staged bytes without waiting for them (:attr:`landed` tells
        when they are in the file)."""
        if self._direct is not None:
            with self._named_errors():
                self._direct.push()

    def flush(self) -> None:
        """Put every byte handed over into the file (direct writes are staged)."""
        if self._direct is not None:
            with self._named_errors():
                self._direct.flush()

    def sync(self) -> None:
        self.flush()
        with self._named_errors():
            os.fsync(self.fd)

    def close(self) -> None:
        """Close the file; staged direct writes are written first (errors dropped: an
        aborted output keeps what it can, a finished one was flushed by :meth:`sync`)."""
        if self._direct is not None:
            with contextlib.suppress(OSError):
                self._direct.flush()
            self._direct.close()
            self._direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def publish(tmp: str, target: str, *, force: bool) -> None:
    """Put the finished ``tmp`` under ``target``; without ``force``, never replace."""
    try:
        if force:
            os.replace(tmp, target)
        else:
            # link() fails if the target appeared meanwhile, where rename() would clobber it.
            os.link(tmp, target)
            os.unlink(tmp)
        fsync_dir(target)
    except FileExistsError as exc:
        raise OutputError(f"{target}: already exists (replace it explicitly)") from exc
    except OSError as exc:
        raise OutputError(describe_os_error(target, exc)) from exc


def check_target(target: str, *, force: bool) -> None:
    if os.path.isdir(target):
        raise OutputError(f"{target}: is a directory")
    if not force and os.path.lexists(target):
        raise OutputError(f"{target}: already exists (replace it explicitly)")

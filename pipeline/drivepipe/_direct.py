"""Direct writes: an output's data reaches the disk without the page cache.

A durable output waits for its bytes to reach the disk.  Written through the
page cache, every byte is first copied into a freshly allocated page, then
written back by the kernel at its own pace, then waited for by ``fsync``.
Measured on the 2-core VM the benchmarks run on (4 GiB, ext4 on virtio,
``fsync`` included): buffered writes 13-15 s and 8.3 s of CPU, ``O_DIRECT``
writes in 16 MiB pieces 8-9.5 s and 0.2 s of CPU.  That is the difference
between a verified download that waits for its disk and one that waits for its
network, and the reason ``qemu-img convert -t none`` exists.

:class:`DirectWrites` takes the pieces a writer produces (any offset, any
length, any buffer) and writes them from its own thread, in the order they came:

- contiguous pieces are copied into staging buffers of :data:`BUFFER_SIZE`,
  each written with one ``pwrite`` when full.  The copy costs less than it
  saves: the staging buffers are huge pages where the kernel gives them, so
  the disk gets a few large requests instead of one per 4 KiB page.  Measured
  (4 GiB in 1 MiB pieces, fsync included): 9.2 s through huge staging pages,
  11.3 s through small ones, 10.1-12.8 s writing the pieces where they lie
  (``pwritev``, no copy); 8.0-9.6 s for one 16 MiB buffer written over and over;
- what cannot be written directly (the unaligned head or tail of a run, a file
  system that refuses ``O_DIRECT``) goes through the ordinary descriptor, by the
  same thread in the same order: writes land as they were made, overlapping ones
  too.

Memory: :data:`BUFFERS` staging buffers of :data:`BUFFER_SIZE` (32 MiB), whatever
the output's size.

Where it pays: long contiguous runs (a dense download, 4 GiB in 3 runs each:
16.3-17.5 s through the page cache, 12.3-13.0 s direct).  Where it does not: an
image of scattered short runs, whose every run costs the disk a request of its
own while in the page cache neighbours merge (a qcow2 of random 1 MiB clusters,
half of 4 GiB: 4.5-5.2 s buffered, 6.4-6.7 s direct, 5.5-6.0 s for ``qemu-img
convert`` + ``sync``).  So downloads write directly by default and ``convert``
does not (``--direct`` asks for it).

A direct write is done when the disk *took* it, which may be into a volatile
cache (a virtual disk's host page cache, a drive's write cache); only ``fsync``
waits for that cache to reach stable storage.  Measured on the benchmark VM:
4 GiB of direct writes took 2.5-3.6 s and then ``fsync`` 5.9-6.3 s.  So every
:data:`FLUSH_BEHIND` bytes a second thread calls ``fdatasync`` behind the
cursor while writing goes on: the cache drains during the transfer, not after
it.  A 4 GiB download, 3 runs each: 14.3-15.3 s without, 12.1-13.6 s with a
flush every 256 MiB (12.3-13.0 s every GiB; a flush holds the virtual disk's
writes, which slowed a direct convert whose reads are fast).  On a slow link
the bytes are few and the flush comes every :data:`FLUSH_EVERY` seconds
instead: a 1 GiB download over 4 capped connections took 5.7 s to a pipe,
7.3 s to a file flushed only at the end.

Errors of a background write or flush (a full disk, an I/O error) are raised by
the next :meth:`DirectWrites.write` or by :meth:`DirectWrites.flush`, which waits
for every write handed over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import queue
import threading
import time

from drivepipe._extent import Buffer

#: offsets, lengths and memory of direct writes are multiples of this (a page: never
#: less than a logical block of any disk Linux supports)
ALIGN = 4096
#: bytes per direct write at most (larger writes were faster still on the benchmark
#: VM, 64 MiB ones about 1.3x, but memory is bounded: see BUFFERS)
BUFFER_SIZE = 16 << 20
#: staging buffers: one being written while the other fills (memory: 32 MiB)
BUFFERS = 2
#: direct bytes between two ``fdatasync`` calls behind the cursor, at most...
FLUSH_BEHIND = 256 << 20
#: ...and seconds: a slow transfer (a capped link) leaves the disk's cache nearly
#: empty at the end, whatever its size
FLUSH_EVERY = 0.5
#: copies into a staging buffer from this size on release the GIL
_GIL_FREE_COPY = 64 << 10
#: largest single buffered pwrite (see drivepipe._files.WRITE_SLICE)
_SLICE = 256 << 10


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer``: how :func:`_address` finds a read-only buffer's memory."""

    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(view: memoryview) -> int:
    """Where the bytes of the contiguous ``view`` lie (read-only buffers too); valid while
    ``view`` lives."""
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE
        raise BufferError("not a contiguous buffer")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


def open_direct(fd: int) -> int | None:
    """A second, ``O_DIRECT`` descriptor of the file open as ``fd``; None where refused."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None


#: what the writing thread is handed: a staging buffer or a few bytes to write
#: through the page cache; the file offset; the length; where each write in it
#: ends (bytes from its start) with that write's mark
_Work = tuple[mmap.mmap | bytes, int, int, list[tuple[int, int]]]


class DirectWrites:
    """Writes pieces of a file open as ``fd`` (buffered) through ``direct_fd``."""

    def __init__(self, fd: int, direct_fd: int, *, buffer_size: int = BUFFER_SIZE,
                 buffers: int = BUFFERS, flush_behind: int = FLUSH_BEHIND) -> None:
        if buffer_size % ALIGN or buffer_size <= 0 or buffers < 1:
            raise ValueError("buffer_size must be a multiple of 4096 and buffers at least 1")
        self.fd = fd
        self.direct_fd: int | None = direct_fd
        self.buffer_size = buffer_size
        self.flush_behind = flush_behind
        #: bytes written with O_DIRECT (the rest went through the page cache)
        self.direct_bytes = 0
        self._slots = threading.Semaphore(buffers)  # runs handed over, not yet written
        self._spare: list[mmap.mmap] = []  # staging buffers made and free again
        self._spare_lock = threading.Lock()
        self._work: queue.Queue[_Work | None] = queue.Queue()
        self._error: Exception | None = None
        self._stage: mmap.mmap | None = None  # the run being collected
        self._start = 0  # its file offset
        self._fill = 0  # its bytes
        self._thread: threading.Thread | None = None
        self._marks: list[tuple[int, int]] = []  # of the writes in the run collected
        self._landed = 0  # the mark of the last write in the file
        self._unflushed = 0  # direct bytes since the last flush was asked for
        self._asked = time.monotonic()  # when it was asked for
        self._flush_asked = threading.Event()
        self._flusher: threading.Thread | None = None
        self._stopping = False

    # -- the writer's side --

    def write(self, offset: int, data: Buffer, mark: int = 0) -> None:
        """Write ``data`` at ``offset`` (now or later; :meth:`flush` makes sure).

        ``mark``: a number that never decreases from one write to the next (the
        caller's count of bytes taken): :meth:`landed` tells up to which mark the
        writes are in the file."""
        self._raise()
        view = memoryview(data).cast("B")
        if self.direct_fd is None:  # refused (maybe by the thread, just now)
            if self._fill:
                self._submit()
            self._work.join()  # what was collected or handed over lands first
            self._write_run(view, offset, [])  # all of it through the page cache
            return
        if self._fill and offset != self._start + self._fill:
            self._submit()
        if not self._fill:
            head = min(len(view), -offset % ALIGN)
            if head:  # up to the next aligned offset: through the page cache, in turn
                # (its mark only if it is the whole write: the rest may stay staged)
                marks = [(head, mark)] if head == len(view) else []
                self._hand_over((bytes(view[:head]), offset, head, marks))
                offset, view = offset + head, view[head:]
            self._start = offset
        while view:
            if self._stage is None:
                self._slots.acquire()
                self._raise()
                with self._spare_lock:
                    self._stage = self._spare.pop() if self._spare else _staging_buffer(
                        self.buffer_size)
            n = min(len(view), self.buffer_size - self._fill)
            _copy(self._stage, self._fill, view[:n])
            self._fill += n
            view = view[n:]
            if not view:  # the write's last byte: once these land, all of it has
                self._marks.append((self._fill, mark))
            if self._fill == self.buffer_size:
                self._submit()

    def landed(self) -> int | None:
        """The mark up to which every write is in the file; None: every write made."""
        if self._error is None and self._stage is None and not self._work.unfinished_tasks:
            return None
        return self._landed

    def push(self) -> None:
        """Hand the run being collected to the writing thread now, without waiting for
        it (a slow stream's bytes do not sit in memory until a buffer fills)."""
        self._raise()
        if self._fill:
            self._submit()

    def flush(self) -> None:
        """Write what is collected and wait for every write: then the data is in the file
        (an ``fsync`` still makes it durable)."""
        if self._fill:
            self._submit()
        self._work.join()
        self._raise()

    def close(self) -> None:
        """Stop the threads (after what was handed over) and close ``direct_fd``; errors
        are dropped: :meth:`flush` is where they are seen."""
        self._stage, self._fill = None, 0
        if self._thread is not None:
            self._work.put(None)
            self._thread.join()
            self._thread = None
        if self._flusher is not None:
            self._stopping = True
            self._flush_asked.set()
            self._flusher.join()
            self._flusher = None
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def _submit(self) -> None:
        """Hand the run over; the next one starts where it ends."""
        assert self._stage is not None
        self._hand_over((self._stage, self._start, self._fill, self._marks))
        self._marks = []
        self._stage = None
        self._start += self._fill
        self._fill = 0

    def _hand_over(self, item: _Work) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="direct-write", daemon=True)
            self._thread.start()
        self._work.put(item)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writing thread --

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.task_done()
                return
            data, offset, length, marks = item
            try:
                if self._error is None:  # after an error nothing more is written
                    self._write_run(memoryview(data)[:length], offset, marks)
            except Exception as exc:  # raised in the writer's thread
                self._error = exc
            finally:
                if isinstance(data, mmap.mmap):
                    with self._spare_lock:
                        self._spare.append(data)
                    self._slots.release()
                self._work.task_done()

    def _write_run(self, view: memoryview, offset: int, marks: list[tuple[int, int]]) -> None:
        """Write a run (a staging buffer starts on an aligned offset): its aligned bytes
        directly, the rest (all of a head's bytes, all of it once O_DIRECT is refused)
        through the page cache; each write whose bytes are all in the file moves
        :attr:`_landed` on, also when a later one fails."""
        aligned = len(view) - len(view) % ALIGN if isinstance(view.obj, mmap.mmap) else 0
        done = 0
        while self.direct_fd is not None and done < aligned:
            try:
                n = os.pwrite(self.direct_fd, view[done:aligned], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.direct_bytes:
                    raise
                # the file system took O_DIRECT at open but refuses these writes:
                # from here on everything goes through the page cache
                os.close(self.direct_fd)
                self.direct_fd = None
                break
            done += n
            self.direct_bytes += n
            self._unflushed += n
            marks = self._land(marks, done)
            if n % ALIGN:  # a short write off the alignment: the rest buffered
                break
        while done < len(view):
            done += os.pwrite(self.fd, view[done:][:_SLICE], offset + done)
            marks = self._land(marks, done)
        now = time.monotonic()
        if self.flush_behind and self._unflushed and (
                self._unflushed >= self.flush_behind or now - self._asked >= FLUSH_EVERY):
            self._unflushed = 0
            self._asked = now
            self._ask_flush()

    def _land(self, marks: list[tuple[int, int]], done: int) -> list[tuple[int, int]]:
        """The marks of writes not all in the file yet (``done`` bytes of the run are)."""
        landed = 0
        while landed < len(marks) and marks[landed][0] <= done:
            self._landed = marks[landed][1]
            landed += 1
        return marks[landed:] if landed else marks

    def _ask_flush(self) -> None:
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="direct-flush",
                                             daemon=True)
            self._flusher.start()
        self._flush_asked.set()

    def _flush_loop(self) -> None:
        """``fdatasync`` whenever asked (asks during one are merged into the next)."""
        while True:
            self._flush_asked.wait()
            self._flush_asked.clear()
            if self._stopping:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                if self._error is None:
                    self._error = exc


def _staging_buffer(size: int) -> mmap.mmap:
    """Anonymous memory for a staging buffer, asked to be huge pages (see the module doc)."""
    buf = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _copy(stage: mmap.mmap, at: int, view: memoryview) -> None:
    """``stage[at:at+len(view)] = view``; big copies with the GIL released (ctypes calls
    release it), so the threads that feed this one run meanwhile."""
    if len(view) < _GIL_FREE_COPY:
        stage[at : at + len(view)] = view
        return
    dst = (ctypes.c_char * len(view)).from_buffer(stage, at)
    ctypes.memmove(dst, _address(view), len(view))
    del dst  # the export of ``stage`` ends here


__all__ = ["ALIGN", "BUFFERS", "BUFFER_SIZE", "FLUSH_BEHIND", "DirectWrites", "open_direct"]

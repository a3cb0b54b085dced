"""Sparse-aware file reader: a path in, the file's extents out.

Data and holes come from ``SEEK_DATA``/``SEEK_HOLE``; holes are never read.
Data is read in pieces aligned to ``read_size`` so the kernel's read-ahead and
the page cache work in whole chunks.  A regular file's pieces are ``mmap``
windows, handed downstream as read-only views: the hash reads the page cache
directly and libcurl or the writer copies from it once, where a ``pread`` would
first copy every byte into a new buffer (measured on 4 GiB of warm dense file:
read + xxh3 0.55 s mapped, 0.78 s with preads; ``xxh128sum`` 0.77 s).  Each
window is unmapped when the last view of it is dropped, so memory stays bounded
by the pipeline's queue.  The file's size is checked before each window is
mapped; a file cut short *between* that check and the read of the window (by
another process truncating it) is a SIGBUS, which the command line turns into one
line and exit code 3 (``drivepipe.cli``) but a library caller cannot catch:
``mmap_reads=False`` (``--no-mmap``, ``ReadOptions(mmap=False)``) reads with
``pread`` instead.  Block devices and filesystems that refuse ``mmap`` are
always read with ``pread``.  When the filesystem cannot tell data from holes
(no SEEK_DATA, or everything reported as data on a filesystem that has no
holes), everything is read and all-zero blocks are
turned into holes so the stream downstream stays sparse.  Works on regular files
and block devices (size from seeking to the end).  Refuses unreadable paths
and anything that is neither (a pipe, a FIFO, a character device: reading it to
detect the format would consume it).

It is the ``file`` byte source (``drivepipe.sources``): formats read files
through it (``pread``, ``data_ranges``), and raw images stream from it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from collections.abc import Iterator

from drivepipe._errors import ImageError
from drivepipe._extent import Extent, split_zeros
from drivepipe._stage import ByteSource

_DEFAULT_DROP_DIVISOR = 4
#: mmap offsets are multiples of this
_PAGE = mmap.ALLOCATIONGRANULARITY
#: files with at least this share of their size allocated read in the caller's thread
_INLINE_DENSITY = 0.9


def _default_drop_threshold() -> int:
    """Files larger than a quarter of RAM do not get to evict the page cache."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30
    return max(ram // _DEFAULT_DROP_DIVISOR, 1 << 30)


def _probe_holes(fd: int, size: int) -> bool:
    """True if SEEK_DATA/SEEK_HOLE work on ``fd``."""
    if size == 0:
        return False
    try:
        os.lseek(fd, 0, os.SEEK_HOLE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENXIO):
            return False
        raise
    return True


def data_ranges(fd: int, size: int, offset: int = 0) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of each data range the filesystem reports from ``offset`` on.

    A range that contains ``offset`` is reported from ``offset`` (SEEK_DATA on an
    offset inside data returns that offset).
    """
    pos = offset
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def map_window(fd: int, offset: int, length: int) -> mmap.mmap:
    """``length`` bytes of ``fd`` from ``offset`` (a multiple of the page), mapped read-only."""
    return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)


class SparseFileReader(ByteSource):
    """Reads a file or block device as extents, holes explicit; a random ByteSource.

    ``fd``: read this open descriptor (which the reader then owns) instead of
    opening ``path``; ``path`` is still what messages call it.
    """

    name = "read"
    random = True
    #: plain preads of a mostly dense file: not worth a producer thread (drivepipe._runner);
    #: a sparse one keeps it, its holes are hashed (or sent) while the data is read
    inline = True

    def __init__(
        self,
        path: str,
        *,
        read_size: int = 4 << 20,
        drop_cache_above: int | None = None,
        detect_zeros: bool | None = None,
        fd: int | None = None,
        label: str | None = None,
        mmap_reads: bool = True,
    ) -> None:
        self.path = path
        self.label = label or path
        self.read_size = max(4096, read_size)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError as exc:
                raise ImageError(f"{path}: no such file") from exc
            except IsADirectoryError as exc:
                raise ImageError(f"{path}: is a directory") from exc
            except OSError as exc:
                raise ImageError(f"{path}: cannot open: {exc.strerror}") from exc
        self.fd = fd
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"{path}: is a directory")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                kind = "a pipe or FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
                raise ImageError(
                    f"{path}: is {kind}; drivepipe reads images from regular files and "
                    "block devices"
                )
            os.set_blocking(self.fd, True)
            self.is_block = stat.S_ISBLK(st.st_mode)
            self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
            self.seekable_holes = not self.is_block and _probe_holes(self.fd, self.size)
        except OSError as exc:
            os.close(self.fd)
            raise ImageError(f"{path}: cannot read: {exc.strerror}") from exc
        except BaseException:
            os.close(self.fd)
            raise
        threshold = _default_drop_threshold() if drop_cache_above is None else drop_cache_above
        # What would fill the page cache is the data read, not the holes: an
        # 8 GiB image with 800 MiB of data keeps its cache (st_blocks: one fstat).
        cached = self.size if self.is_block else min(self.size, st.st_blocks * 512)
        # measured on 8 GiB with 10% data: checksum 0.78 s threaded, 1.00 s inline
        self.inline = cached >= self.size * _INLINE_DENSITY
        self.drop_cache = cached > threshold
        # With no hole information, zero blocks are found by looking at the data.
        self.detect_zeros = (not self.seekable_holes) if detect_zeros is None else detect_zeros
        #: data pieces are mmap windows (see the module doc); False after mmap refused once
        self.mmap_reads = mmap_reads and not self.is_block and self.read_size % _PAGE == 0
        self._advise(0, 0, os.POSIX_FADV_SEQUENTIAL)

    def _advise(self, offset: int, length: int, advice: int) -> None:
        # Advice only: some devices and filesystems refuse it.
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, advice)

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Data ranges of the file; the whole file when holes are unknown."""
        if self.seekable_holes:
            yield from data_ranges(self.fd, self.size)
        elif self.size:
            yield 0, self.size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"pread({offset}, {length})")
        if offset >= self.size or length == 0:
            return b""  # also keeps offsets past 2**63 (from corrupt tables) out of the kernel
        try:
            return os.pread(self.fd, min(length, self.size - offset), offset)
        except OSError as exc:
            raise ImageError(f"{self.label}: read error at {offset}: {exc.strerror}") from exc

    def data_ranges(self, offset: int, end: int) -> Iterator[tuple[int, int]] | None:
        if not self.seekable_holes:
            return None
        return data_ranges(self.fd, min(end, self.size), offset)

    def data_size(self) -> int:
        """Bytes the filesystem reports as data (cheap: a few lseeks)."""
        return sum(end - start for start, end in self.ranges())

    def extents(self) -> Iterator[Extent]:
        return self.read_range(0, self.size)

    def read_range(self, offset: int, length: int) -> Iterator[Extent]:
        """Extents of ``[offset, offset+length)``: holes unread, data in aligned reads."""
        end = min(offset + length, self.size)
        pos = offset
        for start, stop in self._ranges_within(offset, end):
            if start > pos:
                yield Extent.hole(pos, start - pos)
            yield from self._read_data(start, stop)
            pos = stop
        if pos < end:
            self._check_not_shrunk(end)
            yield Extent.hole(pos, end - pos)

    def _check_not_shrunk(self, end: int) -> None:
        """Refuse a file cut short while read: SEEK_DATA past its new end finds no data,
        which would otherwise pass for a trailing hole."""
        if self.is_block:
            return
        try:
            now = os.fstat(self.fd).st_size
        except OSError as exc:
            raise ImageError(f"{self.path}: cannot read: {exc.strerror}") from exc
        if now < end:
            raise ImageError(f"{self.path}: file shrank while reading (now {now} bytes)")

    def _ranges_within(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        if not self.seekable_holes:
            if offset < end:
                yield offset, end
            return
        # Start the walk at ``offset``: chunked readers call this once per chunk.
        yield from data_ranges(self.fd, end, offset)

    def _read_data(self, start: int, stop: int) -> Iterator[Extent]:
        step = self.read_size
        pos = start
        dropped = start - start % step
        while pos < stop:
            n = min(step - pos % step, stop - pos)
            mapped = self._mapped(pos, n) if self.mmap_reads else None
            ext = Extent(pos, n, self._pread_exact(pos, n) if mapped is None else mapped)
            if self.detect_zeros:
                yield from split_zeros(ext)
            else:
                yield ext
            pos += n
            if self.drop_cache and pos - dropped >= 64 * step:
                self._advise(dropped, pos - dropped, os.POSIX_FADV_DONTNEED)
                dropped = pos

    def _pread_exact(self, pos: int, n: int) -> bytes:
        try:
            data = os.pread(self.fd, n, pos)
        except OSError as exc:
            raise ImageError(f"{self.label}: read error at {pos}: {exc.strerror}") from exc
        if len(data) != n:
            raise ImageError(f"{self.label}: file shrank while reading (at offset {pos})")
        return data

    def _mapped(self, pos: int, n: int) -> memoryview | None:
        """A read-only view of ``[pos, pos+n)`` mapped from the file, or None when the
        filesystem refuses mmap (then every later piece is read with pread).

        The view keeps its window mapped; the window goes when the last view does.
        """
        self._check_not_shrunk(pos + n)
        base = pos - pos % _PAGE
        try:
            window = map_window(self.fd, base, pos + n - base)
        except (OSError, ValueError):
            self.mmap_reads = False
            return None
        return memoryview(window)[pos - base :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

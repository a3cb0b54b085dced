"""Streams read once: a pipe, and a stream whose size was announced beforehand.

:class:`PipeReader` (the ``pipe`` byte source) reads a descriptor front to
back; its size is known only at the end, so the registry spools it unless the
caller knows the size.  :class:`SizedStream` (the ``sized`` byte source) is
such a stream announced as exactly ``size`` bytes (``upload - --size N``, a
URL whose server does not say its length): a sequential
:class:`~drivepipe.ByteSource` that can stream straight into a target with no
spool, and that raises :class:`~drivepipe.SizeMismatch` the moment the
stream ends short or runs long.  The extent that would complete the announced
size is handed on only after the end of the stream has been seen, so a sink
never gets all ``size`` bytes of a stream that then turns out longer: it
aborts, and no drive or file is left.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from drivepipe._errors import ImageError, SizeMismatch
from drivepipe._extent import Extent, split_zeros
from drivepipe._stage import HEAD_SIZE, ByteSource, Source


class PipeReader(Source):
    """Reads a pipe (or any non-seekable descriptor) front to back, once.

    Out: extents of ``read_size`` bytes at most, all-zero blocks as holes; the
    size is known only at the end (``size`` counts what was read so far).  Used
    to spool standard input when it is a pipe; the reader owns ``fd``.
    """

    name = "read"

    def __init__(self, fd: int, label: str, read_size: int = 4 << 20) -> None:
        self.fd = fd
        self.label = label
        self.read_size = max(4096, read_size)
        self.size = 0

    def extents(self) -> Iterator[Extent]:
        while True:
            buf = bytearray(self.read_size)
            view = memoryview(buf)
            got = 0
            while got < len(buf):  # fill the whole buffer: pipes hand out 64 KiB at a time
                try:
                    n = os.readv(self.fd, [view[got:]])
                except OSError as exc:
                    raise ImageError(f"{self.label}: read error: {exc.strerror}") from exc
                if n == 0:
                    break
                got += n
            if got:
                yield from split_zeros(Extent(self.size, got, view[:got]))
                self.size += got
            if got < len(buf):
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SizedStream(ByteSource):
    """``stream`` announced as exactly ``size`` bytes; sequential, read once.

    ``head`` keeps what it read for detection and :meth:`extents` hands it on
    first.  Owns ``stream`` (closes it)."""

    name = "read"
    random = False

    def __init__(self, stream: Source, size: int, label: str) -> None:
        if size < 0:
            raise ValueError(f"size {size}")
        self.stream = stream
        self.size = size
        self.label = label
        self._upstream: Iterator[Extent] | None = None
        self._held: list[Extent] = []
        self._held_end = 0
        self._started = False

    def _pull(self) -> Extent | None:
        if self._upstream is None:
            self._upstream = iter(self.stream.extents())
        for ext in self._upstream:
            if ext.length:
                return ext
        return None

    def head(self, length: int = HEAD_SIZE) -> bytes:
        want = min(length, self.size)
        while self._held_end < want:
            ext = self._pull()
            if ext is None:
                self._short(self._held_end)
            assert ext is not None
            self._held.append(ext)
            self._held_end = ext.end
        out = bytearray()
        for ext in self._held:
            if len(out) >= want:
                break
            take = min(want - len(out), ext.length)
            out += bytes(take) if ext.data is None else memoryview(ext.data)[:take]
        return bytes(out)

    def extents(self) -> Iterator[Extent]:
        if self._started:
            raise ImageError(f"{self.label}: a stream can be read only once")
        self._started = True
        return self._checked()

    def _checked(self) -> Iterator[Extent]:
        held, self._held = self._held, []
        pos = 0
        while pos < self.size:
            ext = held.pop(0) if held else self._pull()
            if ext is None:
                self._short(pos)
            assert ext is not None
            if ext.end > self.size:
                self._long()
            if ext.end == self.size and (held or self._pull() is not None):
                self._long()  # checked before the last byte is handed on
            pos = ext.end
            yield ext
        if self.size == 0 and (held or self._pull() is not None):
            self._long()

    def _short(self, got: int) -> None:
        raise SizeMismatch(f"{self.label}: the stream ended after {got} bytes, but "
                           f"{self.size} were announced")

    def _long(self) -> None:
        raise SizeMismatch(f"{self.label}: the stream holds more than the {self.size} "
                           "bytes announced")

    def close(self) -> None:
        self._held = []
        self.stream.close()

"""Stream writer ("write"): the raw image, in order, to a file descriptor (standard output).

In: the pipeline's extents and the exact size.  Out: every byte, in order, on
``fd``: holes as zeros from the shared zero buffer when ``fd`` is a pipe or a
terminal (a reader expects every byte), skipped with ``lseek`` when it is a
regular file (``> disk.raw`` stays sparse, ``ftruncate`` sets the size at the
end).  Refused: a closed pipe (``EPIPE``: the reader went away) and a full disk,
each as one :class:`~drivepipe.OutputError` line.  Nothing is renamed: a stream
has no final name to protect, so a failure leaves whatever the reader got.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from drivepipe._errors import OutputError
from drivepipe._extent import Extent, zero_chunks
from drivepipe._files import WRITE_SLICE, output_error
from drivepipe._stage import Sink, TargetOptions


class StreamWriter(Sink[str]):
    """Writes the stream to ``fd`` in order; returns ``label``."""

    name = "write"

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> StreamWriter:
        """``-`` or ``stdout:``: the process's standard output."""
        return cls(1)

    def __init__(self, fd: int = 1, label: str = "standard output") -> None:
        self.fd = fd
        self.label = label
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise OutputError(f"{label}: {exc.strerror}") from exc
        self.seekable = stat.S_ISREG(mode)
        self._base = os.lseek(fd, 0, os.SEEK_CUR) if self.seekable else 0

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        for ext in extents:
            if ext.data is not None:
                self._write(memoryview(ext.data))
            elif self.seekable:
                os.lseek(self.fd, ext.length, os.SEEK_CUR)
            else:
                for chunk in zero_chunks(ext.length):
                    self._write(chunk)
        if self.seekable:
            try:
                os.ftruncate(self.fd, self._base + size)
            except OSError as exc:
                raise output_error(self.label, exc) from exc
        return self.label

    def _write(self, view: memoryview) -> None:
        try:
            while view:
                n = os.write(self.fd, view[:WRITE_SLICE])
                view = view[n:]
        except BrokenPipeError as exc:
            raise OutputError(f"{self.label}: the reading end of the pipe was closed") \
                from exc
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise OutputError(f"{self.label}: the reading end of the pipe was closed") \
                    from exc
            raise output_error(self.label, exc) from exc

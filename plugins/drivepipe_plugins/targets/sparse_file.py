"""The sparse file target: extents in, a sparse file under the target name out.

Writes into a temporary file beside the target, ``ftruncate``s it to the image
size, skips holes and all-zero 4 KiB blocks (so the output is sparse even when
the input's zeros were written data), fsyncs, and only then puts it under the
target name.  Refuses to replace an existing target unless ``force``; on any
failure the temporary file is removed and the target is untouched.

The temporary file has no name where the filesystem allows it (``O_TMPFILE``,
linked under the target name at the end), so a killed convert leaves nothing
behind; elsewhere it is ``.NAME.XXXX.part``, locked while written, and the next
run removes the ones whose writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator

from drivepipe._errors import OutputError
from drivepipe._extent import Extent
from drivepipe._files import (
    SparseOutput,
    _umask,
    check_target,
    describe_os_error,
    publish,
    remove_stale_parts,
)
from drivepipe._stage import Sink, TargetOptions
from drivepipe._stats import StageStats


class SparseFileWriter(Sink[str]):
    """Writes the stream to ``target`` as a sparse file; returns the path."""

    name = "write"
    #: bytes of stream after which writeback of what was written is started (0: never)
    writeback_window = 32 << 20

    def __init__(self, target: str, *, force: bool = False, sync: bool = True,
                 direct: bool = False) -> None:
        self.target = target
        self.force = force
        self.sync = sync
        #: write with O_DIRECT (only when synced: unsynced bytes may as well stay cached)
        self.direct = direct and sync
        self._tmp: str | None = None
        self._out: SparseOutput | None = None
        self._stats: StageStats | None = None
        check_target(target, force=force)

    @classmethod
    def open_target(cls, spec: str, options: TargetOptions) -> SparseFileWriter:
        """``file:PATH`` (or a plain path): a sparse file published when complete."""
        return cls(spec, force=options.force, sync=options.sync, direct=options.direct)

    def meter(self, stats: StageStats) -> bool:
        self._stats = stats  # for the bytes written with O_DIRECT
        return False

    def consume(self, extents: Iterator[Extent], size: int) -> str:
        self._out = self._open(size)
        # direct writes leave nothing in the page cache to start writing back
        window = self.writeback_window if self.sync and not self.direct else 0
        flushed = 0
        for ext in extents:
            self._out.write_extent(ext)
            if window and ext.end - flushed >= window:
                self._out.start_writeback(flushed, ext.end - flushed)
                flushed = ext.end
        if self.sync:
            self._out.sync()
        if self._stats is not None and self._out.direct_bytes:
            self._stats.extra["direct"] = self._out.direct_bytes
        if self._tmp is None:
            self._link_unnamed(self._out.fd)
            self._out.close()
        else:
            self._out.close()
            publish(self._tmp, self.target, force=self.force)
            self._tmp = None
        return self.target

    def _open(self, size: int) -> SparseOutput:
        """An unnamed file in the target's directory, else a locked ``.NAME.XXXX.part``."""
        directory = os.path.dirname(os.path.abspath(self.target))
        mode = 0o666 & ~_umask()
        if os.path.isdir("/proc/self/fd"):
            try:
                fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise OutputError(describe_os_error(self.target, exc)) from exc
            else:
                os.fchmod(fd, mode)
                return SparseOutput(self.target, size, fd=fd, direct=self.direct)
        remove_stale_parts(self.target)
        base = os.path.basename(self.target)
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
            # mkstemp makes the file 0600; the output is an ordinary file (0666 - umask).
            os.fchmod(fd, mode)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held while written: not stale to others
        except OSError as exc:
            raise OutputError(describe_os_error(self.target, exc)) from exc
        return SparseOutput(self._tmp, size, fd=fd, direct=self.direct)

    def _link_unnamed(self, fd: int) -> None:
        """Give the finished unnamed file the target's name (never replacing without force)."""
        source = f"/proc/self/fd/{fd}"
        directory = os.path.dirname(os.path.abspath(self.target))
        name = os.path.basename(self.target)
        try:
            dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OutputError(describe_os_error(self.target, exc)) from exc
        try:
            # a dir fd makes CPython call linkat(AT_SYMLINK_FOLLOW): plain link() would
            # link the /proc symlink itself
            if not self.force:
                os.link(source, name, dst_dir_fd=dirfd, follow_symlinks=True)
            else:
                tmp = f".{name}.{os.getpid()}.{fd}.link"
                os.link(source, tmp, dst_dir_fd=dirfd, follow_symlinks=True)
                os.replace(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            os.fsync(dirfd)
        except FileExistsError as exc:
            raise OutputError(f"{self.target}: already exists (replace it explicitly)") \
                from exc
        except OSError as exc:
            raise OutputError(describe_os_error(self.target, exc)) from exc
        finally:
            os.close(dirfd)

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._tmp = None

    def close(self) -> None:
        self.abort()

"""Replace a small file atomically: a crash leaves the old content or the new, never a torn one.

The one way journals and state files are saved: the text goes to a temporary file beside
the target (so the rename stays on one filesystem), is fsynced, renamed over the target,
and the directory is fsynced so that the rename itself is durable.  A failure removes the
temporary file and raises the ``OSError`` (the caller says which file it was in its own
words).
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def replace_file(path: str, text: str, *, prefix: str = ".tmp-", mode: int = 0o600) -> None:
    """Put ``text`` (UTF-8) at ``path`` atomically and durably; ``mode`` for a new file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; filesystems that refuse fsync on a directory
    only cost durability there, not safety."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["fsync_dir", "replace_file"]

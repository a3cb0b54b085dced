"""Exclusive locks on files: one process at a time on a state file, a journal, ...

The lock is an ``flock`` held through an fd: the kernel drops it when the process
dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os

from drivepipe._errors import DrivepipeError, OutputError


def lock_exclusive(path: str, busy: DrivepipeError) -> int:
    """An fd holding the exclusive ``flock`` on ``path`` (created, mode 0600).

    Raises ``busy`` when another process holds it, :class:`OutputError` when the
    file cannot be created.  Close the fd to let go.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise busy from exc
    return fd

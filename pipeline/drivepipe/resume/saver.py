"""Saving a journal in a thread of its own: the newest state only.

A journal save is two fsyncs (the file and its directory: 20-150 ms on a busy disk).
Made in a transfer's own loop it holds the transfer back each time: the chunked
upload's confirmations held every connection's next chunk, the download's checkpoint
held the writer (and so, through the window, the receiver) once a second.  The loop
takes a snapshot (the journal's text, cheap) and goes on; this thread writes the newest
snapshot it was given, skipping any that a newer one replaced before it got to them.

What a crash can lose is the last snapshots, never a promise: a journal only ever names
what is safe to keep, so an older one names less, and the rerun fetches or sends that
again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundSaver:
    """Writes the newest :meth:`submit`-ted text with ``write``, in its own thread."""

    def __init__(self, write: Callable[[str], None], *, name: str = "drivepipe-journal") -> None:
        self._write = write
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, text: str) -> None:
        """Save ``text`` soon, in place of any snapshot not yet written; raises the error
        that stopped an earlier save."""
        if self._error is not None:
            raise self._error
        with self._cond:
            if self._closed:
                raise RuntimeError("the journal saver is closed")
            self._pending = text
            self._cond.notify()

    def close(self) -> BaseException | None:
        """Write what is pending and stop (again: a no-op); the error that stopped a
        save, if any."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        return self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                text, self._pending = self._pending, None
            if text is None:
                return
            try:
                self._write(text)
            except BaseException as exc:  # raised by the next submit, or by close
                self._error = exc
                return


__all__ = ["BackgroundSaver"]

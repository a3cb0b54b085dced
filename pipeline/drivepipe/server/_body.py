"""Reading a request body of known length in large pieces, cheaply.

The few body bytes the header parser already buffered are taken first; after
that, on a plain TCP socket, each piece is one ``recv_into(..., MSG_WAITALL)``
on the socket in blocking mode (one system call per 4 MiB instead of one per
socket buffer; measured 0.33 -> 0.26 CPU s/GiB over loopback).  The idle
timeout then comes from ``SO_RCVTIMEO`` (set by the handler).  TLS sockets go through the buffered
reader.  A body that ends early, stalls past the timeout, or hits a
``drop_upload`` fault raises :class:`ClientGone`.  With a ``rate`` (bytes a
second), reads are paced to it in pieces of at most 256 KiB: the socket's
receive window then slows the sender as a capped network flow would.
"""

from __future__ import annotations

import io
import socket
import ssl
import time
from types import TracebackType

from drivepipe.server._http import ClientGone

_PACE_PIECE = 256 << 10


class BodyReader:
    """``length`` body bytes from ``rfile``/``sock``; use as a context manager."""

    def __init__(
        self,
        rfile: io.BufferedIOBase,
        sock: socket.socket,
        length: int,
        budget: int = -1,
        rate: int = 0,
    ) -> None:
        self.rfile = rfile
        self.sock = sock
        self.left = length
        #: Bytes still allowed before a fault drops the connection (-1: no fault).
        self.budget = budget
        self._direct = not isinstance(sock, ssl.SSLSocket)
        self._drained = False
        self._timeout = sock.gettimeout()
        self._rate = rate
        self._paced = 0
        self._t0 = 0.0

    def __enter__(self) -> BodyReader:
        if self._direct:
            self.sock.settimeout(None)  # blocking: MSG_WAITALL waits for whole pieces
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._direct:
            self.sock.settimeout(self._timeout)

    def readinto(self, view: memoryview) -> int:
        """Fill up to ``len(view)`` bytes of ``view``; returns how many."""
        want = min(self.left, len(view))
        if self.budget == 0:
            raise ClientGone("fault injection: upload dropped")
        if self.budget > 0:
            want = min(want, self.budget)
        if self._rate > 0:
            want = min(want, _PACE_PIECE)
            self._pace()
        try:
            n = self._read(view, want)
        except (BlockingIOError, TimeoutError) as exc:
            raise ClientGone("the client stopped sending its body") from exc
        if not n:
            raise ClientGone("the request body ended early")
        if self.budget > 0:
            self.budget -= n
        self.left -= n
        self._paced += n
        return n

    def _pace(self) -> None:
        """Sleep until what was received so far is no more than ``rate`` allows."""
        now = time.monotonic()
        if not self._t0:
            self._t0 = now
        due = self._t0 + self._paced / self._rate
        if due > now:
            time.sleep(due - now)

    def _read(self, view: memoryview, want: int) -> int:
        if not self._direct:
            return self.rfile.readinto(view[:want])
        if self._drained:
            return self.sock.recv_into(view, want, socket.MSG_WAITALL)
        # read1 returns buffered bytes (or one raw read); less than asked means its
        # buffer is now empty and the socket can be read directly.
        head = self.rfile.read1(want)
        view[: len(head)] = head
        self._drained = len(head) < want
        return len(head)

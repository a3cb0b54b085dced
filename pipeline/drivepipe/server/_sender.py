"""Sending a byte range of a sparse drive file: data from disk, holes from the zero buffer.

Large data spans go out with ``sendfile`` (no copy through Python); large
holes as views of the shared zero buffer.  Small spans (a fragmented image:
thousands of 4 KiB pieces) are gathered into one 1 MiB buffer, data with
``preadv`` and holes copied from the zero buffer, and sent with one
``sendall``: measured on 256 MiB of alternating 4 KiB data and holes, one
``sendfile`` per piece cost 2.7 CPU s/GiB.  Holes are never read from disk.
Through TLS (no ``sendfile``) data is read in 1 MiB pieces.
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Final

from drivepipe._extent import ZERO_VIEW
from drivepipe.server._http import ClientGone
from drivepipe.server._ranges import segments

#: Spans at least this long are sent on their own; shorter ones are gathered.
DIRECT_MIN: Final = 64 << 10
GATHER: Final = 1 << 20


class SpanSender:
    """Sends ``[start, end)`` of ``fd`` on ``sock``."""

    def __init__(self, sock: socket.socket, fd: int) -> None:
        self.sock = sock
        self.fd = fd
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._buf = memoryview(bytearray(GATHER))
        self._filled = 0

    def send(self, start: int, end: int) -> None:
        with open(self.fd, "rb", closefd=False) as f:
            for offset, length, is_data in segments(self.fd, start, end):
                if length < DIRECT_MIN:
                    self._gather(offset, length, is_data)
                    continue
                self._flush()
                if not is_data:
                    self._send_zeros(length)
                elif self.tls:
                    self._send_read(offset, length)
                else:
                    self.sock.sendfile(f, offset, length)
        self._flush()

    def _gather(self, offset: int, length: int, is_data: bool) -> None:
        if self._filled + length > GATHER:
            self._flush()
        view = self._buf[self._filled : self._filled + length]
        if is_data:
            if os.preadv(self.fd, [view], offset) != length:
                raise ClientGone("the drive file shrank while it was being served")
        else:
            view[:] = ZERO_VIEW[:length]
        self._filled += length

    def _flush(self) -> None:
        if self._filled:
            self.sock.sendall(self._buf[: self._filled])
            self._filled = 0

    def _send_read(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            data = os.pread(self.fd, min(end - offset, GATHER), offset)
            if not data:
                raise ClientGone("the drive file shrank while it was being served")
            self.sock.sendall(data)
            offset += len(data)

    def _send_zeros(self, length: int) -> None:
        while length > 0:
            n = min(length, len(ZERO_VIEW))
            self.sock.sendall(ZERO_VIEW[:n])
            length -= n

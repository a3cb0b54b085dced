"""The store's per-connection rate cap paces body reads (no clock is measured here)."""

from __future__ import annotations

import io
import socket
import threading

import pytest

from drivepipe.server import _body
from drivepipe.server._body import BodyReader


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("rate", [0, 1 << 20])
def test_body_reads_are_paced_to_the_rate(monkeypatch: pytest.MonkeyPatch, rate: int) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_body.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(_body.time, "sleep", clock.sleep)
    a, b = socket.socketpair()
    size = 1 << 20
    payload = bytes(range(256)) * (size // 256)
    try:
        a.sendall(payload[:4096])  # the rest after the reader took its first pieces
        rfile = io.BufferedReader(socket.SocketIO(b, "rb"))
        body = BodyReader(rfile, b, size, rate=rate)
        got = bytearray()
        buf = memoryview(bytearray(4 << 20))
        sender = threading.Thread(target=a.sendall, args=(payload[4096:],))
        with body:
            sender.start()
            while body.left:
                n = body.readinto(buf)
                got += buf[:n]
        sender.join()
        assert bytes(got) == payload
        if rate:
            # 1 MiB at 1 MiB/s: each piece (at most the pacing piece) waits until the
            # bytes before it were due, so the last one starts after about a second
            assert (size - _body._PACE_PIECE) / rate <= clock.now - 100.0 <= size / rate
        else:
            assert clock.slept == []
    finally:
        a.close()
        b.close()

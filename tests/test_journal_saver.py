"""The journal saver (drivepipe.resume.saver): newest snapshot only, errors surface."""

from __future__ import annotations

import threading

import pytest

from drivepipe.resume.saver import BackgroundSaver


def test_a_busy_saver_writes_only_the_newest_snapshot_next() -> None:
    written: list[str] = []
    started, release = threading.Event(), threading.Event()

    def write(text: str) -> None:
        started.set()
        release.wait(10)
        written.append(text)

    saver = BackgroundSaver(write)
    saver.submit("first")
    assert started.wait(10)  # the thread is inside the first save
    for text in ("second", "third", "fourth"):
        saver.submit(text)  # returns at once: the loop never waits for a save
    release.set()
    assert saver.close() is None
    assert written == ["first", "fourth"]
    assert saver.close() is None  # closing again is harmless


def test_a_failed_save_is_raised_by_the_next_submit() -> None:
    def write(text: str) -> None:
        raise OSError(28, "No space left on device")

    saver = BackgroundSaver(write)
    saver.submit("x")
    error = saver.close()
    assert isinstance(error, OSError) and error.errno == 28
    with pytest.raises(OSError, match="No space left"):
        saver.submit("y")


def test_nothing_is_written_after_close() -> None:
    written: list[str] = []
    saver = BackgroundSaver(written.append)
    saver.submit("a")
    saver.close()
    with pytest.raises(RuntimeError, match="closed"):
        saver.submit("b")
    assert written == ["a"]

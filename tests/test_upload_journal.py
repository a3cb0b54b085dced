"""The chunked upload's resume journal: identity, ranges, atomic saves, unreadable files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivepipe._errors import ImageError, OutputError
from drivepipe.resume.upload_journal import (
    HEAD_BYTES,
    ImageIdentity,
    JournalError,
    JournalLock,
    UploadJournal,
    default_journal_path,
    from_ranges,
    to_ranges,
)
from drivepipe_plugins.targets.drive_chunked import JournalSaver

API = "http://127.0.0.1:1/api/2.0/"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(HEAD_BYTES + 4096))
    return path


def journal_for(image: Path, path: Path, confirmed: set[int] | None = None) -> UploadJournal:
    return UploadJournal(str(path), "6a1f0e8c-0b7e-4c39-9d2e-8f7d6c5b4a39", API,
                         ImageIdentity.of(str(image)), image.stat().st_size, 1 << 20,
                         confirmed or set())


@given(st.sets(st.integers(min_value=0, max_value=500)))
def test_ranges_round_trip(numbers: set[int]) -> None:
    ranges = to_ranges(numbers)
    assert from_ranges(ranges) == numbers
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_save_and_load(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "j" / "journal.json"
    journal = journal_for(image, path, {0, 1, 2, 7})
    journal.save()
    loaded = UploadJournal.load(str(path))
    assert loaded == journal
    assert json.loads(path.read_text())["confirmed"] == [[0, 3], [7, 8]]
    assert [p.name for p in path.parent.iterdir()] == ["journal.json"], "no temp file left"


def test_confirm_is_saved_at_once(image: Path, tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    journal = journal_for(image, path)
    journal.save()
    journal.confirm(4)
    loaded = UploadJournal.load(str(path))
    assert loaded is not None and loaded.confirmed == {4}


def test_missing_journal_is_none(tmp_path: Path) -> None:
    assert UploadJournal.load(str(tmp_path / "nope.json")) is None


@pytest.mark.parametrize("text", ["{not json", '{"version": 99}', '{"version": 1}', "[]"])
def test_unreadable_journal_is_one_clear_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "journal.json"
    path.write_text(text)
    with pytest.raises(JournalError, match="delete it to start over") as err:
        UploadJournal.load(str(path))
    assert str(path) in err.value.one_line()


def test_unwritable_journal_is_an_output_error(image: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    journal = journal_for(image, blocker / "journal.json")
    with pytest.raises(OutputError, match="cannot write upload journal"):
        journal.save()


def test_identity_notices_changes(image: Path) -> None:
    before = ImageIdentity.of(str(image))
    assert before.differences(ImageIdentity.of(str(image))) == []
    stat = image.stat()
    with open(image, "r+b") as f:
        f.write(b"\0" * 16)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: content tells
    assert before.differences(ImageIdentity.of(str(image))) == ["content of the first MiB"]
    os.utime(image, ns=(1, 1))
    assert "modification time" in before.differences(ImageIdentity.of(str(image)))


def test_identity_of_a_replaced_file_differs_by_inode(image: Path, tmp_path: Path) -> None:
    before = ImageIdentity.of(str(image))
    copy = tmp_path / "copy"
    copy.write_bytes(image.read_bytes())
    os.utime(copy, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns))
    os.replace(copy, image)
    assert before.differences(ImageIdentity.of(str(image))) == ["inode"]


def test_identity_of_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        ImageIdentity.of(str(tmp_path / "gone.raw"))


def test_default_path_is_keyed_by_image_and_endpoint(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = default_journal_path(str(image), API)
    assert path.startswith(str(tmp_path / "cache" / "drivepipe" / "uploads"))
    assert default_journal_path(str(image), API) == path
    link = tmp_path / "link.raw"
    link.symlink_to(image)
    assert default_journal_path(str(link), API) == path, "the real path is the key"
    assert default_journal_path(str(image), "http://other:1/api/2.0/") != path


def test_lock_refuses_a_second_upload_of_the_same_journal(tmp_path: Path) -> None:
    path = str(tmp_path / "uploads" / "journal.json")
    with JournalLock(path):
        with pytest.raises(JournalError, match="another drivepipe upload is using"):
            JournalLock(path).__enter__()
        with JournalLock(str(tmp_path / "other.json")):
            pass  # another journal is another upload
    with JournalLock(path):
        pass  # released on exit


def test_lock_held_by_a_killed_process_is_released(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.json")
    child = ("import os, sys; from drivepipe.resume.upload_journal import JournalLock; "
             "JournalLock(sys.argv[1]).__enter__(); os.kill(os.getpid(), 9)")
    died = subprocess.run([sys.executable, "-c", child, path], check=False)
    assert died.returncode == -9 and os.path.exists(path + ".lock")
    with JournalLock(path):
        pass


def test_the_saver_writes_every_confirmation_by_the_time_it_closes(
    image: Path, tmp_path: Path
) -> None:
    path = tmp_path / "journals" / "journal.json"
    journal = journal_for(image, path)
    journal.save()
    saver = JournalSaver(journal)
    for number in (0, 1, 2, 5):
        saver.confirm(number)
    assert journal.confirmed == {0, 1, 2, 5}, "confirmed at once in memory"
    assert saver.close() is None
    loaded = UploadJournal.load(str(path))
    assert loaded is not None and loaded.confirmed == {0, 1, 2, 5}
    assert [p.name for p in path.parent.iterdir()] == ["journal.json"], "no temp file left"


def test_a_failed_save_stops_the_next_confirmation(image: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    saver = JournalSaver(journal_for(image, blocker / "journal.json"))
    saver.confirm(0)
    error = saver.close()
    assert isinstance(error, OutputError) and "cannot write upload journal" in str(error)
    with pytest.raises(OutputError, match="cannot write upload journal"):
        saver.confirm(1)

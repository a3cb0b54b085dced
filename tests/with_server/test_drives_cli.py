"""``drivepipe drives``: list, show, rm, wait, uploads, against the real local store.

Real pycurl, the real store over HTTP on 127.0.0.1; drives are made by real
``drivepipe upload`` runs (direct and chunked) or straight in the store, and what
the commands say is checked against what the store holds.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from drivepipe.cli import main
from drivepipe.resume.upload_journal import (
    ImageIdentity,
    JournalLock,
    UploadJournal,
    default_journal_path,
)
from drivepipe.server import RunningServer

MiB = 1 << 20


class Run:
    """The CLI in this process, with a clean HOME, the store's account and journal cache."""

    def __init__(self, store: RunningServer, tmp: Path, capfd: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store
        self.capfd = capfd
        self.cache = tmp / "cache"
        (tmp / "home").mkdir()
        monkeypatch.setenv("HOME", str(tmp / "home"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(self.cache))
        monkeypatch.delenv("CLOUDSIGMA_CONFIG", raising=False)
        monkeypatch.setenv("DRIVEPIPE_ENDPOINT", store.base_url)
        monkeypatch.setenv("CLOUDSIGMA_USERNAME", store.username)
        monkeypatch.setenv("CLOUDSIGMA_PASSWORD", store.password)
        # no terminal unless a test gives one
        monkeypatch.setattr("sys.stdin", io.StringIO(""))
        self.monkeypatch = monkeypatch

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capfd.readouterr()
        code = main(list(args))
        out, err = self.capfd.readouterr()
        return code, out, err

    def upload(self, image: Path, *args: str) -> str:
        code, out, err = self("upload", "--progress", "none", str(image), *args)
        assert code == 0, err
        return out.strip()


@pytest.fixture
def run(drive_store: RunningServer, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Run:
    return Run(drive_store, tmp_path, capfd, monkeypatch)


class Terminal(io.StringIO):
    """A stdin that says it is a terminal, with the user's answers in it."""

    def isatty(self) -> bool:
        return True


def image(path: Path, size: int = 3 * MiB, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(rng.randbytes(100_000))
        f.seek(size - 5000)
        f.write(rng.randbytes(5000))
    return path


def one_error_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.startswith("drivepipe: error: "), err
    for word in words:
        assert word in err, err


def init_upload(store: RunningServer, name: str, size: int) -> str:
    """A drive in status ``uploading`` (its chunks still to come), as initupload makes it."""
    return store.store.init_upload(name, size, "disk").uuid


# --- names --------------------------------------------------------------------------------


def test_uploads_name_the_drive_after_the_image(run: Run, tmp_path: Path) -> None:
    direct = run.upload(image(tmp_path / "web-server.img"))
    chunked = run.upload(image(tmp_path / "db.qcow2.raw", seed=2), "--chunked",
                         "--chunk-size", "1M")
    named = run.upload(image(tmp_path / "x.img", seed=3), "--name", "mine")
    assert run.store.store.get(direct).name == "web-server.img"
    assert run.store.store.get(chunked).name == "db.qcow2.raw"
    assert run.store.store.get(named).name == "mine"
    # --no-meta keeps the meta empty but still names the drive
    plain = run.upload(image(tmp_path / "plain.img", seed=4), "--no-meta")
    rec = run.store.store.get(plain)
    assert rec.name == "plain.img" and rec.meta == {}


# --- list and show ------------------------------------------------------------------------


def test_list_shows_uuid_name_size_status_and_stored_checksum(run: Run, tmp_path: Path) -> None:
    first = image(tmp_path / "one.img")
    a = run.upload(first)
    b = run.upload(image(tmp_path / "two.img", seed=5), "--no-meta")
    pending = init_upload(run.store, "half.img", 4 * MiB)
    code, out, err = run("drives")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["UUID", "NAME", "SIZE", "STATUS", "XXH128"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {a, b, pending}
    digest = xxhash.xxh3_128_hexdigest(first.read_bytes())
    assert rows[a] == [a, "one.img", "3.0", "MiB", "unmounted", digest]
    assert rows[b][-1] == "-" and rows[pending][-2:] == ["uploading", "-"]
    # the columns line up: every row's status starts where the header's does
    column = lines[0].index("STATUS")
    assert all(line[column:].split()[0] in ("unmounted", "uploading") for line in lines[1:])
    assert run("drives", "list") == (0, out, "")

    code, out, err = run("drives", "--json")
    assert code == 0, err
    listed = {d["uuid"]: d for d in json.loads(out)}
    assert listed[a]["name"] == "one.img" and listed[a]["xxh128"] == digest
    assert listed[a]["size"] == run.store.store.get(a).size
    assert listed[a]["xxh128_size"] == 3 * MiB and listed[a]["downloadable"] is True
    assert listed[pending]["status"] == "uploading" and listed[pending]["downloadable"] is False


def test_list_reads_every_page(run: Run, put_drive: Any) -> None:
    uuids = {put_drive(run.store, os.urandom(10)) for _ in range(105)}  # over one page of 100
    code, out, err = run("drives", "--json")
    assert code == 0, err
    assert {d["uuid"] for d in json.loads(out)} == uuids


def test_empty_list_is_empty(run: Run) -> None:
    assert run("drives") == (0, "", "")
    assert run("drives", "--json") == (0, "[]\n", "")


def test_show_text_and_json(run: Run, tmp_path: Path) -> None:
    uuid = run.upload(image(tmp_path / "disk.raw"))
    code, out, err = run("drives", "show", uuid.upper())
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["uuid:"] == uuid and fields["name:"] == "disk.raw"
    assert fields["status:"] == "unmounted" and fields["downloadable:"] == "yes"
    assert fields["xxh128_size:"] == f"{3 * MiB} (3.0 MiB)"
    assert fields["meta.drivepipe_xxh128:"] == fields["xxh128:"]
    code, out, _ = run("drives", "show", uuid, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["uuid"] == uuid and shown["meta"]["drivepipe_size"] == str(3 * MiB)


def test_show_of_an_unknown_drive_or_no_uuid_is_one_line(run: Run) -> None:
    code, out, err = run("drives", "show", "12345678-1234-1234-1234-123456789abc")
    assert code == 6 and out == ""
    one_error_line(err, "HTTP 404", "does not exist")
    code, out, err = run("drives", "show", "not-a-uuid")
    assert code == 2 and out == ""
    one_error_line(err, "not a drive UUID")


def test_wrong_password_is_one_line(run: Run) -> None:
    run.monkeypatch.setenv("CLOUDSIGMA_PASSWORD", "wrong")
    code, out, err = run("drives")
    assert code == 6 and out == ""
    one_error_line(err, "authentication refused")


def test_options_before_a_subcommand_are_refused(run: Run) -> None:
    code, _, err = run("drives", "--json", "show", "x")
    assert code == 2
    one_error_line(err, "after the command")


# --- rm -----------------------------------------------------------------------------------


def test_rm_with_yes_deletes_and_carries_on_past_an_unknown_drive(
        run: Run, put_drive: Any) -> None:
    a, b = put_drive(run.store, b"a" * 100), put_drive(run.store, b"b" * 100)
    keep = put_drive(run.store, b"c" * 100)
    missing = "12345678-1234-1234-1234-123456789abc"
    code, out, err = run("drives", "rm", "--yes", a, missing, b)
    assert code == 6
    assert out.split() == [a, b]
    one_error_line(err, missing)
    assert [r.uuid for r in run.store.store.list()] == [keep]
    assert not os.path.exists(run.store.store.raw_path(a))


def test_rm_without_a_terminal_refuses_in_one_line(run: Run, put_drive: Any) -> None:
    uuid = put_drive(run.store, b"a" * 100)
    code, out, err = run("drives", "rm", uuid)
    assert code == 2 and out == ""
    one_error_line(err, "--yes", "terminal")
    assert run.store.store.get(uuid).uuid == uuid
    # a typo among the UUIDs stops everything before anything is deleted
    code, out, err = run("drives", "rm", "--yes", uuid, "not-a-uuid")
    assert code == 2 and out == ""
    one_error_line(err, "not a drive UUID")
    assert run.store.store.get(uuid).uuid == uuid


def test_rm_asks_on_a_terminal(run: Run, put_drive: Any) -> None:
    uuid = put_drive(run.store, b"a" * 100)
    run.monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    code, out, err = run("drives", "rm", uuid)
    assert code == 0 and out == ""
    assert f"delete drive {uuid}" in err and "kept" in err
    assert run.store.store.get(uuid).uuid == uuid
    run.monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    code, out, err = run("drives", "rm", uuid)
    assert code == 0 and out == uuid + "\n"
    assert run.store.store.list() == []


# --- wait ---------------------------------------------------------------------------------


def test_wait_returns_at_once_for_a_downloadable_drive(run: Run, put_drive: Any) -> None:
    uuid = put_drive(run.store, b"a" * 100)
    code, out, err = run("drives", "wait", uuid, "--timeout", "5")
    assert (code, out) == (0, uuid + "\n"), err
    assert "unmounted" in err
    assert run("drives", "wait", uuid, "-q") == (0, uuid + "\n", "")


def test_wait_times_out_in_one_line(run: Run) -> None:
    uuid = init_upload(run.store, "slow.img", 2 * MiB)
    started = time.monotonic()
    code, out, err = run("drives", "wait", uuid, "--timeout", "0.6", "--interval", "0.1", "-q")
    assert code == 6 and out == ""
    one_error_line(err, uuid, "still uploading", "0.6 s")
    assert 0.5 < time.monotonic() - started < 5


def test_wait_follows_the_drive_until_its_upload_completes(run: Run) -> None:
    uuid = init_upload(run.store, "late.img", 2 * MiB)

    def finish() -> None:
        time.sleep(0.5)
        writer = run.store.store.begin_chunk(uuid, 0, 2 * MiB)
        writer.write(os.urandom(2 * MiB))
        writer.finish()

    thread = threading.Thread(target=finish)
    thread.start()
    try:
        code, out, err = run("drives", "wait", uuid, "--timeout", "20", "--interval", "0.1")
    finally:
        thread.join()
    assert (code, out) == (0, uuid + "\n"), err
    assert err.index("uploading") < err.index("unmounted")


# --- interrupted chunked uploads ----------------------------------------------------------


def interrupted(run: Run, path: Path, confirmed: set[int]) -> tuple[str, UploadJournal]:
    """A chunked upload into a real drive that stopped after ``confirmed`` chunks."""
    size = path.stat().st_size
    uuid = init_upload(run.store, path.name, size)
    data = path.read_bytes()
    for number in confirmed:
        writer = run.store.store.begin_chunk(uuid, number, MiB)
        writer.write(data[number * MiB:(number + 1) * MiB])
        writer.finish()
    # where the upload command itself keeps it (XDG_CACHE_HOME is the test's)
    journal_path = default_journal_path(str(path), run.store.base_url)
    journal = UploadJournal(journal_path, uuid, run.store.base_url,
                            ImageIdentity.of(str(path)), size, MiB, set(confirmed))
    journal.save()
    return uuid, journal


def test_uploads_lists_interrupted_uploads_and_rerunning_resumes(run: Run, tmp_path: Path) -> None:
    img = image(tmp_path / "big.img", 4 * MiB)
    uuid, journal = interrupted(run, img, {0, 2})
    code, out, err = run("drives", "uploads")
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split() == ["DRIVE", "DONE", "STATE", "ENDPOINT", "IMAGE"]
    assert row.split() == [uuid, "2/4", "chunks", "interrupted", run.store.base_url,
                           str(img)]
    assert "upload --chunked" in err and "--discard" in err  # how to resume, how to discard
    code, out, _ = run("drives", "uploads", "--json")
    listed = json.loads(out)
    assert code == 0 and listed[0]["uuid"] == uuid and listed[0]["confirmed"] == 2
    assert listed[0]["journal"] == journal.path and listed[0]["running"] is False

    # resuming is rerunning the upload: the same drive gets the missing chunks
    assert run.upload(img, "--chunked", "--chunk-size", "1M") == uuid
    with open(run.store.store.raw_path(uuid), "rb") as f:
        assert f.read(4 * MiB) == img.read_bytes()
    assert run("drives", "uploads", "--json") == (0, "[]\n", "")
    code, out, err = run("drives", "uploads")
    assert (code, out) == (0, "") and "no interrupted" in err


def test_discard_deletes_the_partial_drive_and_the_journal(run: Run, tmp_path: Path) -> None:
    uuid, journal = interrupted(run, image(tmp_path / "a.img", 3 * MiB), {1})
    code, out, err = run("drives", "uploads", "--discard", uuid)
    assert code == 2 and out == ""
    one_error_line(err, "--yes")
    assert os.path.exists(journal.path)
    code, out, err = run("drives", "uploads", "--discard", uuid, "--yes")
    assert (code, out) == (0, uuid + "\n"), err
    assert not os.path.exists(journal.path)
    assert run.store.store.list() == []
    code, _, err = run("drives", "uploads", "--discard", uuid, "--yes")
    assert code == 2
    one_error_line(err, "no interrupted upload")


def test_discard_keep_drive_and_a_completed_drive_is_kept(run: Run, tmp_path: Path) -> None:
    uuid, journal = interrupted(run, image(tmp_path / "a.img", 2 * MiB), {0})
    code, _, err = run("drives", "uploads", "--discard", uuid, "--yes", "--keep-drive")
    assert code == 0, err
    assert not os.path.exists(journal.path) and run.store.store.get(uuid).status == "uploading"
    # a journal whose drive did complete: discarding never deletes a finished drive
    done, journal = interrupted(run, image(tmp_path / "b.img", 2 * MiB, seed=9), {0, 1})
    assert run.store.store.get(done).status == "unmounted"
    code, _, err = run("drives", "uploads", "--discard", done, "--yes")
    assert code == 0 and "kept it" in err
    assert run.store.store.get(done).status == "unmounted" and not os.path.exists(journal.path)


def test_a_broken_journal_is_a_warning_not_a_failure(run: Run, tmp_path: Path) -> None:
    uuid, _ = interrupted(run, image(tmp_path / "a.img", 2 * MiB), set())
    broken = run.cache / "drivepipe" / "uploads" / "zz.json"
    broken.write_text("{not json")
    code, out, err = run("drives", "uploads")
    assert code == 0 and uuid in out
    assert "warning" in err and "zz.json" in err


def test_a_running_upload_is_shown_as_running_and_not_discarded(run: Run, tmp_path: Path) -> None:
    uuid, journal = interrupted(run, image(tmp_path / "a.img", 2 * MiB), set())
    with JournalLock(journal.path):  # what a running drivepipe upload holds
        code, out, _ = run("drives", "uploads")
        assert code == 0 and "running" in out.splitlines()[1].split()
        code, _, err = run("drives", "uploads", "--discard", uuid, "--yes")
        assert code == 2
        one_error_line(err, "running right now")
    assert os.path.exists(journal.path) and run.store.store.get(uuid).status == "uploading"


# --- --expect takes what xxh128sum prints -------------------------------------------------


def test_download_expect_takes_the_bare_digest_xxh128sum_prints(
        run: Run, tmp_path: Path, put_drive: Any) -> None:
    data = os.urandom(50_000) + bytes(MiB - 50_000)  # exactly the store's minimum: no growth
    uuid = put_drive(run.store, data)
    digest = xxhash.xxh3_128_hexdigest(data)
    out_file = tmp_path / "back.raw"
    code, out, err = run("download", uuid, "-o", str(out_file), "--progress", "none",
                         "--expect", digest)
    assert (code, out) == (0, f"{out_file}\n"), err
    assert out_file.read_bytes() == data
    code, _, err = run("download", uuid, "-o", str(tmp_path / "bad.raw"), "--progress",
                       "none", "--expect", "0" * 32)
    assert code == 7, err
    code, _, err = run("download", uuid, "--expect", "0" * 31)
    assert code == 2
    one_error_line(err, "32 hex digits")

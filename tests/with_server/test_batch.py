"""`drivepipe batch` on this machine, against the real local store.

A plan of 20+ items (raw, qcow2 and gzip images, direct and chunked uploads,
downloads) runs with four jobs and every drive round-trips; a batch killed
with SIGKILL and run again sends nothing for the items it had finished (the
store's own methods count what arrives); a failing item is reported while
the others succeed; a transient refusal is retried.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import xxhash
from batch_support import make_raw

import drivepipe
from drivepipe.jobs import (
    Access,
    ConnectionBudget,
    Item,
    LocalExecutor,
    Settings,
    load_plan,
    local,
    transfer,
)
from drivepipe.server import RunningServer

KiB = 1 << 10
CHUNK = 64 * KiB
DRIVEPIPE = str(Path(sys.executable).with_name("drivepipe"))
SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "progress.schema.json").read_text())


@pytest.fixture
def account(drive_store: RunningServer, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    for name, value in drive_store.env.items():
        monkeypatch.setenv(name, value)
    return drive_store


def settings_for(srv: RunningServer, **extra: Any) -> Settings:
    return Settings(endpoint=srv.base_url, chunk_size=CHUNK, progress_interval=0.05, **extra)


def write_plan(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def build_images(folder: Path, count: int, *, base: int = 200 * KiB) -> dict[str, Path]:
    """``count`` images (raw, qcow2 when qemu-img is there, gzip); name -> raw original.

    Every image has a distinct raw size, so the store's calls tell the items apart.
    """
    folder.mkdir(exist_ok=True)
    images: dict[str, Path] = {}
    qemu = shutil.which("qemu-img")
    for n in range(count):
        raw = make_raw(folder / f"disk{n}.raw", base + n * 4 * KiB + 512, seed=n)
        kind = ("raw", "qcow2", "gzip")[n % 3]
        if kind == "qcow2" and qemu:
            image = folder / f"disk{n}.qcow2"
            subprocess.run([qemu, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                           check=True, capture_output=True)
        elif kind == "gzip":
            image = folder / f"disk{n}.raw.gz"
            with open(raw, "rb") as src, gzip.open(image, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
        else:
            image = raw
        images[image.name] = raw
    return images


def upload_items(images: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"op": "upload", "image": str(raw.parent / name), "name": f"vm-{n}",
             "meta": {"batch": "test"}, "chunked": n % 2 == 1, "key": f"up{n}"}
            for n, (name, raw) in enumerate(images.items())]


def fleet(
    srv: RunningServer, folder: Path, put_drive: Callable[[RunningServer, bytes], str]
) -> tuple[list[dict[str, Any]], list[Path], dict[str, bytes]]:
    """The 21 items of a fleet: 16 uploads (raw, qcow2, gzip; direct and chunked) and 5
    downloads (outputs relative to the plan's directory); also the raw images in item
    order and the downloads' drive contents by key."""
    images = build_images(folder / "images", 16)
    sources = {f"dl{n}": os.urandom(150 * KiB + n) for n in range(5)}
    drives = {key: put_drive(srv, data) for key, data in sources.items()}
    items = upload_items(images) + [
        {"op": "download", "drive": uuid, "output": f"out/{key}.raw", "key": key}
        for key, uuid in drives.items()]
    return items, list(images.values()), sources


def check_fleet(srv: RunningServer, report: Any, raws: list[Path],
                sources: dict[str, bytes]) -> None:
    """Every drive holds its image (digest in its meta), every download its drive."""
    for n, result in enumerate(report.results[:16]):
        record = srv.store.get(result.uuid or "")
        assert record.meta["drivepipe_xxh128"] == xxh(raws[n]) == result.xxh128
        assert record.meta["batch"] == "test" and record.name == f"vm-{n}"
        assert drive_holds(srv, result.uuid or "", raws[n])
    for result in report.results[16:]:
        got = Path(result.output or "").read_bytes()  # the store grows drives to 1 MiB
        data = sources[result.key]
        assert got[:len(data)] == data and not got[len(data):].strip(b"\0")


def drive_holds(srv: RunningServer, uuid: str, raw: Path) -> bool:
    data = raw.read_bytes()
    with open(srv.store.raw_path(uuid), "rb") as drive:
        return drive.read(len(data)) == data


def xxh(path: Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


def test_twenty_items_with_four_jobs_round_trip(
    account: RunningServer, tmp_path: Path, put_drive: Callable[[RunningServer, bytes], str]
) -> None:
    items, raws, sources = fleet(account, tmp_path, put_drive)
    plan = write_plan(tmp_path / "plan.jsonl", items)
    events: list[dict[str, Any]] = []
    executor = LocalExecutor(jobs=4, connections=6)
    report = drivepipe.batch(str(plan), executor=executor, settings=settings_for(account),
                             on_event=events.append)
    assert report.ok, [(r.key, r.error) for r in report.results if not r.ok]
    assert len(report.results) == 21 and report.counts == {"done": 21}
    assert 1 < executor.peak <= 6  # items overlapped, within the budget
    check_fleet(account, report, raws, sources)
    kinds = {(e["event"], e["key"]) for e in events}
    assert all(("start", r.key) in kinds and ("done", r.key) in kinds for r in report.results)
    assert any(e["event"] == "progress" for e in events)
    state = json.loads((tmp_path / "plan.jsonl.state.json").read_text())
    assert {v["status"] for v in state["items"].values()} == {"done"}

    # every uploaded drive comes back as its image's raw bytes
    back = write_plan(tmp_path / "back.jsonl", [
        {"op": "download", "drive": r.uuid, "output": f"back/{r.key}.raw"}
        for r in report.results[:16]])
    again = drivepipe.batch(str(back), jobs=4, settings=settings_for(account))
    assert again.ok
    for n, result in enumerate(again.results):
        data = raws[n].read_bytes()
        assert Path(result.output or "").read_bytes()[:len(data)] == data

    # a rerun checks and skips everything; a deleted output is fetched again
    os.unlink(report.results[16].output or "")
    rerun = drivepipe.batch(str(plan), jobs=4, settings=settings_for(account))
    assert rerun.counts == {"skipped": 20, "done": 1}
    assert rerun.results[16].status == "done"


def count_store_calls(srv: RunningServer) -> tuple[list[int], list[str]]:
    """Sizes of the direct uploads and drives of the chunks the store receives whole."""
    sizes: list[int] = []
    chunked: list[str] = []
    store = srv.store

    def counted(begin: Callable[..., Any], count: Callable[..., object]) -> Callable[..., Any]:
        """``begin``, whose writers call ``count`` with its arguments once finished."""

        def begin_counted(*args: Any, **kwargs: Any) -> Any:
            writer = begin(*args, **kwargs)
            finish = writer.finish

            def finished() -> Any:
                record = finish()
                count(*args, **kwargs)
                return record

            writer.finish = finished
            return writer

        return begin_counted

    # counting wrappers around the store's real methods: the server side counts
    store.begin_direct = counted(  # type: ignore[method-assign]
        store.begin_direct, lambda size, name="": sizes.append(size))
    store.begin_chunk = counted(  # type: ignore[method-assign]
        store.begin_chunk, lambda uuid, number, chunk_size: chunked.append(uuid))
    return sizes, chunked


def batch_command(srv: RunningServer, plan: Path, *extra: str) -> list[str]:
    return [DRIVEPIPE, "batch", str(plan), "--endpoint", srv.base_url,
            "--chunk-size", "64K", "--jobs", "2", "--progress", "none", *extra]


def done_in_state(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data["items"].items() if v["status"] == "done"}


def test_sigkill_mid_batch_then_rerun_sends_only_what_was_missing(
    account: RunningServer, tmp_path: Path, put_drive: Callable[[RunningServer, bytes], str]
) -> None:
    images = build_images(tmp_path / "images", 12)
    # downloads first in the plan: they are among the items done before the kill
    downloads = [{"op": "download", "drive": put_drive(account, os.urandom(100 * KiB + n)),
                  "output": f"out/dl{n}.raw", "key": f"dl{n}"} for n in range(2)]
    plan = write_plan(tmp_path / "plan.jsonl", downloads + upload_items(images))
    state = tmp_path / "plan.jsonl.state.json"
    env = {**os.environ, **account.env}
    # slow enough that the kill lands with items done, running and not started
    account.faults.delay(0.15, count=0, match="/drives/upload/")
    account.faults.delay(0.04, count=0, match="/chunk/")
    with subprocess.Popen(batch_command(account, plan), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as first:
        deadline = time.monotonic() + 60
        while len(done_in_state(state)) < 4:
            assert first.poll() is None, "the batch ended before the kill"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
    account.faults.clear()
    # A body the killed process had handed to the kernel may still land: let it.
    time.sleep(0.5)
    finished = done_in_state(state)
    assert 4 <= len(finished) < 14
    kept = {key: os.stat(v["output"]) for key, v in finished.items() if v["op"] == "download"}
    assert kept, "the downloads were done before the kill"
    interrupted = any((tmp_path / "plan.jsonl.state.json.journals").glob("*.upload.json"))
    sizes, chunked = count_store_calls(account)
    report_file = tmp_path / "report.json"
    again = subprocess.run(batch_command(account, plan, "--report", str(report_file)),
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    report = json.loads(report_file.read_text())
    by_key = {item["key"]: item for item in report["items"]}
    assert report["ok"] and len(by_key) == 14
    assert {k for k, v in by_key.items() if v["status"] == "skipped"} == set(finished)
    done_sizes = {v["size"] for v in finished.values() if v["op"] == "upload"}
    done_drives = {v["uuid"] for v in finished.values() if v["op"] == "upload"}
    assert not done_sizes & set(sizes), "a finished direct upload was sent again"
    assert not done_drives & set(chunked), "a finished chunked upload got chunks again"
    assert len(sizes) == len(set(sizes)), "a direct upload was sent twice in the rerun"
    if interrupted:  # a chunked upload was cut: it continued from its journal
        assert any(by_key[k]["resumed"] for k in by_key if k not in finished)
    raws = list(images.values())
    for n in range(12):
        item = by_key[f"up{n}"]
        assert item["xxh128"] == xxh(raws[n])
        assert drive_holds(account, item["uuid"], raws[n])
    for key, before in kept.items():  # finished downloads were neither fetched nor rewritten
        after = os.stat(by_key[key]["output"])
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "skipped" in again.stdout and "up0" in again.stdout  # the table


def test_a_failing_item_is_reported_and_the_others_succeed(
    account: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 3)
    bad = tmp_path / "images" / "broken.qcow2"
    bad.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + b"\xff" * 4096)
    items = [*upload_items(images),
             {"op": "upload", "image": "images/broken.qcow2", "key": "broken"},
             {"op": "download", "drive": "00000000-0000-4000-8000-000000000000",
              "output": "out/none.raw", "key": "nodrive"}]
    plan = write_plan(tmp_path / "plan.jsonl", items)
    report_file = tmp_path / "report.json"
    env = {**os.environ, **account.env}
    for attempt in range(2):  # it keeps failing, the others stay done
        run = subprocess.run(batch_command(account, plan, "--report", str(report_file),
                                           "--progress", "json"),
                             env=env, capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 1, run.stderr
        report = json.loads(report_file.read_text())
        status = {item["key"]: item["status"] for item in report["items"]}
        ok = "done" if attempt == 0 else "skipped"
        assert status == {"up0": ok, "up1": ok, "up2": ok, "broken": "failed",
                          "nodrive": "failed"}
        errors = {item["key"]: item["error"] for item in report["items"]}
        assert "broken.qcow2" in errors["broken"] and "\n" not in errors["broken"]
        assert "404" in errors["nodrive"] or "not found" in errors["nodrive"].lower()
        assert "Traceback" not in run.stderr
        events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
        for event in events:
            jsonschema.validate(event, SCHEMA)
        assert {e["key"] for e in events if e["event"] == "failed"} == {"broken", "nodrive"}
        assert events[-1]["event"] == "batch" and events[-1]["counts"]["failed"] == 2
        assert "2 of 5 items did not finish" in run.stderr.splitlines()[-1]
        assert account.password not in run.stderr + run.stdout + report_file.read_text()


def test_a_refused_upload_is_tried_again_in_the_same_run(
    account: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 1)
    plan = write_plan(tmp_path / "plan.jsonl", upload_items(images))
    # a 500 to the POST: the upload itself does not repeat it (the server may have acted)
    account.faults.fail_next(1, status=500, match="/drives/upload/")
    report = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account),
                             retries=1)
    assert report.ok and report.results[0].attempts == 2


def test_the_plan_is_checked_line_by_line(tmp_path: Path) -> None:
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"op": "upload", "image": "a.raw"}\n# comment\n\n'
                    '{"op": "download", "drive": "x", "output": "o"}\n')
    with pytest.raises(drivepipe.UsageError, match="line 4: drive must be a drive UUID"):
        load_plan(str(plan))
    plan.write_text('{"op": "upload", "image": "a.raw", "key": "k"}\n'
                    '{"op": "upload", "image": "b.raw", "key": "k"}\n')
    with pytest.raises(drivepipe.UsageError, match="already used on line 1"):
        load_plan(str(plan))
    plan.write_text('{"op": "upload", "image": "a.raw", "sise": 1}\n')
    with pytest.raises(drivepipe.UsageError, match="unknown field"):
        load_plan(str(plan))
    plan.write_text('{"op": "upload", "image": "a.raw"}\n{"op": "upload", "image": "a.raw", '
                    '"name": "other"}\n')
    first, second = load_plan(str(plan)).items
    assert first.key != second.key and first.source == str(tmp_path / "a.raw")
    assert load_plan(str(plan)).items[0].key == first.key  # stable across reads


def test_the_connection_budget_is_shared() -> None:
    budget = ConnectionBudget(8, jobs=4)
    assert budget.acquire(None, unfinished=10) == 2
    assert budget.acquire(1, unfinished=10) == 1
    assert budget.acquire(None, unfinished=2) == 4  # the tail gets what others gave back
    assert budget.acquire(None, unfinished=1) == 1  # never more than is free
    assert budget.free == 0


def test_ctrl_c_finishes_the_running_items_and_reports_the_rest(
    account: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 8)
    plan = write_plan(tmp_path / "plan.jsonl", upload_items(images))
    state = tmp_path / "plan.jsonl.state.json"
    report_file = tmp_path / "report.json"
    account.faults.delay(0.3, count=0, match="/drives/upload/")
    with subprocess.Popen(batch_command(account, plan, "--report", str(report_file)),
                          env={**os.environ, **account.env}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as run:
        deadline = time.monotonic() + 60
        while not done_in_state(state):
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "rerun the same command to continue" in err.splitlines()[-1]
    report = json.loads(report_file.read_text())
    statuses = [item["status"] for item in report["items"]]
    assert report["interrupted"] and not report["ok"]
    assert "not-run" in statuses and "failed" not in statuses
    assert set(done_in_state(state)) == {i["key"] for i in report["items"]
                                         if i["status"] == "done"}
    account.faults.clear()
    again = drivepipe.batch(str(plan), jobs=2, settings=settings_for(account))
    assert again.ok and again.counts["skipped"] == statuses.count("done")


def test_one_batch_at_a_time_per_state_file(account: RunningServer, tmp_path: Path) -> None:
    images = build_images(tmp_path / "images", 1)
    plan = write_plan(tmp_path / "plan.jsonl", upload_items(images))
    with drivepipe.jobs.StateFile(str(plan) + ".state.json"), \
            pytest.raises(drivepipe.UsageError, match="another drivepipe batch is running"):
        drivepipe.batch(str(plan), jobs=1, settings=settings_for(account))


def test_a_failed_check_keeps_the_record_of_a_finished_item(
    account: RunningServer, tmp_path: Path
) -> None:
    images = build_images(tmp_path / "images", 1)
    plan = write_plan(tmp_path / "plan.jsonl", upload_items(images))
    first = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account))
    uuid = first.results[0].uuid
    account.faults.fail_next(0, status=403, match=f"/drives/{uuid}/")  # the check fails
    second = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account))
    account.faults.clear()
    assert second.results[0].status == "failed" and "403" in (second.results[0].error or "")
    record = json.loads((tmp_path / "plan.jsonl.state.json").read_text())["items"]["up0"]
    assert record["status"] == "done" and record["uuid"] == uuid and record["last_error"]
    third = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account))
    assert third.counts == {"skipped": 1} and third.results[0].uuid == uuid


def test_a_download_cut_off_resumes_from_its_part_file_in_the_next_run(
    account: RunningServer, tmp_path: Path, put_drive: Callable[[RunningServer, bytes], str]
) -> None:
    data = os.urandom(2 << 20)
    uuid = put_drive(account, data)
    plan = write_plan(tmp_path / "plan.jsonl", [
        {"op": "download", "drive": uuid, "output": "disk.raw", "key": "dl"}])
    journal = tmp_path / "disk.raw.part.journal"
    settings = settings_for(account, range_size=64 * KiB, block_size=64 * KiB,
                            connections=2, retries=1, retry_delay=0.01)
    # journal saved every second, behind the stream: the run must last a few seconds
    account.faults.delay(0.25, count=0, match="download")

    def cut_when_some_blocks_are_in() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if len(json.loads(journal.read_text())["blocks"]) >= 4:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.005)
        account.faults.add(kind="drop_download", count=0, after=0)

    cutter = threading.Thread(target=cut_when_some_blocks_are_in)
    cutter.start()
    first = drivepipe.batch(str(plan), jobs=1, settings=settings, retries=0)
    cutter.join()
    account.faults.clear()
    assert first.results[0].status == "failed", first.results[0]
    assert journal.exists() and not (tmp_path / "disk.raw").exists()
    second = drivepipe.batch(str(plan), jobs=1, settings=settings)
    result = second.results[0]
    assert result.status == "done" and result.resumed
    assert 0 < result.bytes < len(data)  # only the blocks the first run lacked
    assert (tmp_path / "disk.raw").read_bytes()[:len(data)] == data
    assert not journal.exists()


def test_the_rate_budget_caps_the_whole_batch(
    account: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = [tmp_path / f"r{n}.raw" for n in range(6)]
    for raw in raws:
        raw.write_bytes(os.urandom(256 * KiB))
    plan = write_plan(tmp_path / "plan.jsonl", [
        {"op": "upload", "image": str(raw), "key": f"r{n}", "chunked": n % 2 == 1}
        for n, raw in enumerate(raws)])
    running: dict[str, int] = {}
    peaks: list[int] = []
    caps: list[int] = []
    lock = threading.Lock()
    real_capped, real_attempt = transfer.capped, local.attempt_item

    def watch_caps(access: Access, item: Item, settings: Settings) -> Access:
        capped = real_capped(access, item, settings)
        caps.append(capped.tls.limit_rate * (settings.connections if item.chunked else 1))
        return capped

    def watch_items(task: Any, settings: Settings, *args: Any) -> Any:
        with lock:
            running[task.item.key] = settings.limit_rate
            peaks.append(sum(running.values()))
        try:
            return real_attempt(task, settings, *args)
        finally:
            with lock:
                del running[task.item.key]

    monkeypatch.setattr(transfer, "capped", watch_caps)
    monkeypatch.setattr(local, "attempt_item", watch_items)
    report = drivepipe.batch(str(plan), jobs=4, limit_rate=4 << 20,
                             settings=settings_for(account))
    assert report.ok
    assert max(peaks) <= 4 << 20 and len(caps) == 6
    # each item's connections together get its share: a quarter while four run
    assert all(0 < cap <= 1 << 20 for cap in caps), caps


def test_a_download_by_url_on_the_endpoint_is_verified_like_one_by_uuid(
    account: RunningServer, tmp_path: Path, put_drive: Callable[[RunningServer, bytes], str]
) -> None:
    images = build_images(tmp_path / "images", 1)
    plan = write_plan(tmp_path / "up.jsonl", upload_items(images))
    uuid = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account)).results[0].uuid
    raw = next(iter(images.values())).read_bytes()
    url = f"{account.base_url}drives/{uuid}/download/"
    plan = write_plan(tmp_path / "down.jsonl", [
        {"op": "download", "url": url, "output": "by-url.raw", "key": "u"}])
    report = drivepipe.batch(str(plan), jobs=1, settings=settings_for(account))
    assert report.ok, report.results[0].error
    assert (tmp_path / "by-url.raw").read_bytes()[:len(raw)] == raw
    assert not any("no checksum" in note for note in report.results[0].notes)
    for bad, words in ((f"http://user:pw@{url.split('//')[1]}", "user or password"),
                       ("ftp://host/x", "http(s) URL")):
        write_plan(tmp_path / "bad.jsonl", [{"op": "download", "url": bad, "output": "x"}])
        with pytest.raises(drivepipe.UsageError, match=re.escape(words)):
            load_plan(str(tmp_path / "bad.jsonl"))

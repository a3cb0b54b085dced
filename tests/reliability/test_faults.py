"""Fault injection against the real local drive store, through the real CLI.

Faults (the store's fault injection, or the store itself restarted): connections
dropped at random offsets, 503 bursts, a 401 in the middle of a chunked upload
(the store's password changed), a slow server, a download cut short, the store
restarted mid-transfer; for the direct upload, the chunked upload and the
download.  Each run ends one of two ways:

- it completes, and the result is checked byte for byte (the drive holds the
  image then zeros; the downloaded file is the drive);
- it fails with exactly one ``drivepipe: error:`` line, and leaves nothing
  under a final name: no drive reported done (``unmounted``) by a failed upload,
  no output file from a failed download (only its ``.part``).

Operations that can resume (chunked upload, download) must complete, within the
run or by rerunning the same command.  Every outcome is recorded in the fault
table before it is asserted (``conftest.py`` prints the table).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from rel_support import Cli, CuttingProxy, FaultTable, MiB, drive_holds, make_image, one_error_line
from store_servers import Trigger, when_upload_arrives

from drivepipe.server import RunningServer

DONE = "unmounted"
pytestmark = pytest.mark.timeout(60)


# --- helpers -------------------------------------------------------------------------------


def done_drives(store: RunningServer) -> set[str]:
    return {rec.uuid for rec in store.store.list() if rec.status == DONE}


def upload_args(store: RunningServer, image: Path, *extra: str) -> list[str]:
    return ["upload", str(image), "--endpoint", store.base_url, "--progress", "none", *extra]


CHUNKED = ("--chunked", "--chunk-size", "512K", "--connections", "2")


class UploadCheck:
    """Judges one upload run: verified drive, or one error line and no drive done."""

    def __init__(self, store: RunningServer, image: Path) -> None:
        self.store = store
        self.image = image
        self.before = done_drives(store)

    def judge(self, code: int, out: str, err: str) -> tuple[bool, str, int]:
        """(survived, how, data_lost) of a run."""
        new = done_drives(self.store) - self.before
        if code == 0:
            uuid = out.strip()
            ok = new == {uuid} and drive_holds(self.store, uuid, self.image)
            return ok, "completed, verified", 0 if ok else 1
        clean = one_error_line(err) and out.strip() == ""
        # a drive the store reports done must hold the image; a complete one whose UUID
        # never reached the client (its answer was lost) is an orphan, not lost data
        lost = sum(not drive_holds(self.store, uuid, self.image) for uuid in new)
        how = "failed in one line" + (", complete orphan drive kept" if new else "")
        return clean and not lost, how, lost


def chunks_received(store: RunningServer) -> int:
    return max((len(rec.received) for rec in store.store.list()), default=0)


def _upload_fault(
    scenario: str, store: RunningServer, cli: Cli, image: Path, fault_table: FaultTable,
    *extra: str, complete: bool, during: Trigger | None = None,
) -> tuple[int, str, str]:
    """One upload run under the faults set up: judged, recorded, then asserted (survived,
    no data lost; with ``complete``, it completed); ``during`` must have fired."""
    check = UploadCheck(store, image)
    code, out, err = cli(*upload_args(store, image, *extra), env=store.env)
    if during is not None:
        assert during.join(), during.what
    survived, how, lost = check.judge(code, out, err)
    operation = "chunked upload" if "--chunked" in extra else "direct upload"
    fault_table.record(scenario, operation, survived=survived and (code == 0 or not complete),
                       how=how, data_lost=lost)
    assert survived and lost == 0, err
    assert code == 0 or not complete, err
    return code, out, err


# --- direct upload: one POST, nothing to resume -> completes or fails in one line -----------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_direct_upload_dropped_at_a_random_offset(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable, seed: int,
) -> None:
    image = make_image(tmp_path / "disk.raw", 6 * MiB, seed)
    offset = random.Random(seed).randrange(1, 6 * MiB)
    store.faults.drop_upload_after(offset, match="/drives/upload")
    code, _, _ = _upload_fault("connection dropped at a random offset", store, cli, image,
                               fault_table, complete=False)
    assert code != 0, "the drop must have happened"
    # the next attempt works: the failed one left nothing in the way
    code, out, err = cli(*upload_args(store, image), env=store.env)
    assert code == 0 and drive_holds(store, out.strip(), image), err


def test_direct_upload_503_burst(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    image = make_image(tmp_path / "disk.raw", 24 * MiB, 4)  # more than socket buffers hold
    store.faults.fail_next(3, match="/drives/upload")
    store.faults.fail_next(2, method="PUT")  # the meta update after the upload
    code, _, err = _upload_fault("503 burst", store, cli, image, fault_table, complete=False)
    assert code == 0 or "HTTP 503" in err, "the store's answer reached the user"


def test_direct_upload_slow_server(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 5)
    store.faults.delay(1.5, match="/drives/upload")
    _upload_fault("slow server (1.5 s before answering)", store, cli, image, fault_table,
                  complete=True)


def test_direct_upload_store_restarted_mid_transfer(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    image = make_image(tmp_path / "disk.raw", 16 * MiB, 6)
    # The store sits on the request (headers in, body flowing into the socket buffers)
    # long enough for the restart to cut it.
    restarter = when_upload_arrives(store, store.restart, "the store was restarted mid-transfer")
    code, _, _ = _upload_fault("store restarted mid-transfer", store, cli, image, fault_table,
                               complete=False, during=restarter)
    assert code != 0, "the restart cut the upload"


# --- answers cut by a proxy: the request was done, the client never heard --------------------


@pytest.fixture
def proxy(store: RunningServer) -> Iterator[CuttingProxy]:
    parts = urlsplit(store.base_url)
    cutter = CuttingProxy((parts.hostname or "127.0.0.1", parts.port or 80))
    yield cutter
    cutter.stop()


def via(proxy: CuttingProxy) -> str:
    return f"http://127.0.0.1:{proxy.port}/api/2.0/"


def test_direct_upload_answer_lost_after_the_body(
    store: RunningServer, proxy: CuttingProxy, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """The store took the whole body, then the connection died before the UUID came back:
    the upload cannot know it worked, so it fails; the drive is complete, not half-done."""
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 7)
    proxy.cut(b"POST /api/2.0/drives/upload")
    code, _, _ = _upload_fault("answer lost after the request was done", store, cli, image,
                               fault_table, "--endpoint", via(proxy), complete=False)
    assert proxy.cuts == 1 and code != 0


def test_chunked_upload_answers_cut(
    store: RunningServer, proxy: CuttingProxy, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """Link answers, chunk answers (the chunk landed) and the final status check cut
    part-way: each is asked again (a chunk that landed answers 416 and is skipped)."""
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 16)
    proxy.cut(b"do=upload_chunk", after=20, count=2)
    proxy.cut(b"/chunk/", after=0, count=2)
    proxy.cut(b"GET /api/2.0/drives/", after=30, count=1)
    _upload_fault("answer lost after the request was done", store, cli, image, fault_table,
                  *CHUNKED, "--endpoint", via(proxy), complete=True)
    assert proxy.cuts == 5


def test_chunked_upload_initupload_answer_lost(
    store: RunningServer, proxy: CuttingProxy, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """The drive was created but its UUID never arrived: one line; nothing reported done."""
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 17)
    proxy.cut(b"POST /api/2.0/initupload", after=10)
    code, _, err = _upload_fault("create answer lost (initupload)", store, cli, image,
                                 fault_table, *CHUNKED, "--endpoint", via(proxy),
                                 complete=False)
    assert code != 0, err
    assert [r.status for r in store.store.list()] == ["uploading"]


# --- chunked upload: retried per chunk, resumable across runs ---------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_chunked_upload_dropped_at_random_offsets(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable, seed: int,
) -> None:
    image = make_image(tmp_path / "disk.raw", 4 * MiB, seed + 10)
    rng = random.Random(seed)
    for _ in range(3):
        store.faults.drop_upload_after(rng.randrange(1, 512 << 10), match="/chunk/")
    _upload_fault("connection dropped at a random offset", store, cli, image, fault_table,
                  *CHUNKED, complete=True)
    assert store.faults.snapshot() == [], "every drop happened"


@pytest.mark.parametrize(("scenario", "size", "seed", "faults"), [
    ("503 burst", 3 * MiB, 12, [("fail_next", 3, "initupload"),
                                ("fail_next", 3, "do=upload_chunk"),
                                ("fail_next", 3, "/chunk/")]),
    ("slow server (0.5 s answers)", 2 * MiB, 13, [("delay", 3, "/chunk/"),
                                                  ("delay", 1, "do=upload_chunk")]),
], ids=["503-bursts", "slow-server"])
def test_chunked_upload_completes_despite(
    store: RunningServer, cli: Cli, tmp_path: Path, fault_table: FaultTable,
    scenario: str, size: int, seed: int, faults: list[tuple[str, int, str]],
) -> None:
    image = make_image(tmp_path / "disk.raw", size, seed)
    for kind, count, match in faults:
        if kind == "delay":
            store.faults.delay(0.5, count=count, match=match)
        else:
            store.faults.fail_next(count, match=match)
    _upload_fault(scenario, store, cli, image, fault_table, *CHUNKED, complete=True)


def test_chunked_upload_store_restarted_mid_transfer(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    image = make_image(tmp_path / "disk.raw", 4 * MiB, 14)
    store.faults.delay(0.05, count=0, match="/chunk/")  # slow enough to restart mid-way
    restarter = Trigger(lambda: chunks_received(store) >= 2, store.restart,
                        "the store was restarted mid-transfer")
    _upload_fault("store restarted mid-transfer", store, cli, image, fault_table, *CHUNKED,
                  complete=True, during=restarter)


def test_chunked_upload_401_midway_then_resume(
    store: RunningServer, cli: Cli, tmp_path: Path,
    fault_table: FaultTable,
) -> None:
    """The store's password changes mid-upload: one line, drive still uploading; a rerun
    with the new password resumes and completes."""
    image = make_image(tmp_path / "disk.raw", 4 * MiB, 15)
    new_password = "changed-" + store.password
    store.faults.delay(0.05, count=0, match="/chunk/")

    def change_password() -> None:
        store.config.password = new_password

    changer = Trigger(lambda: chunks_received(store) >= 2, change_password,
                      "the password changed mid-upload")
    check = UploadCheck(store, image)
    code, out, err = cli(*upload_args(store, image, *CHUNKED), env=store.env)
    assert changer.join(), changer.what
    survived, how, lost = check.judge(code, out, err)
    drives = store.store.list()
    half_done = [r for r in drives if r.status != DONE]
    survived = survived and code != 0 and "401" in err and len(half_done) == 1
    assert store.password not in err
    # rerun the same command with the new password: it resumes into the same drive
    store.faults.clear()
    env = {**store.env, "CLOUDSIGMA_PASSWORD": new_password}
    code2, out2, err2 = cli(*upload_args(store, image, *CHUNKED), env=env)
    resumed = code2 == 0 and half_done and out2.strip() == half_done[0].uuid
    ok = bool(resumed) and drive_holds(store, out2.strip(), image)
    fault_table.record("401 mid-upload (password changed)", "chunked upload",
                       survived=survived and ok, how=f"{how}, rerun resumed",
                       data_lost=lost + (0 if ok or code2 != 0 else 1))
    assert survived and lost == 0, err
    assert ok, (code2, out2, err2)


# --- download: ranged, retried, resumable across runs, verified before it is named -----------


@pytest.fixture
def uploaded(
    store: RunningServer, cli: Cli, tmp_path: Path
) -> tuple[str, Path]:
    """A drive uploaded by the CLI (its meta holds the digest the download verifies)."""
    image = make_image(tmp_path / "src.raw", 8 * MiB, 20, pieces=12)
    code, out, err = cli(*upload_args(store, image), env=store.env)
    assert code == 0, err
    return out.strip(), image


def download_args(store: RunningServer, uuid: str, target: Path, *extra: str) -> list[str]:
    return ["download", uuid, "-o", str(target), "--endpoint", store.base_url,
            "--progress", "none", "--range-size", "1M", "--block-size", "1M",
            "--retry-delay", "0.05", *extra]


def judge_download(
    code: int, out: str, err: str, target: Path, image: Path, drive_size: int
) -> tuple[bool, str, int]:
    if target.exists():
        want = image.read_bytes()
        data = target.read_bytes()
        ok = data[: len(want)] == want and data[len(want):].count(0) == drive_size - len(want)
        ok = ok and len(data) == drive_size
        return ok and code == 0, "completed, verified", 0 if ok else 1
    return one_error_line(err) and code != 0, "failed in one line", 0


def _download_fault(
    scenario: str, store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable, *extra: str,
) -> None:
    uuid, image = uploaded
    target = tmp_path / "out.raw"
    code, out, err = cli(*download_args(store, uuid, target, *extra), env=store.env)
    survived, how, lost = judge_download(code, out, err, target, image,
                                         store.store.get(uuid).size)
    fault_table.record(scenario, "download", survived=survived and code == 0,
                       how=how, data_lost=lost)
    assert code == 0 and survived and lost == 0, err


@pytest.mark.parametrize("seed", [1, 2])
def test_download_dropped_at_random_offsets(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable, seed: int,
) -> None:
    rng = random.Random(seed)
    for _ in range(3):
        store.faults.drop_download_after(rng.randrange(1, MiB), match="/direct/")
    _download_fault("connection dropped at a random offset", store, cli, uploaded, tmp_path,
                    fault_table)


def test_download_503_burst(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    store.faults.fail_next(2, method="GET", match="/drives/")  # the drive's meta, the redirect
    store.faults.fail_next(3, match="/direct/")
    _download_fault("503 burst", store, cli, uploaded, tmp_path, fault_table)


def test_download_answers_cut(
    store: RunningServer, proxy: CuttingProxy, cli: Cli, uploaded: tuple[str, Path],
    tmp_path: Path, fault_table: FaultTable,
) -> None:
    uuid, _ = uploaded
    proxy.cut(f"GET /api/2.0/drives/{uuid}/ ".encode(), after=40, count=2)  # the meta
    proxy.cut(b"/download/ HTTP", after=10, count=1)  # the redirect
    _download_fault("answer lost after the request was done", store, cli, uploaded, tmp_path,
                    fault_table, "--endpoint", via(proxy))
    assert proxy.cuts == 3


def test_download_slow_server(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    store.faults.delay(0.5, count=3, match="/direct/")
    _download_fault("slow server (0.5 s answers)", store, cli, uploaded, tmp_path, fault_table)


def test_download_cut_short_within_a_run(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    rng = random.Random(3)
    for _ in range(3):
        store.faults.cut_download_after(rng.randrange(0, MiB), match="/direct/")
    _download_fault("download cut short", store, cli, uploaded, tmp_path, fault_table)


def test_download_store_restarted_mid_transfer(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    store.faults.delay(0.1, count=0, match="/direct/")
    part = tmp_path / "out.raw.part"  # made once the probe is done: the ranges follow
    restarter = Trigger(part.exists, store.restart)
    _download_fault("store restarted mid-transfer", store, cli, uploaded, tmp_path,
                    fault_table, "--connections", "1")
    assert restarter.join(), "the store was restarted mid-transfer"


def test_download_cut_every_time_fails_then_resumes(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    """A link that always breaks: the run gives up in one line with no final file; the
    rerun (fault gone) resumes from the journal and names the file only once verified."""
    uuid, image = uploaded
    target = tmp_path / "out.raw"
    # the first blocks arrive, then every answer is cut after 200 KiB
    store.faults.add(kind="cut_download", after=200 << 10, count=0, match="/direct/")
    args = download_args(store, uuid, target, "--retries", "2", "--connections", "1")
    code, _out, err = cli(*args, env=store.env)
    failed_clean = code != 0 and one_error_line(err) and not target.exists()
    part_kept = Path(f"{target}.part").exists()
    store.faults.clear()
    code2, out2, err2 = cli(*args, env=store.env)
    survived, _how, lost = judge_download(code2, out2, err2, target, image,
                                         store.store.get(uuid).size)
    fault_table.record("download cut short on every try", "download",
                       survived=failed_clean and survived,
                       how="failed in one line, rerun resumed", data_lost=lost)
    assert failed_clean and part_kept, err
    assert code2 == 0 and survived and lost == 0, err2


def test_download_of_a_drive_damaged_in_the_store_is_not_named(
    store: RunningServer, cli: Cli,
    uploaded: tuple[str, Path], tmp_path: Path, fault_table: FaultTable,
) -> None:
    uuid, _ = uploaded
    with open(store.store.raw_path(uuid), "r+b") as f:
        f.seek(5 * MiB + 123)
        byte = f.read(1)
        f.seek(5 * MiB + 123)
        f.write(bytes([byte[0] ^ 0x40]))
    target = tmp_path / "out.raw"
    code, _out, err = cli(*download_args(store, uuid, target), env=store.env)
    survived = code == 7 and one_error_line(err) and not target.exists()
    fault_table.record("bit flipped in the stored drive", "download",
                       survived=survived, how="refused in one line (verify)",
                       data_lost=int(target.exists()))
    assert survived, err

"""Chunked uploads against the real local drive store, in-process (real pycurl, real HTTP).

Round trips (raw: random access; gzip: stream only) with 1, 2 and 4 connections,
faults survived (503 bursts, dropped connections, expired links, a store restart),
resumes from the journal and from a UUID alone (the server's 416 answers), and
refusals (changed image, wrong drive size, wrong password).
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from fixtures.make_fixtures import disk_image, stream_image

from drivepipe._errors import AuthError, DrivepipeError, TransferError
from drivepipe._registry import formats, open_image
from drivepipe._stage import OpenOptions
from drivepipe._stats import RunStats
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.upload import UploadOptions
from drivepipe.jobs.upload import UploadResult
from drivepipe.jobs.upload import upload as upload_job
from drivepipe.resume.upload_journal import ImageIdentity, UploadJournal, default_journal_path
from drivepipe.server import RunningServer
from drivepipe.server._handler import StoreHandler
from drivepipe.transport.curl import TlsOptions
from drivepipe.transport.retry import RetryPolicy
from drivepipe_plugins.targets.drive_chunked import ChunkPlan, ResumeRefused

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "formats"
KiB = 1 << 10
MiB = 1 << 20
CHUNK = 256 * KiB


@pytest.fixture(autouse=True)
def _cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journals go under the test's own directory, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def connect(srv: RunningServer, password: str | None = None) -> Connection:
    ep = Endpoint(srv.base_url, srv.base_url)
    creds = Credentials(srv.username, password or srv.password)
    tls = TlsOptions()
    return Connection(ep, creds, tls, ApiClient(ep, creds, tls))


def make_image(path: Path, size: int, seed: int = 1) -> Path:
    """A sparse raw image: random data runs, holes, and a run of written zeros."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(6):
            n = rng.randint(1, 300 * KiB)
            f.seek(rng.randrange(0, size - n))
            f.write(rng.randbytes(n))
        f.seek(size - 1)
        f.write(b"\x01")  # the remainder chunk carries data up to its last byte
        f.seek(size // 3)
        f.write(bytes(200 * KiB))
    return path


def xxh128_of(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def assert_drive_holds(srv: RunningServer, uuid: str, image: Path) -> None:
    """The drive's first bytes are the image; the rest (growth to min size) zeros."""
    size = image.stat().st_size
    rec = srv.store.get(uuid)
    assert rec.status == "unmounted"
    with open(srv.store.raw_path(uuid), "rb") as drive, open(image, "rb") as src:
        for pos in range(0, size, MiB):
            assert drive.read(min(MiB, size - pos)) == src.read(MiB), f"differs near {pos}"
        assert drive.read().count(0) == rec.size - size


def upload(
    srv: RunningServer, path: Path, *, fmt: str | None = None, conn: Connection | None = None,
    retries: int = 8, backoff_base: float = 0.01, backoff_cap: float = 0.2,
    read_size: int = 4 * MiB, **opts: Any,
) -> tuple[UploadResult, RunStats]:
    """The library's chunked upload (meta off), with quick retries."""
    opts.setdefault("chunk_size", CHUNK)
    options = UploadOptions(chunked=True, meta=False, name=path.name,
                            policy=RetryPolicy(retries, backoff_base, backoff_cap), **opts)
    image = open_image(str(path), fmt, OpenOptions(read_size=read_size))
    stats = RunStats("chunked")
    connection = conn or connect(srv)
    try:
        return upload_job(image, connection=connection, options=options, stats=stats), stats
    finally:
        connection.close()


class ChunkCounter:
    """Counts chunk bodies the store accepts to receive, by chunk number (server side)."""

    def __init__(self, srv: RunningServer) -> None:
        self.numbers: list[int] = []
        store = srv.store
        original = store.begin_chunk

        def counting(uuid: str, number: int, chunk_size: int) -> Any:
            writer = original(uuid, number, chunk_size)  # raises when refused (busy, 416)
            self.numbers.append(number)
            return writer

        # a counting wrapper around the store's real method, so the server side counts
        store.begin_chunk = counting  # type: ignore[method-assign]


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 2, 4])
def test_raw_round_trip(drive_store: RunningServer, tmp_path: Path, connections: int) -> None:
    image = make_image(tmp_path / "disk.raw", 3 * MiB + 12345, seed=connections)
    result, stats = upload(drive_store, image, connections=connections)
    assert result.xxh128 == xxh128_of(image)
    assert result.size == image.stat().st_size
    assert result.sent_bytes == result.size and result.skipped_chunks == 0
    assert result.chunks == ChunkPlan(result.size, CHUNK).count == 12
    assert_drive_holds(drive_store, result.uuid, image)
    rec = drive_store.store.get(result.uuid)
    assert rec.name == "disk.raw" and rec.chunk_size == CHUNK
    send = stats.stages[-1]
    assert send.extra["chunks_done"] == 12 and send.extra["in_flight"] == 0
    assert not Path(result.journal_path).exists(), "a finished upload leaves no journal"


@pytest.mark.skipif("gzip" not in formats(), reason="gzip decoder not registered")
@pytest.mark.parametrize("connections", [1, 2, 4])
def test_gzip_round_trip(drive_store: RunningServer, tmp_path: Path, connections: int) -> None:
    raw = make_image(tmp_path / "disk.raw", 2 * MiB + 777, seed=10 + connections)
    packed = tmp_path / "disk.raw.gz"
    with open(raw, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst)
    result, stats = upload(drive_store, packed, connections=connections)
    assert open_image(str(packed)).random_access is None, "gzip must take the stream path"
    assert result.xxh128 == xxh128_of(raw)
    assert_drive_holds(drive_store, result.uuid, raw)
    assert [s.name for s in stats.stages][-2:] == ["xxh3", "send"]


@pytest.mark.parametrize(("fixture", "fmt", "random_access"), [
    ("zlib.qcow2", "qcow2", True), ("extl2.qcow2", "qcow2", True),
    ("multi.zst", "zstd", False), ("multi.xz", "xz", False), ("multi.bz2", "bzip2", False),
])
def test_decoded_formats_round_trip(
    drive_store: RunningServer, tmp_path: Path, fixture: str, fmt: str, random_access: bool
) -> None:
    if fmt not in formats():
        pytest.skip(f"{fmt} decoder not registered")
    raw = tmp_path / "expected.raw"
    raw.write_bytes(disk_image() if random_access else stream_image())
    image = tmp_path / fixture
    shutil.copyfile(FIXTURES / fixture, image)
    assert (open_image(str(image)).random_access is not None) == random_access
    result, _ = upload(drive_store, image, connections=2, chunk_size=128 * KiB)
    assert result.xxh128 == xxh128_of(raw)
    assert_drive_holds(drive_store, result.uuid, raw)


def test_image_smaller_than_a_chunk_is_one_chunk(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "small.raw", 1 * MiB + 3, seed=3)
    result, _ = upload(drive_store, image, chunk_size=8 * MiB)
    assert result.chunks == 1
    assert_drive_holds(drive_store, result.uuid, image)


def test_all_zero_image_is_sent_from_the_zero_buffer(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "empty-disk.raw"
    with open(image, "wb") as f:
        f.truncate(2 * MiB)
    result, stats = upload(drive_store, image)
    assert result.sent_bytes == 2 * MiB
    assert stats.stages[-1].hole_bytes == 2 * MiB
    assert result.xxh128 == xxh128_of(image)
    assert_drive_holds(drive_store, result.uuid, image)


def test_memory_holds_connections_plus_one_chunks(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "dense.raw"
    image.write_bytes(random.Random(13).randbytes(40 * MiB))
    tracemalloc.start()
    try:
        result, _ = upload(drive_store, image, connections=2, chunk_size=2 * MiB,
                           read_size=MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.xxh128 == xxh128_of(image)
    # 3 chunks of 2 MiB, 2 reads of 1 MiB queued before the sink, one being read, plus
    # the store's own receive buffers in this process
    assert peak < 20 * MiB, f"peak {peak / MiB:.1f} MiB for a 40 MiB image"
    assert UploadOptions(connections=4, chunk_size=1 << 30).chunks_in_memory(1 << 30) == 2
    assert UploadOptions(connections=4).chunks_in_memory(32 * MiB) == 5
    # 256 MiB of chunk data at most: 64 MiB chunks leave one connection waiting
    assert UploadOptions(connections=4).chunks_in_memory(64 * MiB) == 4


def test_chunk_bodies_go_without_credentials(
    drive_store: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link is a capability: the password goes only with the API requests."""
    seen: list[str | None] = []
    original = StoreHandler.chunk_body

    def recording(handler: StoreHandler, uuid: str, number: str) -> None:
        seen.append(handler.headers.get("Authorization"))
        original(handler, uuid, number)

    monkeypatch.setattr(StoreHandler, "chunk_body", recording)
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=15)
    result, _ = upload(drive_store, image, connections=2)
    assert seen == [None] * result.chunks


def test_links_asked_ahead_are_one_per_chunk(
    drive_store: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next chunks' links are asked for while bodies send: as many link requests as
    chunks (none wasted), and the bodies still go in order over one connection."""
    links: list[int] = []
    original = StoreHandler.chunk_link

    def counting(handler: StoreHandler, uuid: str, number: int, size: int) -> str:
        links.append(number)
        return original(handler, uuid, number, size)

    monkeypatch.setattr(StoreHandler, "chunk_link", counting)
    counter = ChunkCounter(drive_store)
    image = make_image(tmp_path / "disk.raw", 3 * MiB, seed=18)
    result, _ = upload(drive_store, image, connections=1)
    assert sorted(links) == list(range(12)) == counter.numbers
    links.clear()
    again = make_image(tmp_path / "again.raw", 3 * MiB, seed=19)
    result, _ = upload(drive_store, again, connections=4)
    assert sorted(links) == list(range(12))
    assert_drive_holds(drive_store, result.uuid, again)


def test_round_trip_over_tls_with_a_private_ca(tls_drive_store: Any, tmp_path: Path) -> None:
    srv, ca_pem = tls_drive_store.server, tls_drive_store.ca_pem
    ep = Endpoint(srv.base_url, srv.base_url)
    creds = Credentials(srv.username, srv.password)
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=16)
    with pytest.raises(TransferError, match="not trusted"):
        upload(srv, image, conn=Connection(ep, creds, TlsOptions(), ApiClient(ep, creds)))
    tls = TlsOptions(cacert=str(ca_pem))
    result, _ = upload(srv, image, conn=Connection(ep, creds, tls, ApiClient(ep, creds, tls)),
                       connections=2)
    assert_drive_holds(srv, result.uuid, image)


# --- faults survived ---------------------------------------------------------------------


def test_503_bursts_are_retried(drive_store: RunningServer, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 2 * MiB, seed=4)
    drive_store.faults.fail_next(3, match="do=upload_chunk")
    drive_store.faults.fail_next(3, match="/chunk/")
    result, stats = upload(drive_store, image, connections=2)
    assert stats.stages[-1].extra["retried"] >= 6
    assert_drive_holds(drive_store, result.uuid, image)


def test_503_on_create_and_drive_reads_are_retried(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=17)
    drive_store.faults.fail_next(2, match="initupload")
    drive_store.faults.fail_next(2, match="/drives/", method="GET")
    result, _ = upload(drive_store, image)
    assert drive_store.faults.snapshot() == []
    assert [r.uuid for r in drive_store.store.list()] == [result.uuid], "one drive created"
    assert_drive_holds(drive_store, result.uuid, image)


def test_dropped_connections_are_retried(drive_store: RunningServer, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 2 * MiB, seed=5)
    drive_store.faults.drop_upload_after(100 * KiB, count=3, match="/chunk/")
    result, _ = upload(drive_store, image, connections=2)
    assert drive_store.faults.snapshot() == [], "every drop happened"
    # libcurl resends some on a fresh connection itself (rewinding the body), the
    # rest are the uploader's retries: either way the dropped bytes went out again.
    assert result.wire_bytes >= result.size + 3 * 100 * KiB
    assert result.sent_bytes == result.size
    assert_drive_holds(drive_store, result.uuid, image)


def test_expired_link_is_requested_again(
    make_drive_store: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Links carry whole expiry seconds: a 2 s link lives 1-2 s, the delay outlasts it.
    srv = make_drive_store(chunk_link_ttl=2)
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=6)
    srv.faults.delay(3.1, count=1, match="/chunk/")
    result, stats = upload(srv, image, connections=1)
    assert stats.stages[-1].extra["links_renewed"] >= 1
    assert_drive_holds(srv, result.uuid, image)


def test_store_restarted_mid_upload(drive_store: RunningServer, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 2 * MiB, seed=7)
    drive_store.faults.delay(0.1, count=0, match="/chunk/")  # slow enough to restart mid-way
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = upload(drive_store, image, connections=2, backoff_base=0.2,
                                       backoff_cap=1.0)[0]
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    assert wait_for(lambda: any(len(r.received) >= 2 for r in drive_store.store.list()))
    drive_store.restart()
    worker.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert_drive_holds(drive_store, result.uuid, image)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# --- resuming ----------------------------------------------------------------------------


@pytest.fixture
def interrupted(drive_store: RunningServer, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An upload that stopped after some chunks: chunk 5 always answers 503, no retries."""
    image = make_image(tmp_path / "disk.raw", 3 * MiB, seed=8)
    drive_store.faults.fail_next(0, match="/chunk/5/")
    with pytest.raises(TransferError, match="run the same upload again to resume") as err:
        upload(drive_store, image, connections=1, retries=0)
    drive_store.faults.clear()
    uuid = str(err.value).rsplit(" ", 1)[-1]
    assert drive_store.store.get(uuid).status == "uploading"
    yield image, uuid


def test_rerun_resumes_from_the_journal(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    before = set(drive_store.store.get(uuid).received)
    assert before == {0, 1, 2, 3, 4}
    counter = ChunkCounter(drive_store)
    result, stats = upload(drive_store, image, connections=2)
    assert result.uuid == uuid and result.resumed
    assert stats.done == result.size, "chunks confirmed earlier count as done"
    assert stats.stages[-1].data_bytes + stats.stages[-1].hole_bytes == result.sent_bytes
    assert_resumed(drive_store, result, image, uuid, counter, sorted(set(range(12)) - before))


def assert_resumed(
    srv: RunningServer, result: UploadResult, image: Path, uuid: str, counter: ChunkCounter,
    sent: list[int],
) -> None:
    """The resumed upload sent exactly the chunks ``sent`` and the drive is the image."""
    assert result.uuid == uuid and result.resumed
    assert sorted(counter.numbers) == sent
    assert result.skipped_chunks == 12 - len(sent)
    assert result.xxh128 == xxh128_of(image)
    assert_drive_holds(srv, uuid, image)


def test_resume_uuid_without_journal_uses_416(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    journal = Path(os.environ["XDG_CACHE_HOME"])
    for path in journal.rglob("*.json"):
        path.unlink()
    counter = ChunkCounter(drive_store)
    result, _ = upload(drive_store, image, connections=2, resume_uuid=uuid.upper())
    assert_resumed(drive_store, result, image, uuid, counter, list(range(5, 12)))


def test_changed_image_refuses_to_resume(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    with open(image, "r+b") as f:
        f.write(b"changed")
    with pytest.raises(ResumeRefused) as err:
        upload(drive_store, image)
    message = err.value.one_line()
    assert "changed since the interrupted upload" in message
    assert f"resume into drive {uuid} explicitly" in message and ".json" in message
    assert drive_store.store.get(uuid).status == "uploading", "nothing was sent"


def test_touched_image_resumes_only_with_explicit_uuid(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    os.utime(image, ns=(1, 1))
    with pytest.raises(ResumeRefused, match="modification time"):
        upload(drive_store, image)
    result, _ = upload(drive_store, image, resume_uuid=uuid)
    assert result.skipped_chunks == 5
    assert_drive_holds(drive_store, uuid, image)


def test_rerun_after_the_last_chunk_landed_sends_nothing(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    """Killed after the last chunk but before the journal went: the drive, grown to the
    store's minimum size, is recognised as this upload's and every chunk answers 416."""
    image = make_image(tmp_path / "small.raw", 700 * KiB, seed=14)
    first, _ = upload(drive_store, image)
    assert drive_store.store.get(first.uuid).size > image.stat().st_size
    UploadJournal(default_journal_path(str(image), drive_store.base_url), first.uuid,
                  drive_store.base_url, ImageIdentity.of(str(image)), image.stat().st_size,
                  CHUNK, {0}).save()
    counter = ChunkCounter(drive_store)
    again, _ = upload(drive_store, image)
    assert again.uuid == first.uuid and again.sent_bytes == 0 and counter.numbers == []
    assert again.skipped_chunks == again.chunks == 2
    assert again.xxh128 == first.xxh128 == xxh128_of(image)


def test_journal_claiming_chunks_the_store_lacks_heals_on_the_next_run(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    (path,) = Path(os.environ["XDG_CACHE_HOME"]).rglob("*.json")
    journal = UploadJournal.load(str(path))
    assert journal is not None
    journal.confirmed = set(range(12))  # a lie: the store holds chunks 0-4 only
    journal.save()
    with pytest.raises(TransferError, match="still 'uploading'"):
        upload(drive_store, image, finish_timeout=0.5)
    counter = ChunkCounter(drive_store)
    result, _ = upload(drive_store, image)
    assert sorted(counter.numbers) == list(range(5, 12)), "416 told what was there"
    assert result.uuid == uuid and result.xxh128 == xxh128_of(image)
    assert_drive_holds(drive_store, uuid, image)


def test_resume_into_a_drive_of_another_size_is_refused(
    drive_store: RunningServer, interrupted: tuple[Path, str], tmp_path: Path
) -> None:
    _, uuid = interrupted
    other = make_image(tmp_path / "other.raw", 2 * MiB, seed=9)
    with pytest.raises(ResumeRefused, match="not this image's upload"):
        upload(drive_store, other, resume_uuid=uuid)


def test_journal_records_drive_and_chunks(
    drive_store: RunningServer, interrupted: tuple[Path, str]
) -> None:
    image, uuid = interrupted
    (path,) = Path(os.environ["XDG_CACHE_HOME"]).rglob("*.json")
    journal = UploadJournal.load(str(path))
    assert journal is not None
    assert journal.uuid == uuid and journal.api == drive_store.base_url
    assert journal.chunk_size == CHUNK and journal.raw_size == image.stat().st_size
    assert journal.confirmed == {0, 1, 2, 3, 4}
    assert journal.image.path == str(image.resolve())


# --- refusals ----------------------------------------------------------------------------


def test_wrong_password_stops_with_one_line(drive_store: RunningServer, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=11)
    with pytest.raises(AuthError) as err:
        upload(drive_store, image, conn=connect(drive_store, password="wrong"))
    assert "401" in err.value.one_line() and "wrong" not in err.value.one_line().split(":")[0]
    assert drive_store.store.list() == []


def test_client_error_on_link_request_stops(drive_store: RunningServer, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 1 * MiB, seed=12)
    drive_store.faults.fail_next(1, status=402, match="do=upload_chunk")
    with pytest.raises(DrivepipeError, match="HTTP 402") as err:
        upload(drive_store, image)
    assert "\n" not in err.value.one_line()

"""The one retry policy is the one in use: the JSON API, a direct upload, a chunk's link and
its body each wait for the store's ``Retry-After`` and succeed; an answer that is not
transient is asked once.

Real pycurl against the real local store; its faults count how often they were met (a
fault of count N that is left with N - 1 was met once).  The policies' own backoff is
made tiny, so any wait of a second comes from ``Retry-After``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from drivepipe._errors import DrivepipeError, HTTPError
from drivepipe._registry import open_image
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.upload import UploadOptions
from drivepipe.jobs.upload import UploadResult, upload
from drivepipe.server import RunningServer
from drivepipe.transport.curl import TlsOptions
from drivepipe.transport.retry import RetryPolicy

MiB = 1 << 20
QUICK = RetryPolicy(retries=3, base=0.01, cap=0.02)
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def connect(srv: RunningServer) -> Connection:
    ep = Endpoint(srv.base_url, srv.base_url)
    creds = Credentials(srv.username, srv.password)
    tls = TlsOptions()
    return Connection(ep, creds, tls, ApiClient(ep, creds, tls, policy=QUICK))


def image_file(tmp_path: Path, size: int = 2 * MiB) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(random.Random(size).randbytes(size))
    return path


def send(srv: RunningServer, path: Path, notes: list[str] | None = None,
         **options: object) -> UploadResult:
    conn = connect(srv)
    try:
        return upload(str(path), connection=conn,
                      options=UploadOptions(policy=QUICK, chunk_size=MiB // 2, **options),
                      notify=None if notes is None else notes.append)
    finally:
        conn.close()


def holds(srv: RunningServer, uuid: str, path: Path) -> bool:
    data = path.read_bytes()
    with open(srv.store.raw_path(uuid), "rb") as f:
        return f.read(len(data)) == data


def left(srv: RunningServer) -> list[int]:
    return [f["count"] for f in srv.faults.snapshot()]


def test_api_waits_for_retry_after(drive_store: RunningServer) -> None:
    drive_store.faults.fail_next(1, status=503, match="/drives/", method="GET", retry_after=1)
    with connect(drive_store).api as api:
        t0 = time.monotonic()
        data = api.get_json("drives/")
        waited = time.monotonic() - t0
    assert isinstance(data, dict) and waited >= 0.95, waited
    assert left(drive_store) == []


def test_direct_upload_refused_with_retry_after_runs_again(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    path = image_file(tmp_path)
    drive_store.faults.fail_next(1, status=503, match="/drives/upload", retry_after=1)
    notes: list[str] = []
    t0 = time.monotonic()
    result = send(drive_store, path, notes)
    assert time.monotonic() - t0 >= 0.95
    assert result.attempts == 2 and holds(drive_store, result.uuid, path)
    assert len(notes) == 1 and "HTTP 503" in notes[0] and "trying again" in notes[0]
    assert [r.uuid for r in drive_store.store.list()] == [result.uuid]


@pytest.mark.parametrize("where", ["initupload", "do=upload_chunk", "/chunk/"])
def test_chunked_upload_waits_for_retry_after(
    drive_store: RunningServer, tmp_path: Path, where: str
) -> None:
    path = image_file(tmp_path)
    drive_store.faults.fail_next(1, status=503, match=where, retry_after=1)
    t0 = time.monotonic()
    result = send(drive_store, path, chunked=True, connections=2)
    assert time.monotonic() - t0 >= 0.95
    assert holds(drive_store, result.uuid, path) and left(drive_store) == []
    assert [r.uuid for r in drive_store.store.list()] == [result.uuid], "one drive"


def test_a_4xx_to_the_api_is_asked_once(drive_store: RunningServer) -> None:
    drive_store.faults.fail_next(2, status=409, match="/drives/", method="GET")
    with connect(drive_store).api as api, pytest.raises(HTTPError, match="HTTP 409"):
        api.get_json("drives/")
    assert left(drive_store) == [1]


@pytest.mark.parametrize(("where", "chunked"), [
    ("/drives/upload", False), ("initupload", True), ("do=upload_chunk", True),
])
def test_a_4xx_to_an_upload_is_asked_once(
    drive_store: RunningServer, tmp_path: Path, where: str, chunked: bool
) -> None:
    path = image_file(tmp_path)
    drive_store.faults.fail_next(2, status=400, match=where)
    with pytest.raises(DrivepipeError, match="HTTP 400"):
        send(drive_store, path, chunked=chunked, connections=1)
    assert left(drive_store) == [1]


def test_a_500_to_a_direct_upload_is_not_repeated(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    """A POST the server may have acted on is not sent again (it could make two drives)."""
    path = image_file(tmp_path)
    drive_store.faults.fail_next(2, status=500, match="/drives/upload")
    with pytest.raises(HTTPError, match="HTTP 500"):
        send(drive_store, path)
    assert left(drive_store) == [1]


def test_a_chunk_answered_500_is_retried(drive_store: RunningServer, tmp_path: Path) -> None:
    """The chunk's body goes to a one-time link: repeating it is safe, 500 is transient."""
    path = image_file(tmp_path)
    drive_store.faults.fail_next(2, status=500, match="/chunk/")
    result = send(drive_store, path, chunked=True)
    assert holds(drive_store, result.uuid, path) and left(drive_store) == []


def test_an_opened_image_is_not_read_twice(drive_store: RunningServer, tmp_path: Path) -> None:
    path = image_file(tmp_path)
    drive_store.faults.fail_next(1, status=503, match="/drives/upload")
    conn = connect(drive_store)
    try:
        with pytest.raises(HTTPError, match="HTTP 503"):
            upload(open_image(str(path)), connection=conn, options=UploadOptions(policy=QUICK))
    finally:
        conn.close()
    assert drive_store.store.list() == []

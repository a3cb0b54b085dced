"""Downloads: redirect to a signed URL, Range answers, holes, ETag, faults."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from drivepipe.server import RunningServer

Api = Any
PutDrive = Callable[[RunningServer, bytes | Path], str]
MakeImage = Callable[..., Path]


def signed_url(client: Api, uuid: str) -> str:
    answer = client.call("GET", f"drives/{uuid}/download/")
    assert answer.status == 302
    return answer.headers["Location"]


def fetch(client: Api, url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Any:
    parts = urlsplit(url)
    return client.call(method, f"{parts.path}?{parts.query}", auth=False, headers=headers)


@pytest.fixture
def client(drive_store: RunningServer, api: Callable[[RunningServer], Api]) -> Api:
    return api(drive_store)


@pytest.fixture
def drive(
    drive_store: RunningServer, put_drive: PutDrive, make_sparse: MakeImage
) -> tuple[str, bytes]:
    image = make_sparse(3 << 20, seed=7, pieces=6, max_piece=200_000, zero_pieces=2)
    uuid = put_drive(drive_store, image)
    return uuid, Path(drive_store.store.raw_path(uuid)).read_bytes()


def test_download_redirects_to_a_signed_url_that_needs_no_credentials(
    client: Api, drive: tuple[str, bytes]
) -> None:
    uuid, content = drive
    url = signed_url(client, uuid)
    answer = fetch(client, url)
    assert answer.status == 200
    assert answer.body == content
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.headers["Content-Disposition"] == f'attachment; filename="{uuid}"'
    assert answer.headers["Accept-Ranges"] == "bytes"
    assert answer.headers["ETag"]
    assert int(answer.headers["Content-Length"]) == len(content)


def test_redirect_needs_credentials_and_an_existing_drive(
    client: Api, drive: tuple[str, bytes]
) -> None:
    uuid, _ = drive
    assert client.call("GET", f"drives/{uuid}/download/", auth=False).status == 401
    missing = "00000000-0000-0000-0000-000000000000"
    assert client.call("GET", f"drives/{missing}/download/").status == 404


def test_tampered_or_unsigned_urls_are_refused(client: Api, drive: tuple[str, bytes]) -> None:
    uuid, _ = drive
    url = signed_url(client, uuid)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    bad_sig = {**query, "sig": ("0" if query["sig"][0] != "0" else "1") + query["sig"][1:]}
    later = {**query, "expires": str(int(query["expires"]) + 3600)}
    for q in (bad_sig, later, {}):
        answer = client.call("GET", f"{parts.path}?{urlencode(q)}", auth=False)
        assert answer.status == 403
        assert answer.json[0]["error_type"] == "permission"


def test_expired_url_is_refused(
    make_drive_store: Callable[..., RunningServer], api: Callable[[RunningServer], Api],
    put_drive: PutDrive,
) -> None:
    server = make_drive_store(link_ttl=-5)
    client = api(server)
    uuid = put_drive(server, b"data")
    answer = fetch(client, signed_url(client, uuid))
    assert answer.status == 403
    assert "expired" in answer.json[0]["error_message"]


def test_single_ranges(client: Api, drive: tuple[str, bytes]) -> None:
    uuid, content = drive
    url = signed_url(client, uuid)
    size = len(content)
    cases = {
        "bytes=0-0": (0, 1),
        "bytes=100-199": (100, 200),
        f"bytes={size - 10}-": (size - 10, size),
        "bytes=-300": (size - 300, size),
        f"bytes=5-{size + 1000}": (5, size),
        "bytes=1048570-2097160": (1048570, 2097161),
    }
    for header, (start, end) in cases.items():
        answer = fetch(client, url, {"Range": header})
        assert answer.status == 206, header
        assert answer.body == content[start:end], header
        assert answer.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"


def test_unsatisfiable_and_ignored_ranges(client: Api, drive: tuple[str, bytes]) -> None:
    uuid, content = drive
    url = signed_url(client, uuid)
    size = len(content)
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        answer = fetch(client, url, {"Range": header})
        assert answer.status == 416, header
        assert answer.headers["Content-Range"] == f"bytes */{size}"
    # Several ranges, nonsense, or b < a: the whole body, 200.
    for header in ("bytes=0-1,5-6", "items=0-5", "bytes=9-3"):
        answer = fetch(client, url, {"Range": header})
        assert (answer.status, answer.body) == (200, content), header


def test_if_range_with_a_stale_etag_gets_everything(client: Api, drive: tuple[str, bytes]) -> None:
    uuid, content = drive
    url = signed_url(client, uuid)
    etag = fetch(client, url, method="HEAD").headers["ETag"]
    fresh = fetch(client, url, {"Range": "bytes=0-9", "If-Range": etag})
    assert (fresh.status, fresh.body) == (206, content[:10])
    stale = fetch(client, url, {"Range": "bytes=0-9", "If-Range": '"old"'})
    assert (stale.status, stale.body) == (200, content)


def test_head_gives_headers_only(client: Api, drive: tuple[str, bytes]) -> None:
    uuid, content = drive
    answer = fetch(client, signed_url(client, uuid), method="HEAD")
    assert answer.status == 200 and answer.body == b""
    assert int(answer.headers["Content-Length"]) == len(content)


def test_etag_changes_when_content_changes(
    drive_store: RunningServer, client: Api, drive: tuple[str, bytes]
) -> None:
    uuid, content = drive
    url = signed_url(client, uuid)
    before = fetch(client, url, method="HEAD").headers["ETag"]
    grown = client.call(
        "PUT", f"drives/{uuid}/", body={"name": "d", "size": len(content) + 4096, "media": "disk"}
    )
    assert grown.status == 200
    after = fetch(client, url, method="HEAD").headers["ETag"]
    assert after != before


def test_holes_are_served_as_zeros_and_big_sparse_drives_stream(
    drive_store: RunningServer, client: Api, put_drive: PutDrive, tmp_path: Path
) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"\x01" * 5000)
    uuid = put_drive(drive_store, image)
    # The store kept it sparse: only the written piece is allocated.
    assert os.stat(drive_store.store.raw_path(uuid)).st_blocks * 512 < 1 << 20
    answer = fetch(client, signed_url(client, uuid), {"Range": f"bytes={(40 << 20) - 10}-"})
    assert answer.body[:10] == bytes(10)
    assert answer.body[10:5010] == b"\x01" * 5000
    assert answer.body[5010:].count(0) == len(answer.body) - 5010


def test_uploading_drive_is_not_downloadable(drive_store: RunningServer, client: Api) -> None:
    uuid = client.call("POST", "initupload/", body={"name": "x", "size": 5000}).json["objects"][0][
        "uuid"
    ]
    assert client.call("GET", f"drives/{uuid}/download/").status == 400
    # Nor through a link signed before (or without) the redirect check.
    query = drive_store.server.context.signer.query("download", (uuid,), 60)
    assert fetch(client, f"{drive_store.base_url}direct/{uuid}/download/?{query}").status == 400


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize(("kind", "curl_codes"), [("cut", {18}), ("drop", {18, 56})])
def test_download_faults_cut_the_body_short(
    drive_store: RunningServer, client: Api, drive: tuple[str, bytes], tmp_path: Path,
    kind: str, curl_codes: set[int],
) -> None:
    uuid, content = drive
    if kind == "cut":
        drive_store.faults.cut_download_after(100_000)
    else:
        drive_store.faults.drop_download_after(100_000)
    target = tmp_path / "out"
    url = signed_url(client, uuid)
    failed = subprocess.run(
        ["curl", "-sS", "-o", str(target), url], check=False, capture_output=True
    )
    assert failed.returncode in curl_codes
    assert target.read_bytes() == content[:100_000]
    # One-shot: the next try gets everything.
    subprocess.run(["curl", "-sS", "-o", str(target), url], check=True)
    assert target.read_bytes() == content


def test_delay_fault_holds_the_answer(drive_store: RunningServer, client: Api) -> None:
    drive_store.faults.delay(0.3, match="capabilities")
    start = time.monotonic()
    assert client.call("GET", "capabilities/").status == 200
    assert time.monotonic() - start >= 0.3


def test_concurrent_uploads_and_downloads_keep_every_drive_intact(
    drive_store: RunningServer, client: Api
) -> None:
    images = [os.urandom((5 << 20) + i * 4099) for i in range(4)]

    def round_trip(image: bytes) -> bytes:
        uuid = client.call("POST", "drives/upload/", raw=image).body.decode().strip()
        return bytes(fetch(client, signed_url(client, uuid)).body[: len(image)])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(round_trip, images))
    assert results == images
    assert len(drive_store.store.list()) == 4


def test_fragmented_drive_small_pieces_are_gathered_correctly(
    drive_store: RunningServer, client: Api, put_drive: PutDrive, tmp_path: Path
) -> None:
    image = tmp_path / "fragmented.img"
    pieces = []
    with open(image, "wb") as f:
        f.truncate(3 << 20)
        offset = 0
        for i in range(300):
            data = os.urandom(4096 if i % 3 else 70_000)  # small and large data spans
            f.seek(offset)
            f.write(data)
            pieces.append(offset)
            offset += len(data) + (4096 if i % 2 else 9000)
            if offset > (3 << 20) - 70_000:
                break
    uuid = put_drive(drive_store, image)
    content = Path(drive_store.store.raw_path(uuid)).read_bytes()
    url = signed_url(client, uuid)
    assert fetch(client, url).body == content
    for start in (1, 4095, 4097, pieces[7] + 100):
        answer = fetch(client, url, {"Range": f"bytes={start}-{start + 300_000}"})
        assert answer.body == content[start : start + 300_001]

"""The chunked upload protocol: initupload, upload_chunk links, 416, restarts."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from drivepipe.server import RunningServer, chunk_count, chunk_span

Api = Any
#: the chunk size of the tests that need only a few small chunks
CHUNK = 4096


@pytest.fixture
def client(drive_store: RunningServer, api: Callable[[RunningServer], Api]) -> Api:
    return api(drive_store)


def init(client: Api, size: int) -> str:
    answer = client.call("POST", "initupload/", body={"name": "img", "size": size, "media": "disk"})
    assert answer.status == 201
    (drive,) = answer.json["objects"]
    assert drive["status"] == "uploading" and drive["size"] == size
    return str(drive["uuid"])


def new_upload(client: Api, image: bytes) -> tuple[bytes, str]:
    """``image`` and the drive :func:`init` made for it."""
    return image, init(client, len(image))


def link(client: Api, uuid: str, number: int, chunk_size: int) -> Any:
    return client.call(
        "POST", f"drives/{uuid}/action/?do=upload_chunk",
        body={"chunk_number": number, "chunk_size": chunk_size},
    )


def send_chunk(client: Api, path: str, data: bytes) -> Any:
    # pycloudsigma joins scheme://host/ + link.lstrip("/"): a relative path.
    return client.call(
        "POST", "/" + path.lstrip("/"), auth=False, raw=data,
        headers={"Content-Type": "application/octet-stream"},
    )


def upload_chunk(client: Api, uuid: str, image: bytes, number: int, chunk_size: int) -> Any:
    answer = link(client, uuid, number, chunk_size)
    assert answer.status == 200, answer.body
    offset, length = chunk_span(len(image), chunk_size, number)
    return send_chunk(client, answer.json["link"], image[offset : offset + length])


def test_chunk_numbering_last_chunk_absorbs_the_remainder() -> None:
    assert chunk_count(100, 30) == 3
    assert [chunk_span(100, 30, k) for k in range(3)] == [(0, 30), (30, 30), (60, 40)]
    assert chunk_count(20, 30) == 1 and chunk_span(20, 30, 0) == (0, 20)
    assert chunk_count(90, 30) == 3 and chunk_span(90, 30, 2) == (60, 30)


def test_full_chunked_upload(drive_store: RunningServer, client: Api) -> None:
    chunk = 64 << 10
    image = os.urandom(chunk * 3 + 1000) + bytes(chunk) + os.urandom(500)
    uuid = init(client, len(image))
    count = chunk_count(len(image), chunk)
    for k in reversed(range(count)):  # any order
        answer = upload_chunk(client, uuid, image, k, chunk)
        assert answer.status == 200
        assert answer.json["status"] == ("unmounted" if k == 0 else "uploading")
    drive = client.call("GET", f"drives/{uuid}/").json
    assert drive["status"] == "unmounted"
    assert drive["size"] == drive_store.store.min_size  # grown like a direct upload
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        assert f.read(len(image)) == image
        assert f.read().count(0) == drive_store.store.min_size - len(image)


def test_uploaded_chunk_answers_416_and_its_link_cannot_be_reused(
    drive_store: RunningServer, client: Api
) -> None:
    image, uuid = new_upload(client, os.urandom(CHUNK * 4))
    first = link(client, uuid, 1, CHUNK).json["link"]
    assert send_chunk(client, first, image[CHUNK : 2 * CHUNK]).status == 200
    assert link(client, uuid, 1, CHUNK).status == 416
    assert send_chunk(client, first, image[CHUNK : 2 * CHUNK]).status == 416
    assert drive_store.store.get(uuid).received == {1}


def test_bad_chunk_requests(drive_store: RunningServer, client: Api) -> None:
    image, uuid = new_upload(client, os.urandom(CHUNK * 4))
    assert link(client, uuid, 4, CHUNK).status == 400  # past the last chunk
    assert client.call(
        "POST", f"drives/{uuid}/action/?do=explode", body={"chunk_number": 0, "chunk_size": CHUNK}
    ).status == 400
    assert client.call(
        "POST", f"drives/{uuid}/action/?do=upload_chunk", body={"chunk_number": "zero"}
    ).status == 400
    assert link(client, uuid, 0, CHUNK).status == 200
    path = link(client, uuid, 0, CHUNK).json["link"]
    # Wrong length: refused before anything is stored.
    assert send_chunk(client, path, image[: CHUNK - 1]).status == 400
    # A forged chunk number or size breaks the signature.
    assert send_chunk(client, path.replace("/chunk/0/", "/chunk/1/"), image[:CHUNK]).status == 403
    assert send_chunk(client, path.replace("size=4096", "size=8192"), image[:CHUNK]).status == 403
    # Once a chunk landed, the chunk size is fixed.
    assert upload_chunk(client, uuid, image, 0, CHUNK).status == 200
    assert link(client, uuid, 1, 2 * CHUNK).status == 400
    assert drive_store.store.get(uuid).received == {0}


def test_chunk_links_need_credentials_to_get_but_not_to_use(client: Api) -> None:
    uuid = init(client, 10_000)
    answer = client.call(
        "POST", f"drives/{uuid}/action/?do=upload_chunk",
        body={"chunk_number": 0, "chunk_size": 10_000}, auth=False,
    )
    assert answer.status == 401
    assert upload_chunk(client, uuid, os.urandom(10_000), 0, 10_000).status == 200


def test_progress_survives_a_restart_between_chunks(
    drive_store: RunningServer, client: Api
) -> None:
    chunk = 8192
    image = os.urandom(chunk * 5 + 77)
    uuid = init(client, len(image))
    for k in (0, 2):
        assert upload_chunk(client, uuid, image, k, chunk).status == 200
    pending = link(client, uuid, 3, chunk).json["link"]
    drive_store.restart()
    assert drive_store.store.get(uuid).received == {0, 2}
    assert drive_store.store.get(uuid).status == "uploading"
    assert [link(client, uuid, k, chunk).status for k in range(5)] == [416, 200, 416, 200, 200]
    # A link handed out before the restart still works (the signing key persists).
    offset, length = chunk_span(len(image), chunk, 3)
    assert send_chunk(client, pending, image[offset : offset + length]).status == 200
    for k in (1, 4):
        assert upload_chunk(client, uuid, image, k, chunk).status == 200
    drive_store.restart()
    assert drive_store.store.get(uuid).status == "unmounted"
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        assert f.read(len(image)) == image


def test_cut_chunk_is_not_counted_and_a_retry_replaces_its_bytes(
    drive_store: RunningServer, client: Api
) -> None:
    chunk = 64 << 10
    image = os.urandom(chunk * 2)
    uuid = init(client, len(image))
    path = link(client, uuid, 0, chunk).json["link"]
    parts = urlsplit(drive_store.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {chunk}\r\n\r\n".encode()
        sock.sendall(head + b"\xff" * (chunk // 2))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1024) == b""
    assert drive_store.store.get(uuid).received == set()
    # The retry carries zeros where the cut attempt wrote 0xff: they must not survive.
    retry = bytes(chunk // 2) + image[chunk // 2 : chunk]
    assert send_chunk(client, path, retry).status == 200
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        assert f.read(chunk) == retry


def test_concurrent_upload_of_the_same_chunk_is_told_to_retry(
    drive_store: RunningServer, client: Api
) -> None:
    image, uuid = new_upload(client, os.urandom(CHUNK * 2))
    path = link(client, uuid, 0, CHUNK).json["link"]
    parts = urlsplit(drive_store.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {CHUNK}\r\n\r\n".encode()
        sock.sendall(head + image[:100])
        # The first request now holds chunk 0; wait until the server has claimed it.
        while not drive_store.store.chunks_in_flight(uuid):
            time.sleep(0.01)
        second = send_chunk(client, path, image[:CHUNK])
        assert second.status == 503
        assert second.json[0]["error_type"] == "concurrency"
        sock.sendall(image[100:CHUNK])
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    assert drive_store.store.get(uuid).received == {0}


def test_upload_drop_fault_breaks_a_chunk_once(drive_store: RunningServer, client: Api) -> None:
    chunk = 6 << 20
    image = os.urandom(chunk)
    uuid = init(client, len(image))
    drive_store.faults.drop_upload_after(1 << 20, match="/chunk/")
    with pytest.raises(ConnectionError):
        upload_chunk(client, uuid, image, 0, chunk)
    assert drive_store.store.get(uuid).received == set()
    assert upload_chunk(client, uuid, image, 0, chunk).status == 200

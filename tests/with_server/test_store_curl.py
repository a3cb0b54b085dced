"""The seed documentation's curl commands, run verbatim with real curl, and upload refusals."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from drivepipe.server import RunningServer

MakeStore = Callable[..., RunningServer]

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def curl_upload(server: RunningServer, image: Path, user: str | None = None) -> str:
    """The seed's upload command, verbatim; returns curl's stdout."""
    creds = user or f"{server.username}:{server.password}"
    out = subprocess.run(
        [
            "curl", "--request", "POST", "--user", creds,
            "--header", "Content-Type: application/octet-stream",
            "--upload-file", str(image), f"{server.base_url}drives/upload/",
        ],
        check=True, capture_output=True, text=True,
    )
    return out.stdout


def curl_download(server: RunningServer, uuid: str, cwd: Path) -> None:
    """The seed's download command, verbatim, in ``cwd``."""
    subprocess.run(
        [
            "curl", "--location", "--remote-name", "--remote-header-name",
            "--user", f"{server.username}:{server.password}",
            f"{server.base_url}drives/{uuid}/download/",
        ],
        check=True, capture_output=True, cwd=cwd,
    )


def raw_request(server: RunningServer, head: bytes, body: bytes = b"", *, close: bool) -> bytes:
    """Send ``head`` + ``body`` on a socket (closing the sending side if ``close``).

    Returns the whole answer (headers and Content-Length body), or what came before
    the server hung up.
    """
    parts = urlsplit(server.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + body)
        if close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return data
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            break
        rest += more
    return head + b"\r\n\r\n" + rest


def assert_zeros(f, n: int) -> None:
    left = n
    while left:
        block = f.read(min(left, 8 << 20))
        assert block and block.count(0) == len(block)
        left -= len(block)


def test_seed_upload_and_download_grow_to_default_min_size(
    make_drive_store: MakeStore, tmp_path: Path
) -> None:
    server = make_drive_store(min_size=512 << 20)
    image = tmp_path / "disk.img"
    payload = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12345)
    image.write_bytes(payload)

    uuid = curl_upload(server, image).strip()

    assert server.store.get(uuid).size == 512 << 20
    dl = tmp_path / "dl"
    dl.mkdir()
    curl_download(server, uuid, dl)
    saved = dl / uuid
    assert os.path.getsize(saved) == 512 << 20
    with open(saved, "rb") as f:
        assert f.read(len(payload)) == payload
        assert_zeros(f, (512 << 20) - len(payload))


def test_upload_larger_than_min_size_keeps_its_size_and_stays_sparse(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.write(os.urandom(4096))
        f.seek(3 << 20)
        f.write(os.urandom(5000))
    uuid = curl_upload(drive_store, image).strip()
    raw = Path(drive_store.store.raw_path(uuid))
    assert raw.read_bytes() == image.read_bytes()
    # Only the two data pieces were written: the zeros between them stay a hole.
    assert raw.stat().st_blocks * 512 < 1 << 20


def test_upload_with_wrong_or_missing_credentials_is_refused(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(os.urandom(1000))
    for user in (f"{drive_store.username}:wrong", f"nobody@example.com:{drive_store.password}"):
        out = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--user", user,
             "--upload-file", str(image), f"{drive_store.base_url}drives/upload/"],
            capture_output=True, text=True, check=True,
        )
        assert out.stdout == "401"
    answer = raw_request(
        drive_store,
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
        b"abc", close=False,
    )
    assert answer.startswith(b"HTTP/1.1 401")
    assert b'WWW-Authenticate: Basic realm="drivepipe"' in answer
    assert drive_store.store.list() == []


def _auth(server: RunningServer) -> bytes:
    return base64.b64encode(f"{server.username}:{server.password}".encode())


def test_upload_without_content_length_is_refused_with_411(drive_store: RunningServer) -> None:
    head = (
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + _auth(drive_store) + b"\r\n\r\n"
    )
    assert raw_request(drive_store, head, close=False).startswith(b"HTTP/1.1 411")


def test_chunked_request_body_is_refused(drive_store: RunningServer, tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(os.urandom(1000))
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
         "--user", f"{drive_store.username}:{drive_store.password}",
         "--header", "Transfer-Encoding: chunked", "--data-binary", f"@{image}",
         f"{drive_store.base_url}drives/upload/"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout == "411"
    assert drive_store.store.list() == []


def test_body_cut_short_leaves_no_drive_and_no_temp_file(drive_store: RunningServer) -> None:
    head = (
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + _auth(drive_store) + b"\r\nContent-Length: 100000\r\n\r\n"
    )
    answer = raw_request(drive_store, head, os.urandom(60000), close=True)
    assert answer == b""  # the server hangs up: there is nothing to answer
    # The handler thread cleans up as it sees the end of the body; ask it afterwards.
    assert drive_store.store.list() == []
    leftovers = list(Path(drive_store.store.incoming_dir).iterdir())
    assert leftovers == []


def test_too_large_upload_is_refused_before_the_body(make_drive_store: MakeStore) -> None:
    server = make_drive_store(max_size=10 << 20)
    head = (
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + _auth(server) + b"\r\nContent-Length: " + str(11 << 20).encode()
        + b"\r\nExpect: 100-continue\r\n\r\n"
    )
    # No body is sent: the answer must come from the headers alone.
    answer = raw_request(server, head, close=False)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"Connection: close" in answer


def test_upload_accepts_any_name_after_upload_path(drive_store: RunningServer) -> None:
    head = (
        b"POST /api/2.0/drives/upload/my%20disk.img HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + _auth(drive_store) + b"\r\nContent-Length: 5\r\n\r\n"
    )
    answer = raw_request(drive_store, head, b"hello", close=False)
    assert answer.startswith(b"HTTP/1.1 201")
    uuid = answer.split(b"\r\n\r\n", 1)[1].decode().strip()
    assert drive_store.store.get(uuid).image_size == 5
    assert drive_store.store.get(uuid).name == "my disk.img"


def test_curl_upload_names_the_drive_after_the_file(
    drive_store: RunningServer, tmp_path: Path
) -> None:
    image = tmp_path / "debian-12.raw"
    image.write_bytes(os.urandom(100))
    uuid = curl_upload(drive_store, image).strip()
    assert drive_store.store.get(uuid).name == "debian-12.raw"


def test_early_refusal_reaches_a_client_still_sending_its_body(drive_store: RunningServer) -> None:
    # No Expect: 100-continue: the client sends 32 MiB the server never reads.  The
    # 401 must still reach it (lingering close), not be lost to a connection reset.
    size = 32 << 20
    head = (
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + base64.b64encode(f"{drive_store.username}:wrong".encode())
        + b"\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    answer = raw_request(drive_store, head, bytes(size), close=False)
    assert answer.startswith(b"HTTP/1.1 401")

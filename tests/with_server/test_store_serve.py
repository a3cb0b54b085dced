"""The server as a process and a service: ``drivepipe serve``, TLS, slow and idle clients."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from tmpfs import small_tmpfs as mount_tmpfs

from drivepipe._errors import ConfigError
from drivepipe.server import RunningServer

MakeStore = Callable[..., RunningServer]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def connect(server: RunningServer) -> socket.socket:
    parts = urlsplit(server.base_url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def test_idle_and_slow_clients_are_disconnected(make_drive_store: MakeStore) -> None:
    server = make_drive_store(idle_timeout=0.2)
    with connect(server) as idle, connect(server) as slow:
        slow.sendall(b"GET /api/2.0/capabilities/ HT")  # never finishes its request line
        # Both get closed by the server; recv would raise TimeoutError (after 10 s) if not.
        assert idle.recv(100) == b""
        assert slow.recv(100) == b""


def test_a_slow_upload_body_leaves_nothing(make_drive_store: MakeStore) -> None:
    server = make_drive_store(idle_timeout=0.2)
    with connect(server) as sock:
        sock.sendall(
            b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            b"Authorization: Basic "
            + base64.b64encode(f"{server.username}:{server.password}".encode())
            + b"\r\n\r\n" + b"x" * 10
        )
        assert sock.recv(100) == b""
    assert server.store.list() == []
    assert os.listdir(server.store.incoming_dir) == []


def test_connections_over_the_limit_are_closed(make_drive_store: MakeStore) -> None:
    server = make_drive_store(max_connections=2)
    with connect(server) as a, connect(server) as b:
        a.sendall(b"GET /api/2.0/capabilities/ HTTP/1.1\r\nHost: x\r\n\r\n")
        b.sendall(b"GET /api/2.0/capabilities/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.recv(12) == b"HTTP/1.1 401"
        assert b.recv(12) == b"HTTP/1.1 401"
        with connect(server) as c:
            assert c.recv(100) == b""


@needs_curl
def test_tls(make_drive_store: MakeStore, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    server = make_drive_store(tls_cert=str(cert_file), tls_key=str(key_file))
    assert server.base_url.startswith("https://127.0.0.1:")
    image = tmp_path / "img"
    image.write_bytes(os.urandom(3000) + bytes(100_000) + os.urandom(300_000))
    creds = f"{server.username}:{server.password}"
    uuid = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_file), "--request", "POST", "--user", creds,
         "--upload-file", str(image), f"{server.base_url}drives/upload/"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    data = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_file), "--location", "--user", creds,
         "--range", "0-402999", f"{server.base_url}drives/{uuid}/download/"],
        capture_output=True, check=True,
    ).stdout
    assert data == image.read_bytes()
    # A plain-HTTP client fails its handshake and the server keeps serving.
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.recv(100)
    assert subprocess.run(
        ["curl", "-sS", "--cacert", str(ca_file), "-o", "/dev/null", "-w", "%{http_code}",
         f"{server.base_url}capabilities/"], capture_output=True, text=True, check=True,
    ).stdout == "401"


def start_serve(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
         "serve", "--root", str(root), "--port", "0",
         "--min-size", "1M", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


@needs_curl
def test_serve_command_prints_its_url_and_uses_the_env_account(tmp_path: Path) -> None:
    env = {**os.environ, "CLOUDSIGMA_USERNAME": "me@example.com", "CLOUDSIGMA_PASSWORD": "pw1"}
    proc, url = start_serve(tmp_path / "store", env)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api/2.0/")
        image = tmp_path / "img"
        image.write_bytes(os.urandom(1000))
        uuid = subprocess.run(
            ["curl", "-sS", "--fail", "--request", "POST", "--user", "me@example.com:pw1",
             "--upload-file", str(image), f"{url}drives/upload/"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert (tmp_path / "store" / "drives" / f"{uuid}.raw").stat().st_size == 1 << 20
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "pw1" not in err
    assert str(tmp_path / "store") in err


def test_serve_command_makes_a_random_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSIGMA_")}
    proc, url = start_serve(tmp_path / "store", env)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert url.endswith("/api/2.0/")
    assert "password " in err
    password = err.split("password ", 1)[1].split()[0]
    assert len(password) >= 16


def test_uploads_over_the_limit_wait_then_get_503(make_drive_store: MakeStore) -> None:
    server = make_drive_store(max_uploads=1, upload_wait=0.2)
    auth = base64.b64encode(f"{server.username}:{server.password}".encode())
    size = 5 << 20
    head = (
        b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic " + auth
        + b"\r\nContent-Length: " + str(size).encode() + b"\r\n\r\n"
    )
    body = os.urandom(size)
    with connect(server) as first, connect(server) as second:
        first.sendall(head + body[: 4 << 20])
        incoming = server.store.incoming_dir
        # The first upload holds the only slot once its first piece is on disk.
        while not any(os.stat(os.path.join(incoming, n)).st_blocks for n in os.listdir(incoming)):
            time.sleep(0.01)
        second.sendall(head)  # the answer comes before any body byte is read
        assert second.recv(12) == b"HTTP/1.1 503"
        first.sendall(body[4 << 20 :])
        assert first.recv(12) == b"HTTP/1.1 201"
    assert len(server.store.list()) == 1


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root needed, else skip), unmounted afterwards."""
    with mount_tmpfs(tmp_path / "small", "4m") as mnt:
        yield mnt


def test_full_disk_is_a_503_and_leaves_nothing(
    make_drive_store: MakeStore, api: Callable[[RunningServer], Any], small_tmpfs: Path
) -> None:
    server = make_drive_store(root=str(small_tmpfs / "store"))
    client = api(server)
    first = client.call("POST", "drives/upload/", raw=os.urandom(3 << 20))
    assert first.status == 201
    second = client.call("POST", "drives/upload/", raw=os.urandom(3 << 20))
    assert second.status == 503
    assert "no space" in second.json[0]["error_message"]
    assert [d.uuid for d in server.store.list()] == [first.body.decode().strip()]
    assert os.listdir(server.store.incoming_dir) == []


def test_a_second_store_on_the_same_root_is_refused_and_wipes_nothing(
        make_drive_store: MakeStore) -> None:
    first = make_drive_store()
    arriving = first.store.begin_direct(3000)  # an upload in progress on the first store
    arriving.write(os.urandom(1000))
    root = first.root
    held = rf"in use by another drivepipe store \(pid {os.getpid()}\)"
    with pytest.raises(ConfigError, match=held):
        make_drive_store(root=root)
    assert os.path.exists(arriving.tmp)
    arriving.write(os.urandom(2000))
    uuid = arriving.finish().uuid
    assert first.store.get(uuid).image_size == 3000
    first.restart()  # the same server lets go of the root and takes it again
    assert first.store.get(uuid).uuid == uuid
    first.stop()
    second = make_drive_store(root=root)  # free once the first one stopped
    assert [r.uuid for r in second.store.list()] == [uuid]


def test_a_second_serve_command_on_the_same_root_exits_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "CLOUDSIGMA_USERNAME": "me@example.com", "CLOUDSIGMA_PASSWORD": "pw1"}
    proc, url = start_serve(tmp_path / "store", env)
    try:
        second = subprocess.run(
            [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
             "serve", "--root", str(tmp_path / "store"), "--port", "0", "--quiet"],
            capture_output=True, text=True, env=env, timeout=30, check=False)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith("drivepipe: error: ")
        assert f"in use by another drivepipe store (pid {proc.pid})" in second.stderr
        parts = urlsplit(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(b"GET /api/2.0/capabilities/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(12) == b"HTTP/1.1 401"  # the first one still serves
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0

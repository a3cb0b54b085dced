"""The local drive store under abuse, over raw sockets and plain HTTP.

- Path traversal in URLs (``..``, encoded dots and slashes), in UUID positions
  and in drive names: never a file outside the store's root read or written.
- A Content-Length over the maximum drive size is refused *before* the body:
  the answer arrives while the client has sent no body byte.
- Slowloris: clients trickling their request head (a byte at a time, each byte
  inside the idle timeout) are cut after the head deadline, and while they hang
  on, other clients are served.
- Unauthenticated (or wrongly authenticated) access is refused on every route
  except the capability links (signed downloads, one-time chunk links).
- Capability links: tampered, expired, reused or replayed for another chunk are
  refused.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_servers import MakeStore

from drivepipe.server import RunningServer
from drivepipe.server._handler import ROUTES

pytestmark = pytest.mark.timeout(60)
UUID0 = "00000000-0000-4000-8000-000000000000"


# --- plumbing ------------------------------------------------------------------------------


def address(store: RunningServer) -> tuple[str, int]:
    parts = urlsplit(store.base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def basic(store: RunningServer, password: str | None = None) -> str:
    pair = f"{store.username}:{password if password is not None else store.password}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def request(
    store: RunningServer, method: str, target: str, *, auth: str | None = None,
    body: bytes | None = None, headers: dict[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPMessage]:
    """One request with the target sent exactly as given (no normalisation)."""
    conn = http.client.HTTPConnection(*address(store), timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        hdrs = dict(headers or {})
        if auth:
            hdrs["Authorization"] = auth
        if body is not None:
            hdrs.setdefault("Content-Length", str(len(body)))
        for key, value in hdrs.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers
    finally:
        conn.close()


def api(store: RunningServer, method: str, path: str, obj: object = None) -> tuple[int, object]:
    body = json.dumps(obj).encode() if obj is not None else None
    status, data, _ = request(store, method, "/api/2.0/" + path, auth=basic(store), body=body,
                              headers={"Content-Type": "application/json"} if body else None)
    return status, json.loads(data) if data.strip() else None


def files_outside(root: Path, before: set[Path]) -> set[Path]:
    return {p for p in root.parent.rglob("*") if p.is_file()} - before


def read_answer(sock: socket.socket) -> bytes:
    """Whatever the server sends until it closes (or 10 s pass)."""
    sock.settimeout(10)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


# --- path traversal ----------------------------------------------------------------------------

TRAVERSALS = [
    "/api/2.0/../../secret",
    "/api/2.0/drives/../../secret",
    "/api/2.0/drives/%2e%2e/%2e%2e/secret/",
    "/api/2.0/drives/..%2f..%2fsecret/",
    "/api/2.0/drives/../secret/download/",
    f"/api/2.0/drives/{UUID0}/../../../secret",
    "/api/2.0/drives/....//....//secret/",
    "/api/2.0/direct/../secret/download/",
    "/api/2.0/drives/%00/",
    "/../../../../etc/passwd",
    "//etc/passwd",
    "/api/2.0/drives/upload/../../../../etc/passwd",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_in_the_url_reads_nothing_outside(store: RunningServer, target: str) -> None:
    secret = Path(store.root, "secret").read_bytes()
    for method in ("GET", "DELETE"):
        status, body, _ = request(store, method, target, auth=basic(store))
        assert status in (400, 404, 405), (method, target, status)
        assert secret not in body and b"root:" not in body
    assert Path(store.root, "secret").read_bytes() == secret  # not deleted, not changed


@pytest.mark.parametrize("name", ["../../../escape", "/etc/passwd", "..\\..\\x", "a/../../b",
                                  "\x00evil", "x" * 300])
def test_drive_names_never_become_paths(store: RunningServer, tmp_path: Path, name: str) -> None:
    root = Path(store.root)
    before = {p for p in root.parent.rglob("*") if p.is_file()}
    status, answer = api(store, "POST", "initupload/", {"name": name, "size": 4096})
    if status == 201:
        assert isinstance(answer, dict)
        uuid = answer["objects"][0]["uuid"]
        status, _ = api(store, "PUT", f"drives/{uuid}/",
                        {"name": name + "/../x", "size": 8192, "media": "disk", "meta": {}})
        assert status in (200, 400)
    else:
        assert status == 400
    new = files_outside(root, before)
    assert all(root in p.parents for p in new), new
    # the names live in the records only: no file is named after them
    assert not any(name.strip("/\\.") and name.strip("/\\.") in p.name for p in new)


def test_direct_upload_file_name_in_the_url_is_not_a_path(store: RunningServer) -> None:
    root = Path(store.root)
    before = {p for p in root.parent.rglob("*") if p.is_file()}
    status, _, _ = request(store, "POST", "/api/2.0/drives/upload/..%2f..%2f..%2fowned",
                              auth=basic(store), body=b"\x01" * 8192,
                              headers={"Content-Type": "application/octet-stream"})
    assert status in (200, 201, 400, 404)
    new = files_outside(root, before)
    assert all(root in p.parents for p in new), new
    assert not any("owned" in p.name for p in new)


# --- Content-Length over the maximum: refused before the body ------------------------------------


@pytest.mark.parametrize("expect", [False, True])
@pytest.mark.parametrize("length", ["max+1", str(10**30), "-1", "12, 13"])
def test_oversized_or_bad_content_length_refused_before_the_body(
    make_store: MakeStore, expect: bool, length: str
) -> None:
    store = make_store(max_size=64 << 20)
    value = str((64 << 20) + 1) if length == "max+1" else length
    head = (f"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {basic(store)}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {value}\r\n" + ("Expect: 100-continue\r\n" if expect else "")
            + "\r\n").encode()
    with socket.create_connection(address(store), timeout=10) as sock:
        sock.sendall(head)  # and not one body byte
        answer = read_answer(sock)
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 411, 413), answer[:200]
    if length == "max+1":
        assert status == 413
    assert not answer.startswith(b"HTTP/1.1 100")
    assert store.store.list() == []


def test_oversized_chunk_body_refused_before_the_body(store: RunningServer) -> None:
    status, answer = api(store, "POST", "initupload/", {"name": "d", "size": 2 << 20})
    assert status == 201 and isinstance(answer, dict)
    uuid = answer["objects"][0]["uuid"]
    status, link = api(store, "POST", f"drives/{uuid}/action/?do=upload_chunk",
                       {"chunk_number": 0, "chunk_size": 1 << 20})
    assert status == 200 and isinstance(link, dict)
    target = "/" + str(link["link"]).lstrip("/")
    head = (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n").encode()
    with socket.create_connection(address(store), timeout=10) as sock:
        sock.sendall(head)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert store.store.get(uuid).received == set() or not store.store.get(uuid).received


# --- slowloris ---------------------------------------------------------------------------------

TRICKLE = b"GET /api/2.0/capabilities/ HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 200


def trickle_until_cut(store: RunningServer, interval: float, out: list[bool]) -> None:
    """Send the head a byte per ``interval``; record whether the server cut us first."""
    with socket.create_connection(address(store), timeout=10) as sock:
        for byte in TRICKLE:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                out.append(True)
                return
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408"):
                    out.append(True)
                    return
        out.append(False)


def test_slowloris_is_cut_and_does_not_lock_others_out(make_store: MakeStore) -> None:
    # Each byte arrives inside the idle timeout; only a deadline on the whole head helps.
    store = make_store(idle_timeout=1.0, header_timeout=2.0,
                       max_connections=6)
    cut: list[bool] = []
    slow = [threading.Thread(target=trickle_until_cut, args=(store, 0.3, cut))
            for _ in range(6)]
    for thread in slow:
        thread.start()
    time.sleep(0.5)  # let them take every connection slot
    # a normal client gets in as soon as the trickling ones are cut, long before
    # they would have finished their heads (~70 s)
    served = False
    for _ in range(60):
        try:
            status, _, _ = request(store, "GET", "/api/2.0/capabilities/", auth=basic(store))
        except (ConnectionError, http.client.HTTPException, TimeoutError):
            time.sleep(0.25)
            continue
        served = status == 200
        break
    for thread in slow:
        thread.join()
    assert served
    assert cut == [True] * 6, "a trickling client kept its connection"


def test_slow_clients_do_not_block_a_normal_one(make_store: MakeStore) -> None:
    store = make_store(idle_timeout=1.0)
    socks = [socket.create_connection(address(store), timeout=10) for _ in range(16)]
    try:
        for sock in socks:
            sock.sendall(b"POST /api/2.0/drives/upload/ HTTP/1.1\r\nHost: x\r\n")
        status, _, _ = request(store, "GET", "/api/2.0/capabilities/", auth=basic(store))
        assert status == 200
    finally:
        for sock in socks:
            sock.close()


# --- authentication on every route ---------------------------------------------------------------


def concrete(pattern: str) -> str:
    """A path matching a route's pattern, with a syntactically valid UUID and number."""
    path = pattern.replace("(?:/.*)?", "").replace(r"(?P<number>\d{1,12})", "0")
    start = path.find("(?P<uuid>")
    if start >= 0:
        depth, end = 0, start
        while True:
            depth += {"(": 1, ")": -1}.get(path[end], 0)
            if depth == 0:
                break
            end += 1
        path = path[:start] + UUID0 + path[end + 1 :]
    return "/api/2.0/" + path.rstrip("/?") + "/"


ROUTE_CASES = [(concrete(r.pattern.pattern.removesuffix("/?")), method, r.auth)
               for r in ROUTES for method in r.views]


@pytest.mark.parametrize(("path", "method", "needs_auth"), ROUTE_CASES)
def test_every_route_but_capability_links_needs_credentials(
    store: RunningServer, path: str, method: str, needs_auth: bool
) -> None:
    body = b"{}" if method in ("POST", "PUT") else None
    for auth in (None, basic(store, "wrong-password"), "Basic !!!notbase64",
                 "Bearer " + store.password, basic(store, "")):
        status, answer, headers = request(store, method, path, auth=auth, body=body)
        if needs_auth:
            assert status == 401, (method, path, auth, status, answer[:200])
            assert headers.get("WWW-Authenticate", "").startswith("Basic ")
            assert store.password.encode() not in answer
        else:
            # capability links: no credentials, refused for lack of a valid signature
            assert status in (403, 404), (method, path, status)


def test_unauthenticated_requests_change_nothing(store: RunningServer) -> None:
    status, answer = api(store, "POST", "initupload/", {"name": "d", "size": 4096})
    assert status == 201 and isinstance(answer, dict)
    uuid = answer["objects"][0]["uuid"]
    record = store.store.get(uuid)
    request(store, "DELETE", f"/api/2.0/drives/{uuid}/")
    request(store, "PUT", f"/api/2.0/drives/{uuid}/",
            body=json.dumps({"name": "x", "size": 8192, "media": "disk"}).encode())
    request(store, "POST", "/api/2.0/_faults/", body=b'{"kind": "status", "count": 0}')
    assert store.store.get(uuid) == record
    assert store.faults.snapshot() == []


# --- capability links: expired, reused, tampered ----------------------------------------------


def chunk_link(store: RunningServer, uuid: str, number: int, size: int) -> str:
    status, link = api(store, "POST", f"drives/{uuid}/action/?do=upload_chunk",
                       {"chunk_number": number, "chunk_size": size})
    assert status == 200 and isinstance(link, dict), link
    return "/" + str(link["link"]).lstrip("/")


def post_chunk(store: RunningServer, target: str, data: bytes) -> int:
    """POST a chunk body the way curl does, with ``Expect: 100-continue``: a refused
    link is answered before the body, a valid one gets it."""
    head = (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            "Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n\r\n")
    with socket.create_connection(address(store), timeout=10) as sock:
        sock.sendall(head.encode())
        first = sock.recv(65536)
        if first.startswith(b"HTTP/1.1 100"):
            sock.sendall(data)
            first = first.split(b"\r\n\r\n", 1)[1] or sock.recv(65536)
        return int(first.split(b" ", 2)[1])


def new_upload(store: RunningServer, size: int) -> str:
    status, answer = api(store, "POST", "initupload/", {"name": "d", "size": size})
    assert status == 201 and isinstance(answer, dict)
    return str(answer["objects"][0]["uuid"])


def test_chunk_link_is_one_time(store: RunningServer) -> None:
    uuid = new_upload(store, 2 << 20)
    link = chunk_link(store, uuid, 0, 1 << 20)
    assert post_chunk(store, link, b"\x01" * (1 << 20)) in (200, 201, 204)
    assert post_chunk(store, link, b"\x02" * (1 << 20)) in (403, 409, 410, 416)
    with open(store.store.raw_path(uuid), "rb") as f:
        assert f.read(1 << 20) == b"\x01" * (1 << 20), "a reused link overwrote the chunk"


def test_chunk_link_cannot_be_replayed_for_another_chunk_or_drive(store: RunningServer) -> None:
    uuid = new_upload(store, 2 << 20)
    other = new_upload(store, 2 << 20)
    link = chunk_link(store, uuid, 0, 1 << 20)
    for forged in (link.replace("/chunk/0", "/chunk/1"), link.replace(uuid, other),
                   link.split("?")[0], link[:-4] + "0000", link.replace("expires=", "expires=9")):
        assert post_chunk(store, forged, b"\x03" * (1 << 20)) in (400, 403, 404), forged
    assert store.store.get(uuid).received == set() or not store.store.get(uuid).received
    assert not store.store.get(other).received


def test_expired_links_are_refused(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(chunk_link_ttl=1, link_ttl=1)
    uuid = new_upload(store, 2 << 20)
    link = chunk_link(store, uuid, 0, 1 << 20)
    # a finished drive and its signed download link
    status, body, headers = request(store, "POST", "/api/2.0/drives/upload/", auth=basic(store),
                                    body=b"\x05" * 4096)
    assert status in (200, 201)
    done = body.decode().strip()
    status, _, headers = request(store, "GET", f"/api/2.0/drives/{done}/download/",
                                 auth=basic(store))
    assert status in (301, 302, 303, 307)
    download = urlsplit(headers["Location"])
    signed = f"{download.path}?{download.query}"
    time.sleep(2.1)  # links carry whole expiry seconds: a 1 s link is dead after 2 s
    assert post_chunk(store, link, b"\x04" * (1 << 20)) == 403
    status, answer, _ = request(store, "GET", signed)
    assert status == 403 and b"\x05" not in answer
    assert not os.path.exists(tmp_path / "never")  # nothing else happened


# --- fuzzed request heads and ranges: the store answers or closes, never crashes -----------------

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
HEADER_VALUES = st.one_of(
    st.sampled_from(["", "0", "-1", "1e3", " 5 ", "99999999999999999999999", "chunked",
                     "100-continue", "bytes=0-", "Basic", "Basic !!", "\t", "x" * 5000]),
    st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
)
HEADER_NAMES = st.one_of(
    st.sampled_from(["Content-Length", "Transfer-Encoding", "Expect", "Authorization",
                     "Host", "Range", "If-Range", "Content-Type"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
)
TARGETS = st.one_of(
    st.sampled_from([p for p, _, _ in ROUTE_CASES] + TRAVERSALS),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60)
    .map(lambda t: "/api/2.0/" + t),
)


@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
                               "BREW", "get", ""]),
       target=TARGETS, headers=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6),
       authorized=st.booleans())
@FUZZ
def test_fuzzed_request_heads_get_an_answer_or_a_close(
    quick_store: RunningServer, capfd: pytest.CaptureFixture[str], method: str, target: str,
    headers: list[tuple[str, str]], authorized: bool,
) -> None:
    store = quick_store
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    if authorized:
        lines.append(f"Authorization: {basic(store)}")
    lines += [f"{name}: {value}" for name, value in headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    with socket.create_connection(address(store), timeout=10) as sock:
        sock.sendall(head)
        answer = read_answer(sock)
    # a two-word request line is HTTP/0.9 to the stdlib, whose answers have no status line
    http09 = method == "" and answer.startswith(b'[{"error_type"')
    assert answer == b"" or answer.startswith(b"HTTP/1.") or http09, answer[:100]
    status, _, _ = request(store, "GET", "/api/2.0/capabilities/", auth=basic(store))
    assert status == 200, "the store still serves"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


@pytest.fixture
def quick_store(make_store: MakeStore) -> RunningServer:
    """Short timeouts: a fuzzed head announcing a body that never comes ends fast.
    (Function scope: hypothesis runs every example inside one test call.)"""
    return make_store(idle_timeout=0.5, header_timeout=1.0)


RANGES = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", st.one_of(st.just(""), st.integers(0, 70000)),
              st.one_of(st.just(""), st.integers(0, 70000))),
    st.builds(lambda a, b, c: f"bytes={a}-{b},{c}-", st.integers(0, 9), st.integers(0, 9),
              st.integers(0, 9)),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.builds(lambda s: f"BYTES = {s}", st.text("0123456789- ,", max_size=12)),
)


@given(value=RANGES)
@FUZZ
def test_fuzzed_ranges_serve_exactly_what_they_say(
    quick_store: RunningServer, put_signed: Callable[[RunningServer], tuple[str, bytes]],
    value: str,
) -> None:
    store = quick_store
    signed, data = put_signed(store)
    status, body, headers = request(store, "GET", signed, headers={"Range": value})
    size = len(data)
    if status == 200:
        assert body == data
    elif status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", headers["Content-Range"])
        assert m, headers["Content-Range"]
        first, last, total = map(int, m.groups())
        assert total == size and first <= last < size
        assert body == data[first : last + 1]
    else:
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}", (status, value)


@pytest.fixture
def put_signed() -> Iterator[Callable[[RunningServer], tuple[str, bytes]]]:
    made: dict[int, tuple[str, bytes]] = {}

    def put(store: RunningServer) -> tuple[str, bytes]:
        if id(store) not in made:
            data = os.urandom(65536 + 123)
            incoming = store.store.begin_direct(len(data))
            incoming.write(data)
            uuid = incoming.finish().uuid
            size = store.store.get(uuid).size
            data = data + bytes(size - len(data))  # grown to the minimum size with zeros
            status, _, headers = request(store, "GET", f"/api/2.0/drives/{uuid}/download/",
                                         auth=basic(store))
            assert status in (301, 302, 303, 307)
            parts = urlsplit(headers["Location"])
            made[id(store)] = (f"{parts.path}?{parts.query}", data)
        return made[id(store)]

    yield put

"""Credentials hygiene, checked on real processes, real output and on the wire.

- The password is never in the argv of a drivepipe process (nor of anything it
  starts), nor in stdout/stderr in any progress mode (none, plain, json with its
  stats summary, rich), nor in error lines (wrong password, 503, unreachable
  host, verify failure), nor in the store's request log.
- A config file holding a password that others can read gets a warning.
- Basic credentials never go over plain http to a non-loopback host without
  ``--insecure-http``: the policy function on a table of URLs, and the CLI
  against ``http://example.invalid`` with ``http_proxy`` pointing at a recording
  server on 127.0.0.1, so any connection attempt would be seen: there is none.
- Never across a redirect to another host: a fake API on 127.0.0.1 redirects
  the download (and the upload) to a recording server on 127.0.0.2 (another
  loopback address, another origin), which must never see an Authorization
  header.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from rel_support import Cli, MiB, Recorder, make_image, one_error_line, reply

from drivepipe._errors import ConfigError
from drivepipe.cloudsigma.config import is_loopback
from drivepipe.server import RunningServer
from drivepipe.transport.curl import TlsOptions, check_auth_transport

pytestmark = pytest.mark.timeout(60)
#: the installed console script, as a user runs it
DRIVEPIPE = [str(Path(sys.executable).with_name("drivepipe"))]


def secrets_of(username: str, password: str) -> list[str]:
    """The password, and the Basic token that carries it."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return [password, token]


def assert_clean(text: str, username: str, password: str) -> None:
    for secret in secrets_of(username, password):
        assert secret not in text, f"secret leaked: {text[:300]!r}"


# --- argv ------------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    found = {pid}
    changed = True
    while changed:
        changed = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in found:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in found:
                found.add(int(entry))
                changed = True
    return found


def test_password_never_in_argv(store: RunningServer, home: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 4 * MiB, 1)
    store.faults.delay(1.0, match="/drives/upload")  # keeps the process alive to be looked at
    env = {**os.environ, **store.env}
    proc = subprocess.Popen([*DRIVEPIPE, "upload", str(image), "--endpoint", store.base_url,
                             "--progress", "plain"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = 0
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            seen += 1
            assert_clean(argv.decode(errors="replace"), store.username, store.password)
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert seen > 0
    assert_clean(out.decode() + err.decode(), store.username, store.password)


# --- output in every progress mode, errors, stats ----------------------------------------------


@pytest.mark.parametrize("mode", ["none", "plain", "json", "rich"])
def test_password_never_in_progress_or_stats(
    store: RunningServer, cli: Cli, tmp_path: Path, mode: str
) -> None:
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 2)
    code, out, err = cli("upload", str(image), "--endpoint", store.base_url, "--progress", mode,
                         env=store.env)
    assert code == 0, err
    uuid = out.strip()
    code, out2, err2 = cli("upload", str(image), "--chunked", "--chunk-size", "1M",
                           "--endpoint", store.base_url, "--progress", mode, env=store.env)
    assert code == 0, err2
    target = tmp_path / "back.raw"
    code, out3, err3 = cli("download", uuid, "-o", str(target), "--endpoint", store.base_url,
                           "--progress", mode, env=store.env)
    assert code == 0, err3
    everything = "".join((out, err, out2, err2, out3, err3))
    assert_clean(everything, store.username, store.password)
    if mode == "json":
        summaries = [json.loads(line) for line in (err + err2 + err3).splitlines()
                     if line.startswith("{") and '"summary"' in line]
        assert summaries, "json mode prints a stats summary"
        assert_clean(json.dumps(summaries), store.username, store.password)


def test_password_never_in_error_lines(
    store: RunningServer, cli: Cli, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 3)
    wrong = "Wr0ng-" + store.password[::-1]
    runs = {
        "wrong password": (["upload", str(image), "--endpoint", store.base_url],
                           {**store.env, "CLOUDSIGMA_PASSWORD": wrong}),
        "wrong password, chunked": (["upload", str(image), "--chunked", "--endpoint",
                                     store.base_url],
                                    {**store.env, "CLOUDSIGMA_PASSWORD": wrong}),
        "wrong password, download": (["download", "00000000-0000-4000-8000-000000000000",
                                      "-o", str(tmp_path / "x"), "--endpoint", store.base_url],
                                     {**store.env, "CLOUDSIGMA_PASSWORD": wrong}),
        "unreachable": (["upload", str(image), "--endpoint", "http://127.0.0.1:9/"], store.env),
        "missing drive": (["download", "00000000-0000-4000-8000-000000000000", "-o",
                           str(tmp_path / "y"), "--endpoint", store.base_url], store.env),
    }
    for what, (argv, env) in runs.items():
        if what == "missing drive":
            store.faults.fail_next(8, status=503)
        code, out, err = cli(*argv, "--progress", "plain", env=env)
        store.faults.clear()
        assert code != 0 and one_error_line(err), (what, err)
        assert_clean(out + err, store.username, store.password)
        assert_clean(out + err, store.username, wrong)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl CLI")
def test_store_log_never_holds_the_password(tmp_path: Path) -> None:
    """``drivepipe serve`` logs every request: never the credentials it was sent."""
    password = "serve-Secret-7731"
    env = {**os.environ, "CLOUDSIGMA_USERNAME": "u@example.com",
           "CLOUDSIGMA_PASSWORD": password}
    proc = subprocess.Popen([*DRIVEPIPE, "serve", "--root", str(tmp_path / "root"), "--port",
                             "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        for pw in (password, "not-" + password):
            token = base64.b64encode(f"u@example.com:{pw}".encode()).decode()
            subprocess.run(["curl", "-s", "-o", "/dev/null", "-H",
                            f"Authorization: Basic {token}", f"{base}drives/"],
                           check=True, timeout=10)
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"{base}drives/?p={pw}"],
                           check=True, timeout=10)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "GET" in err, "the store logged its requests"
    for pw in (password, "not-" + password):
        # the query string is the client's own doing; the Basic token must never show
        logged = re.sub(r"\?p=[^ \"]*", "", err)
        assert_clean(logged, "u@example.com", pw)


# --- config file permissions -------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "warns"), [(0o644, True), (0o640, True), (0o604, True),
                                             (0o600, False), (0o400, False)])
def test_config_readable_by_others_warns(
    store: RunningServer, home: Path, tmp_path: Path, mode: int, warns: bool
) -> None:
    conf = home / ".cloudsigma.conf"
    conf.write_text(f"api_endpoint = {store.base_url}\nusername = {store.username}\n"
                    f"password = {store.password}\n")
    conf.chmod(mode)
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSIGMA")}
    env["HOME"] = str(home)
    out = subprocess.run([*DRIVEPIPE, "upload", str(image), "--progress", "none"], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert ("readable by other users" in out.stderr) == warns, out.stderr
    assert ("chmod 600" in out.stderr) == warns
    assert_clean(out.stdout + out.stderr, store.username, store.password)


# --- plain http to a non-loopback host ---------------------------------------------------------


#: where a password may go over plain http without --insecure-http (https, loopback)
PASSWORD_OK_URLS = ["https://zrh.cloudsigma.com/api/2.0/", "http://127.0.0.1:8765/api/2.0/",
                    "http://127.0.0.2/api/2.0/", "http://localhost/api/2.0/",
                    "http://[::1]:80/api/2.0/"]
#: plain http elsewhere, including names and addresses that only look like loopback
PASSWORD_REFUSED_URLS = [
    "http://zrh.cloudsigma.com/api/2.0/",
    "http://example.invalid/api/2.0/",
    "http://192.0.2.7/api/2.0/",
    "http://127.evil.example/api/2.0/",
    "http://127.0.0.1.nip.example/api/2.0/",
    "http://[::ffff:8.8.8.8]/api/2.0/",
]


@pytest.mark.parametrize(("url", "insecure", "allowed"), [
    *[(url, False, True) for url in PASSWORD_OK_URLS],
    *[(url, False, False) for url in PASSWORD_REFUSED_URLS],
    ("http://example.invalid/api/2.0/", True, True),
])
def test_plain_http_policy(url: str, insecure: bool, allowed: bool) -> None:
    tls = TlsOptions(insecure_http=insecure)
    if allowed:
        check_auth_transport(url, tls)
    else:
        with pytest.raises(ConfigError, match="refusing to send the password over plain http"):
            check_auth_transport(url, tls)
    assert is_loopback(url) == (allowed and not insecure and url.startswith("http://"))


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    started: list[Recorder] = []
    yield started
    for rec in started:
        rec.stop()


@pytest.mark.parametrize("command", ["upload", "download"])
def test_plain_http_refused_before_any_connection(
    cli: Cli, tmp_path: Path, recorders: list[Recorder], command: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a proxy that records: a connection attempt would show up there."""
    proxy = Recorder("127.0.0.1", lambda h: reply(h, 503, b"proxy")).start()
    recorders.append(proxy)
    monkeypatch.setenv("http_proxy", proxy.base)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 5)
    env = {"CLOUDSIGMA_USERNAME": "u@example.com", "CLOUDSIGMA_PASSWORD": "pw-Plain-1"}
    what = [str(image)] if command == "upload" else ["00000000-0000-4000-8000-000000000000",
                                                      "-o", str(tmp_path / "out")]
    argv = [command, *what, "--endpoint", "http://example.invalid/", "--progress", "none"]
    code, out, err = cli(*argv, env=env)
    assert code == 2 and one_error_line(err), err
    assert "refusing to send the password over plain http to example.invalid" in err
    assert proxy.seen == [], "a connection was attempted before the refusal"
    assert_clean(out + err, "u@example.com", "pw-Plain-1")
    # the flag is the only thing in the way: with it the request goes out (to the proxy)
    code, _, err = cli(*argv, "--insecure-http", env=env)
    assert code != 0 and proxy.seen, err
    assert proxy.authorized(), "with --insecure-http the credentials are sent"


# --- redirects to another host -------------------------------------------------------------------

UUID = "11111111-2222-4333-8444-555555555555"


def blob_server(data: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    """Serves ``data`` with single Range support (what the downloader asks for)."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        headers = {"Accept-Ranges": "bytes", "ETag": '"blob-1"',
                   "Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        if m:
            first = int(m.group(1))
            last = min(int(m.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            reply(h, 206, data[first : last + 1], headers)
        else:
            reply(h, 200, data, headers)

    return answer


def fake_api(data: bytes, elsewhere: str) -> Callable[[BaseHTTPRequestHandler], None]:
    """The API host: the drive's record, and redirects for its bytes."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith(f"/api/2.0/drives/{UUID}/download"):
            reply(h, 302, b"", {"Location": f"{elsewhere}/blob/{UUID}"})
        elif h.path.startswith(f"/api/2.0/drives/{UUID}/"):
            drive = {"uuid": UUID, "name": "d", "size": len(data), "status": "unmounted",
                     "media": "disk", "meta": {}}
            reply(h, 200, json.dumps(drive).encode(), {"Content-Type": "application/json"})
        elif h.path.startswith("/api/2.0/drives/upload"):
            reply(h, 307, b"", {"Location": f"{elsewhere}/upload/"})
        else:
            reply(h, 404, b"[]")

    return answer


@pytest.mark.parametrize("other_host", ["127.0.0.2", "127.0.0.1"])
def test_credentials_never_follow_a_redirect_to_another_origin(
    cli: Cli, tmp_path: Path, recorders: list[Recorder], other_host: str
) -> None:
    data = os.urandom(3 * MiB + 17)
    other = Recorder(other_host, blob_server(data)).start()
    api = Recorder("127.0.0.1", fake_api(data, other.base)).start()
    recorders.extend([other, api])
    env = {"CLOUDSIGMA_USERNAME": "u@example.com", "CLOUDSIGMA_PASSWORD": "pw-Redirect-2"}
    target = tmp_path / "out.raw"
    code, out, err = cli("download", UUID, "-o", str(target), "--endpoint", api.base,
                         "--progress", "none", env=env)
    assert code == 0, err
    assert target.read_bytes() == data
    assert api.authorized(), "the API host got the credentials"
    assert other.seen and other.authorized() == [], "credentials followed the redirect"
    # an upload answered with a redirect elsewhere: never re-sent there with credentials
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 6)
    code, out, err = cli("upload", str(image), "--endpoint", api.base, "--progress", "none",
                         env=env)
    assert code != 0 and one_error_line(err), err
    assert [s for s in other.authorized() if "upload" in s.path] == []
    assert_clean(out + err, "u@example.com", "pw-Redirect-2")


# --- files we leave behind: journals, partial downloads -----------------------------------------


def files_holding(root: Path, secrets: list[str]) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(s.encode() in data for s in secrets):
                found.append(path)
    return found


def test_journals_and_partial_files_hold_no_secret(
    store: RunningServer, cli: Cli, home: Path, tmp_path: Path
) -> None:
    """Interrupted runs keep their journals for a resume: never with the password."""
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 7)
    secrets = secrets_of(store.username, store.password)
    # a chunked upload stopped by a chunk that always fails
    store.faults.add(kind="status", status=400, count=0, match="/chunk/1/")
    code, _, err = cli("upload", str(image), "--chunked", "--chunk-size", "1M", "--endpoint",
                       store.base_url, "--progress", "json", env=store.env)
    store.faults.clear()
    assert code != 0 and one_error_line(err), err
    journals = [p for p in home.rglob("*") if p.is_file()]
    assert journals, "the interrupted chunked upload kept a journal"
    # a download cut short on every try
    code, out, err = cli("upload", str(image), "--endpoint", store.base_url, "--progress",
                         "none", env=store.env)
    assert code == 0, err
    store.faults.add(kind="cut_download", after=100 << 10, count=0, match="/direct/")
    target = tmp_path / "out.raw"
    code, _, err = cli("download", out.strip(), "-o", str(target), "--endpoint", store.base_url,
                       "--retries", "1", "--retry-delay", "0.01", "--range-size", "1M",
                       "--block-size", "1M", "--progress", "json", env=store.env)
    assert code != 0 and one_error_line(err), err
    assert Path(f"{target}.part").exists()
    assert files_holding(home, secrets) == []
    assert files_holding(tmp_path, secrets) == []


@pytest.mark.parametrize(("mode", "works"), [(0o600, True), (0o644, False)])
def test_netrc_readable_by_others_is_refused_without_echo(
    store: RunningServer, cli: Cli, home: Path, tmp_path: Path, mode: int, works: bool
) -> None:
    netrc = home / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {store.username} password {store.password}\n")
    netrc.chmod(mode)
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 8)
    code, out, err = cli("upload", str(image), "--endpoint", store.base_url, "--progress",
                         "none")
    if works:
        assert code == 0, err
    else:
        assert code == 2 and one_error_line(err) and "netrc" in err, err
        assert store.store.list() == []
    assert_clean(out + err, store.username, store.password)

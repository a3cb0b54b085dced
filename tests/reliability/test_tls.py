"""TLS: verification on by default, against the local store serving HTTPS.

A throwaway CA (trustme) signs the store's certificate.  Refused, each in one
line and with no drive or output file left: no ``--cacert`` (the system CAs do
not know ours), the wrong CA, a certificate for another host name, an expired
certificate.  With ``--cacert`` the direct upload, the chunked upload and the
download work and verify.  ``drivepipe serve --tls-cert/--tls-key`` serves
HTTPS that the CLI (and curl) accept with the CA.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from rel_support import Cli, MiB, drive_holds, make_image, one_error_line
from store_servers import MakeStore

from drivepipe.server import RunningServer

pytestmark = pytest.mark.timeout(60)


@dataclass
class Pems:
    cert: Path
    key: Path
    ca: Path


def issue(tmp: Path, name: str, ca: trustme.CA, *hosts: str, **dates: datetime.datetime) -> Pems:
    leaf = ca.issue_cert(*hosts, **dates)
    pems = Pems(tmp / f"{name}-cert.pem", tmp / f"{name}-key.pem", tmp / f"{name}-ca.pem")
    leaf.cert_chain_pems[0].write_to_path(str(pems.cert))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(pems.cert), append=True)
    leaf.private_key_pem.write_to_path(str(pems.key))
    ca.cert_pem.write_to_path(str(pems.ca))
    return pems


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def good(tmp_path: Path, ca: trustme.CA) -> Pems:
    return issue(tmp_path, "good", ca, "127.0.0.1", "localhost")


@pytest.fixture
def tls_store(make_store: MakeStore, good: Pems) -> RunningServer:
    store = make_store(tls_cert=str(good.cert), tls_key=str(good.key))
    assert store.base_url.startswith("https://127.0.0.1:")
    return store


def upload(cli: Cli, store: RunningServer, image: Path, *extra: str,
           endpoint: str | None = None) -> tuple[int, str, str]:
    return cli("upload", str(image), "--endpoint", endpoint or store.base_url, "--progress",
               "none", *extra, env=store.env)


def test_cacert_makes_upload_chunked_upload_and_download_work(
    tls_store: RunningServer, cli: Cli, good: Pems, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "disk.raw", 3 * MiB, 1)
    code, out, err = upload(cli, tls_store, image, "--cacert", str(good.ca))
    assert code == 0, err
    uuid = out.strip()
    assert drive_holds(tls_store, uuid, image)
    code, out2, err = upload(cli, tls_store, image, "--cacert", str(good.ca), "--chunked",
                             "--chunk-size", "1M")
    assert code == 0, err
    assert drive_holds(tls_store, out2.strip(), image)
    target = tmp_path / "back.raw"
    code, _, err = cli("download", uuid, "-o", str(target), "--endpoint", tls_store.base_url,
                       "--cacert", str(good.ca), "--progress", "none", env=tls_store.env)
    assert code == 0, err
    data = target.read_bytes()
    assert data[: image.stat().st_size] == image.read_bytes()


def assert_refused(code: int, out: str, err: str, store: RunningServer, words: str) -> None:
    assert code == 6 and out == "" and one_error_line(err), err
    assert words in err, err
    assert store.store.list() == []
    assert store.password not in err


def test_no_cacert_is_refused(tls_store: RunningServer, cli: Cli, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 2)
    code, out, err = upload(cli, tls_store, image)
    assert_refused(code, out, err, tls_store, "TLS certificate not trusted")


def test_wrong_ca_is_refused(tls_store: RunningServer, cli: Cli, tmp_path: Path) -> None:
    other = issue(tmp_path, "other", trustme.CA(), "127.0.0.1")
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 3)
    for extra in ((), ("--chunked",)):
        code, out, err = upload(cli, tls_store, image, "--cacert", str(other.ca), *extra)
        assert_refused(code, out, err, tls_store, "TLS certificate not trusted")
    code, out, err = cli("download", "00000000-0000-4000-8000-000000000000", "-o",
                         str(tmp_path / "out"), "--endpoint", tls_store.base_url, "--cacert",
                         str(other.ca), "--progress", "none", env=tls_store.env)
    assert code == 6 and one_error_line(err) and "not trusted" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()


@pytest.mark.parametrize(("hosts", "endpoint_host"), [
    (("other.example",), "127.0.0.1"),
    (("localhost",), "127.0.0.1"),  # a name is not the address it resolves to
    (("127.0.0.2",), "127.0.0.1"),
])
def test_wrong_host_name_is_refused(
    make_store: MakeStore, ca: trustme.CA, cli: Cli, tmp_path: Path,
    hosts: tuple[str, ...], endpoint_host: str,
) -> None:
    pems = issue(tmp_path, "wrong", ca, *hosts)
    store = make_store(tls_cert=str(pems.cert), tls_key=str(pems.key))
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 4)
    endpoint = store.base_url.replace("127.0.0.1", endpoint_host)
    code, out, err = upload(cli, store, image, "--cacert", str(pems.ca), endpoint=endpoint)
    assert code == 6 and out == "" and one_error_line(err), err
    assert store.store.list() == []


def test_expired_certificate_is_refused(
    make_store: MakeStore, ca: trustme.CA, cli: Cli, tmp_path: Path
) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    pems = issue(tmp_path, "old", ca, "127.0.0.1", not_before=past - datetime.timedelta(days=1),
                 not_after=past)
    store = make_store(tls_cert=str(pems.cert), tls_key=str(pems.key))
    image = make_image(tmp_path / "disk.raw", 2 * MiB, 5)
    code, out, err = upload(cli, store, image, "--cacert", str(pems.ca))
    assert code == 6 and out == "" and one_error_line(err), err
    assert store.store.list() == []


def test_serve_command_serves_https(good: Pems, tmp_path: Path, home: Path) -> None:
    env = {**os.environ, "CLOUDSIGMA_USERNAME": "tls@example.com",
           "CLOUDSIGMA_PASSWORD": "tls-Secret-5", "HOME": str(home)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("drivepipe")), "serve", "--root",
         str(tmp_path / "root"), "--port", "0", "--min-size", "1M", "--quiet",
         "--tls-cert", str(good.cert), "--tls-key", str(good.key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        assert base.startswith("https://127.0.0.1:"), base
        image = make_image(tmp_path / "disk.raw", 2 * MiB, 6)
        run = [str(Path(sys.executable).with_name("drivepipe")), "upload", str(image),
               "--endpoint", base, "--progress", "none"]
        refused = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30,
                                 check=False)
        assert refused.returncode == 6 and "not trusted" in refused.stderr
        done = subprocess.run([*run, "--cacert", str(good.ca)], env=env, capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        uuid = done.stdout.strip()
        target = tmp_path / "back.raw"
        back = subprocess.run(
            [str(Path(sys.executable).with_name("drivepipe")), "download", uuid, "-o",
             str(target), "--endpoint", base, "--cacert", str(good.ca), "--progress", "none"],
            env=env, capture_output=True, text=True, timeout=30, check=False)
        assert back.returncode == 0, back.stderr
        assert target.read_bytes()[: image.stat().st_size] == image.read_bytes()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_serve_refuses_a_key_without_a_certificate(good: Pems, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("drivepipe")), "serve", "--root",
         str(tmp_path / "root"), "--port", "0", "--tls-key", str(good.key)],
        capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 2 and one_error_line(out.stderr), out.stderr

"""``drivepipe copy SRC DST`` against real local stores: every pair round-trips.

Drive to drive runs between two stores (two "locations"): the download's ranges
stream, verified against the source drive's meta as they flow, into one upload
of the same size; a source whose bytes no longer match its meta leaves no drive
at the destination.  An image to a drive is an upload, a drive to a file or to
standard output a download, an image to a file a convert that needs no endpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from store_servers import MakeStore, use_account
from test_download_nginx import Nginx
from test_download_nginx import nginx as download_nginx  # noqa: F401 - a fixture, by this name

from drivepipe.cli import main
from drivepipe.server import RunningServer

MiB = 1 << 20


def image(path: Path) -> bytes:
    """8 MiB: random data, zeros, a 1 MiB hole, data again (made by qemu-img below)."""
    data = bytearray(os.urandom(3 * MiB)) + bytes(3 * MiB) + bytearray(os.urandom(2 * MiB))
    path.write_bytes(bytes(data))
    return bytes(data)


def run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(["copy", "--progress", "none", *args])
    out, err = capfd.readouterr()
    return code, out.strip(), err


def drive_bytes(server: RunningServer, uuid: str, size: int) -> bytes:
    with open(server.store.raw_path(uuid), "rb") as f:
        return f.read(size)


@pytest.fixture
def two_stores(make_drive_store: MakeStore, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[RunningServer, RunningServer]:
    """Two stores with one account (two locations), the account in the environment."""
    here, there = make_drive_store(), make_drive_store()
    use_account(monkeypatch, tmp_path / "home", here)
    return here, there


def test_image_to_drive_to_drive_to_file_across_two_stores(
    two_stores: tuple[RunningServer, RunningServer], tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    here, there = two_stores
    raw = tmp_path / "disk.raw"
    content = image(raw)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], check=True)

    code, first, err = run(capfd, "--endpoint", here.base_url, str(qcow2), "drive:web")
    assert code == 0, err
    assert drive_bytes(here, first, len(content)) == content

    code, second, err = run(capfd, "--endpoint", here.base_url, "--to-endpoint",
                            there.base_url, f"drive:{first}", "drive:web-copy")
    assert code == 0, err
    record = there.store.get(second)
    assert second not in {r.uuid for r in here.store.list()}
    assert drive_bytes(there, second, len(content)) == content
    assert record.meta["drivepipe_xxh128"] == xxhash.xxh3_128_hexdigest(content)

    out = tmp_path / "back.raw"
    code, printed, err = run(capfd, "--endpoint", there.base_url, second, str(out))
    assert code == 0, err
    assert printed == str(out) and out.read_bytes() == content


def test_drive_to_drive_refuses_a_source_that_does_not_match_its_meta(
    two_stores: tuple[RunningServer, RunningServer], tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    here, there = two_stores
    image(tmp_path / "disk.raw")
    raw = tmp_path / "disk.raw"
    code, uuid, err = run(capfd, "--endpoint", here.base_url, str(raw), "drive:")
    assert code == 0, err
    with open(here.store.raw_path(uuid), "r+b") as f:  # the stored bytes rot
        f.seek(5 * MiB + 17)
        f.write(b"\x01")
    code, out, err = run(capfd, "--endpoint", here.base_url, "--to-endpoint", there.base_url,
                         f"drive:{uuid}", "drive:rotten")
    assert code == 7, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert there.store.list() == [], "a copy that did not verify left a drive"


def test_image_to_file_needs_no_endpoint_and_drive_to_stdout_streams(
    drive_store: RunningServer, tmp_path: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_account(monkeypatch, tmp_path / "home", drive_store)
    raw = tmp_path / "disk.raw"
    content = image(raw)
    xz = tmp_path / "disk.raw.xz"
    subprocess.run(["xz", "-k", "-T2", "--block-size=2MiB", str(raw)], check=True)
    os.replace(str(raw) + ".xz", xz)
    code, printed, err = run(capfd, str(xz), str(tmp_path / "out.raw"))
    assert code == 0, err
    assert printed == str(tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == content

    code, uuid, err = run(capfd, "--endpoint", drive_store.base_url, str(xz), "drive:xz")
    assert code == 0, err
    # a drive to standard output, in order, into a real pipe
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    child = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "drivepipe"), "copy", "--progress",
         "none", "--endpoint", drive_store.base_url, f"drive:{uuid}", "-"], env=env,
        capture_output=True, check=False, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout == content


def test_a_copy_into_an_existing_drive_is_refused(drive_store: RunningServer, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    use_account(monkeypatch, tmp_path / "home", drive_store)
    raw = tmp_path / "disk.raw"
    image(raw)
    code, _, err = run(capfd, "--endpoint", drive_store.base_url, str(raw),
                       "drive:00000000-0000-4000-8000-000000000000")
    assert code == 2 and "new drive" in err
    assert drive_store.store.list() == []


@pytest.mark.parametrize("announced", [3 * MiB, 3 * MiB - 1, 3 * MiB + 1])
def test_a_sized_pipe_streams_and_a_wrong_size_leaves_nothing(tmp_path: Path,
                                                              announced: int) -> None:
    data = os.urandom(3 * MiB)
    out = tmp_path / "out.raw"
    child = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "drivepipe"), "copy", "--progress",
         "none", "--size", str(announced), "-", str(out)], input=data, capture_output=True,
        check=False, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    if announced == len(data):
        assert child.returncode == 0, child.stderr
        assert out.read_bytes() == data
    else:
        assert child.returncode == 4, child.stderr
        assert len(child.stderr.decode().strip().splitlines()) == 1
        assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/usr/sbin/nginx"), reason="needs nginx")
def test_a_url_to_a_file_and_to_a_drive(download_nginx: Nginx, drive_store: RunningServer,  # noqa: F811
                                        tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a qcow2 at a URL is read through ranges: its raw disk lands in a file, or in a drive
    raw = tmp_path / "disk.raw"
    content = image(raw)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw),
                    str(download_nginx.www / "copy.qcow2")], check=True)
    url = download_nginx.url("/files/copy.qcow2")
    out = tmp_path / "from-url.raw"
    code, printed, err = run(capfd, url, str(out))
    assert code == 0, err
    assert printed == str(out) and out.read_bytes() == content
    use_account(monkeypatch, tmp_path / "home", drive_store)
    code, uuid, err = run(capfd, "--endpoint", drive_store.base_url, url, "drive:")
    assert code == 0, err
    assert drive_bytes(drive_store, uuid, len(content)) == content
    assert drive_store.store.get(uuid).name == "copy.qcow2"

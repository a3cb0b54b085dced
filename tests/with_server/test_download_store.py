"""``drivepipe download UUID`` against the local drive store (real HTTP on 127.0.0.1).

The store answers the download link with a redirect to a signed URL on the same
server; these tests check the round trip, the verification against the meta
our upload writes (``drivepipe_xxh128`` over ``drivepipe_size`` bytes, zeros
after it), corruption in the store, and the store's injected faults (503 bursts,
connections dropped mid-body, bodies cut short).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import xxhash
from tmpfs import needs_root, resize, small_tmpfs

from drivepipe._remote import Auth
from drivepipe.cli import main
from drivepipe.cloudsigma.config import Credentials, resolve_endpoint
from drivepipe.jobs.download import DownloadOptions
from drivepipe.jobs.download import download as library_download
from drivepipe.server import RunningServer

MiB = 1 << 20
PutDrive = Callable[[RunningServer, bytes | Path], str]


@pytest.fixture
def cli_env(drive_store: RunningServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
            ) -> Path:
    """Credentials of the store in the environment, cwd in an empty directory."""
    for key in list(os.environ):
        if key.startswith(("CLOUDSIGMA_", "DRIVEPIPE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CLOUDSIGMA_CONFIG", str(tmp_path / "none.conf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in drive_store.env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    return out


def download(store: RunningServer, uuid: str, *args: str) -> int:
    return main(["download", uuid, "--endpoint", store.base_url, "--progress", "none",
                 "--retry-delay", "0.02", *args])


def sparse_image(path: Path, size: int, seed: int, pieces: int = 10) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(pieces):
            f.seek(rng.randrange(0, size - MiB) // 4096 * 4096)
            f.write(rng.randbytes(rng.randint(1000, MiB)))
    return path


def put_with_meta(store: RunningServer, put_drive: PutDrive, data: bytes) -> str:
    """A drive holding ``data`` with the meta ``drivepipe upload`` stores; its UUID."""
    uuid = put_drive(store, data)
    set_meta(store, uuid, data)
    return uuid


def set_meta(store: RunningServer, uuid: str, data: bytes) -> None:
    """What ``drivepipe upload`` stores after sending ``data``."""
    rec = store.store.get(uuid)
    store.store.update(uuid, name=rec.name, size=rec.size, media=rec.media,
                       meta={"drivepipe_xxh128": xxhash.xxh3_128_hexdigest(data),
                             "drivepipe_size": str(len(data))})


def sparse_drive(store: RunningServer, put_drive: PutDrive, tmp_path: Path, size: int,
                 seed: int, pieces: int = 10) -> tuple[str, Path]:
    """A drive of a random sparse image with the meta our upload stores; and the image."""
    src = sparse_image(tmp_path / "src.raw", size, seed, pieces)
    uuid = put_drive(store, src)
    set_meta(store, uuid, src.read_bytes())
    return uuid, src


def kill_after_blocks(proc: subprocess.Popen[bytes], journal: Path, blocks: int) -> int:
    """SIGKILL ``proc`` once its journal lists ``blocks`` blocks; the blocks it kept."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            if len(json.loads(journal.read_text())["blocks"]) >= blocks:
                break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return len(json.loads(journal.read_text())["blocks"])


def test_uuid_round_trip_verified_against_meta(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    uuid, src = sparse_drive(drive_store, put_drive, tmp_path, 40 * MiB, 1)
    assert download(drive_store, uuid, "--range-size", "8M", "--block-size", "1M") == 0
    out, err = capsys.readouterr()
    assert out == f"{uuid}\n"
    assert "no checksum" not in err
    got = cli_env / uuid
    assert got.read_bytes() == src.read_bytes()
    assert got.stat().st_blocks * 512 < 16 * MiB


def test_drive_grown_to_minimum_verifies_prefix_and_zero_tail(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(2).randbytes(300_000)
    uuid = put_with_meta(drive_store, put_drive, data)
    size = drive_store.store.get(uuid).size
    assert size > len(data)  # grown to the store's minimum
    assert download(drive_store, uuid, "-o", "small.img") == 0
    got = (cli_env / "small.img").read_bytes()
    assert got[: len(data)] == data and not any(got[len(data):])
    out, err = capsys.readouterr()
    assert out == "small.img\n"
    # and it says what was verified
    assert f"the first {len(data)} bytes verified against the drive's meta" in err
    assert f"the other {size - len(data)} bytes" in err and "are zeros" in err


def test_nonzero_byte_after_the_uploaded_size_is_caught(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(3).randbytes(200_000)
    uuid = put_drive(drive_store, data + bytes(100) + b"\x01")
    set_meta(drive_store, uuid, data)
    assert download(drive_store, uuid) == 7
    err = capsys.readouterr().err
    assert f"byte {len(data) + 100} is not zero" in err
    assert not (cli_env / uuid).exists() and (cli_env / f"{uuid}.part").exists()


def test_corrupted_byte_in_the_store_is_caught(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    src = sparse_image(tmp_path / "src.raw", 12 * MiB, seed=4)
    data = src.read_bytes()
    uuid = put_drive(drive_store, src)
    set_meta(drive_store, uuid, data)
    offset = next(i for i in range(3 * MiB, len(data)) if data[i])
    with open(drive_store.store.raw_path(uuid), "r+b") as f:
        f.seek(offset)
        f.write(bytes([data[offset] ^ 0x40]))
    assert download(drive_store, uuid, "--block-size", "1M") == 7
    out, err = capsys.readouterr()
    assert out == ""
    assert "does not match" in err and "the drive's meta" in err
    assert err.count("\n") == 1
    assert not (cli_env / uuid).exists()
    assert (cli_env / f"{uuid}.part").exists()


def test_transient_faults_are_retried(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uuid, src = sparse_drive(drive_store, put_drive, tmp_path, 24 * MiB, 5, 20)
    faults = drive_store.faults
    faults.fail_next(3, status=503, match="/direct/")
    faults.drop_download_after(3 * MiB + 5, count=2, match="/direct/")
    faults.cut_download_after(MiB // 2, count=1, match="/direct/")
    assert download(drive_store, uuid, "--range-size", "8M", "--block-size", "1M",
                    "--progress", "json") == 0
    assert (cli_env / uuid).read_bytes() == src.read_bytes()
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["ok"]
    receive = summary["stages"][0]
    # the probe absorbed the 503s and used up one drop fault (its 1-byte answer is
    # shorter than the drop point); the other drop and the cut were retried as ranges
    assert receive["name"] == "receive" and receive["retries"] >= 2


def test_expired_signed_link_is_renewed(
    make_drive_store: Callable[..., RunningServer], put_drive: PutDrive,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    store = make_drive_store(link_ttl=2)  # links live 1 to 2 s (whole-second expiry)
    for key, value in store.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    data = random.Random(7).randbytes(4 * MiB)
    uuid = put_with_meta(store, put_drive, data)
    # every signed-link request waits 0.45 s before its link is checked: a fresh link
    # survives the probe and one range (0.9 s), and is dead by the fourth range (2.25 s)
    store.faults.delay(0.45, count=0, match="/direct/")
    assert download(store, uuid, "--connections", "1", "--range-size", "1M",
                    "--block-size", "1M", "--progress", "json") == 0
    assert (tmp_path / uuid).read_bytes() == data
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["stages"][0]["relinks"] >= 1


def test_sigkill_then_rerun_fetches_only_the_rest(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    size, block = 24 * MiB, 512 << 10
    uuid, src = sparse_drive(drive_store, put_drive, tmp_path, size, 8, 30)
    drive_store.faults.delay(0.15, count=0, match="/direct/")  # slow enough to kill midway
    args = ["download", uuid, "--endpoint", drive_store.base_url, "--progress", "none",
            "--range-size", "1M", "--block-size", "512K", "--connections", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
         *args, "--checkpoint-interval", "0.1"],
        cwd=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = cli_env / f"{uuid}.part.journal"
    want = random.Random().randint(2, 24)  # at most half: the end stays far enough away
    kept = kill_after_blocks(proc, journal, want)
    assert 0 < kept < size // block
    drive_store.faults.clear()
    assert main([*args[:4], "--progress", "json", *args[6:]]) == 0
    assert (cli_env / uuid).read_bytes() == src.read_bytes()
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == ["receive", "verify", "write"]
    # only what was missing came over the wire; the kept blocks flowed from the disk
    assert stages["receive"]["received"] == size - kept * block
    assert stages["write"]["kept"] == kept * block
    assert stages["verify"]["bytes"] == size


def test_download_over_tls_with_a_private_ca(
    tls_drive_store: Any, put_drive: PutDrive, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    store = tls_drive_store.server
    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    data = random.Random(9).randbytes(3 * MiB)
    uuid = put_with_meta(store, put_drive, data)
    assert download(store, uuid) == 6
    assert "not trusted" in capsys.readouterr().err
    assert download(store, uuid, "--cacert", str(tls_drive_store.ca_pem), "--connections", "2",
                    "--range-size", "1M", "--block-size", "1M") == 0
    assert (tmp_path / uuid).read_bytes()[: len(data)] == data


def test_persistent_503_gives_up_with_one_line(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uuid = put_drive(drive_store, random.Random(6).randbytes(100_000))
    drive_store.faults.add(kind="status", status=503, count=0, match="/direct/")
    assert download(drive_store, uuid, "--retries", "2") == 6
    err = capsys.readouterr().err
    assert "HTTP 503" in err and err.count("\n") == 1
    assert not (cli_env / uuid).exists()


def test_wrong_password_is_one_line(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    uuid = put_drive(drive_store, b"x" * 5000)
    monkeypatch.setenv("CLOUDSIGMA_PASSWORD", "wrong-password")
    assert download(drive_store, uuid) == 6
    err = capsys.readouterr().err
    assert "authentication refused" in err and "wrong-password" not in err
    assert list(cli_env.iterdir()) == []


def test_the_drives_own_api_url_is_verified_against_its_meta(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = sparse_image(tmp_path / "src.raw", 4 * MiB, seed=4)
    uuid = put_drive(drive_store, src)
    wrong = bytearray(src.read_bytes())
    wrong[5] ^= 1
    set_meta(drive_store, uuid, bytes(wrong))  # meta that the bytes cannot match
    url = f"{drive_store.base_url}drives/{uuid}/download/"
    assert download(drive_store, url, "-o", "by-url.img") == 7
    assert "drive's meta" in capsys.readouterr().err
    set_meta(drive_store, uuid, src.read_bytes())
    assert download(drive_store, url, "-o", "by-url.img") == 0
    err = capsys.readouterr().err
    assert "no checksum" not in err
    assert (cli_env / "by-url.img").read_bytes() == src.read_bytes()


def test_a_fresh_signed_link_resumes_the_same_part(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    size, block = 8 * MiB, 512 << 10
    src = sparse_image(tmp_path / "src.raw", size, seed=9, pieces=20)
    uuid = put_drive(drive_store, src)

    def signed_link() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", drive_store.port, timeout=10)
        auth = base64.b64encode(f"{drive_store.username}:{drive_store.password}".encode())
        conn.request("GET", f"/api/2.0/drives/{uuid}/download/",
                     headers={"Authorization": f"Basic {auth.decode()}"})
        resp = conn.getresponse()
        assert resp.status == 302
        location = resp.getheader("Location") or ""
        conn.close()
        return urljoin(drive_store.base_url, location)

    first = signed_link()
    out = cli_env / "s.img"
    drive_store.faults.delay(0.15, count=0, match="/direct/")  # slow enough to kill midway
    args = ["-o", str(out), "--block-size", "512K", "--range-size", "512K",
            "--connections", "1", "--endpoint", drive_store.base_url]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from drivepipe.cli import console_main; console_main()",
         "download", first, *args, "--progress", "none", "--checkpoint-interval", "0.1"],
        cwd=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = cli_env / "s.img.part.journal"
    kept = kill_after_blocks(proc, journal, 3)
    assert 0 < kept < size // block
    drive_store.faults.clear()
    time.sleep(1.1)  # the next link expires a second later: its query differs
    second = signed_link()
    assert second != first
    capsys.readouterr()
    assert main(["download", second, *args, "--progress", "json"]) == 0
    err = capsys.readouterr().err
    assert "starting over" not in err
    summary = [json.loads(line) for line in err.splitlines() if line.startswith("{")][-1]
    assert summary["event"] == "summary"
    assert summary["stages"][-1]["kept"] == kept * block, err
    assert out.read_bytes() == src.read_bytes()


@needs_root
def test_a_full_disk_keeps_the_journaled_blocks_and_the_rerun_goes_on(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(10).randbytes(12 * MiB)
    uuid = put_with_meta(drive_store, put_drive, data)
    with small_tmpfs(tmp_path / "small", "5m") as small:
        out = small / "d.raw"
        args = ["-o", str(out), "--block-size", "1M", "--range-size", "2M"]
        assert download(drive_store, uuid, *args) == 5
        warning, error = capsys.readouterr().err.splitlines()
        assert "5.0 MiB free, up to 12.0 MiB still to write" in warning  # said up front
        assert error.startswith("drivepipe: error: ") and "no space left on device" in error
        assert "run the same command again" in error
        kept = json.loads((small / "d.raw.part.journal").read_text())["blocks"]
        assert 0 < len(kept) < 12
        resize(small, "20m")
        assert download(drive_store, uuid, *args, "--progress", "json") == 0
        summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        stages = {stage["name"]: stage for stage in summary["stages"]}
        assert stages["write"]["kept"] == len(kept) * MiB
        assert stages["receive"]["received"] == len(data) - len(kept) * MiB
        assert out.read_bytes() == data


def test_the_library_call_prints_nothing_and_leaves_signals_alone(
    drive_store: RunningServer, put_drive: PutDrive, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(11).randbytes(2 * MiB)
    uuid = put_with_meta(drive_store, put_drive, data)
    auth = Auth(resolve_endpoint(drive_store.base_url, None, None),
                Credentials(drive_store.username, drive_store.password))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: list[object] = []

    def spy(signum: int, frame: object) -> None:
        seen.append(signum)

    with contextlib.ExitStack() as restore:
        for sig in handlers:  # a handler installed now would replace this one
            previous = signal.signal(sig, spy)
            restore.callback(signal.signal, sig, previous)
        notes: list[str] = []
        got = library_download(uuid, str(tmp_path / "lib.img"), auth=auth,
                               options=DownloadOptions(range_size=MiB), notify=notes.append)
        assert all(signal.getsignal(sig) is spy for sig in handlers)
    assert capsys.readouterr() == ("", "")
    assert got.output == str(tmp_path / "lib.img") and got.kind == "file"
    assert got.size == len(data) and got.xxh128 == xxhash.xxh3_128_hexdigest(data)
    assert got.expected is not None and got.expected.origin == "the drive's meta"
    assert (got.kept, got.received, got.uuid) == (0, len(data), uuid)
    assert (tmp_path / "lib.img").read_bytes() == data and notes == []


def test_the_output_is_written_around_the_page_cache_unless_told_not_to(
    drive_store: RunningServer, put_drive: PutDrive, cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = random.Random(21).randbytes(40 * MiB)
    uuid = put_with_meta(drive_store, put_drive, data)

    def direct_bytes(*flags: str) -> int:
        (cli_env / uuid).unlink(missing_ok=True)
        assert download(drive_store, uuid, "--progress", "json", *flags) == 0
        assert (cli_env / uuid).read_bytes() == data
        summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        return int({s["name"]: s for s in summary["stages"]}["write"].get("direct", 0))

    probe = os.open(cli_env, os.O_TMPFILE | os.O_RDWR)
    try:
        os.close(os.open(f"/proc/self/fd/{probe}", os.O_WRONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    finally:
        os.close(probe)
    # all of it: the 16 MiB runs directly, the unaligned nothing (40 MiB is aligned)
    assert direct_bytes() == len(data)
    assert direct_bytes("--no-direct") == 0

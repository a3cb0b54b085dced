"""``drivepipe upload`` end to end: real pycurl, the real local drive store, real files.

Each upload is checked on the store's side: the drive file holds the image's
bytes, then zeros up to the store's minimum size; the store's record says how
many body bytes arrived (the exact Content-Length: the store refuses chunked
bodies and short ones).  Failures must leave no drive behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from drivepipe._errors import CorruptImage, SizeMismatch
from drivepipe._extent import ZERO, Extent, is_zero
from drivepipe._stage import ImageInput, Source
from drivepipe.cli import main
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection
from drivepipe.cloudsigma.upload import UploadOptions
from drivepipe.jobs.upload import UploadResult, upload
from drivepipe.transport.curl import TlsOptions
from drivepipe_plugins.targets.drive_upload import DirectUploadSink

MiB = 1 << 20


def direct_upload(image: ImageInput, ep: Endpoint, creds: Credentials) -> UploadResult:
    """The library upload of an opened image, in one POST, without meta."""
    tls = TlsOptions()
    conn = Connection(ep, creds, tls, ApiClient(ep, creds, tls))
    try:
        return upload(image, connection=conn, options=UploadOptions(meta=False))
    finally:
        conn.close()


# --- helpers -------------------------------------------------------------------------------


def drive_uuids(store: Any) -> set[str]:
    return {rec.uuid for rec in store.store.list()}


def data_spans(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Data ranges of ``fd`` within ``[start, end)`` as the filesystem reports them."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def assert_drive_holds(drive_path: str, image: Path) -> None:
    """The drive starts with the image's bytes; everything after is zeros."""
    size = image.stat().st_size
    with open(drive_path, "rb") as f:
        assert f.read(size) == image.read_bytes()
        total = os.fstat(f.fileno()).st_size
        assert total >= size
        for start, end in data_spans(f.fileno(), size, total):
            for pos in range(start, end, 8 * MiB):
                assert is_zero(os.pread(f.fileno(), min(8 * MiB, end - pos), pos)), pos


def xxh128_of(path: Path) -> str:
    """xxh3-128 of the file, by the xxhash library itself (not drivepipe's pipeline)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


def make_image(path: Path, size: int, pieces: list[tuple[int, int]], seed: int = 0) -> Path:
    """A sparse file of ``size`` bytes with random data at each (offset, length)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in pieces:
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path


def random_sparse(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    size = rng.randrange(3 * MiB, 24 * MiB)  # not a multiple of any block size, usually
    pieces = []
    for _ in range(rng.randrange(1, 12)):
        length = rng.randrange(1, 2 * MiB)
        pieces.append((rng.randrange(0, size - length), length))
    pieces.append((size - 1 - rng.randrange(0, 100), 1))  # data near the very end
    return make_image(path, size, pieces, seed)


class CliRun:
    """Runs the CLI in this process with a clean HOME and the store's account in env."""

    def __init__(self, store: Any, home: Path, capfd: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store
        self.capfd = capfd
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("CLOUDSIGMA_CONFIG", raising=False)
        monkeypatch.delenv("DRIVEPIPE_ENDPOINT", raising=False)
        monkeypatch.setenv("CLOUDSIGMA_USERNAME", store.username)
        monkeypatch.setenv("CLOUDSIGMA_PASSWORD", store.password)
        self.monkeypatch = monkeypatch

    def __call__(self, *args: str, endpoint: str | None = None) -> tuple[int, str, str]:
        self.capfd.readouterr()
        argv = ["upload", "--endpoint", endpoint or self.store.base_url, "--progress", "none",
                *args]
        code = main(argv)
        out, err = self.capfd.readouterr()
        return code, out, err


@pytest.fixture
def cli(drive_store: Any, tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> CliRun:
    home = tmp_path / "home"
    home.mkdir()
    return CliRun(drive_store, home, capfd, monkeypatch)


def upload_ok(cli: CliRun, image: Path, *args: str, endpoint: str | None = None) -> str:
    code, out, err = cli(str(image), *args, endpoint=endpoint)
    assert code == 0, err
    uuid = out.strip()
    assert out == uuid + "\n"  # stdout is the UUID and nothing else
    assert len(uuid) == 36
    return uuid


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_random_sparse_image_round_trips(cli: CliRun, drive_store: Any, tmp_path: Path,
                                         seed: int) -> None:
    image = random_sparse(tmp_path / "sparse.img", seed)
    uuid = upload_ok(cli, image)
    rec = drive_store.store.get(uuid)
    assert rec.image_size == image.stat().st_size  # exactly Content-Length bytes arrived
    assert_drive_holds(drive_store.store.raw_path(uuid), image)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl CLI")
def test_dense_image_round_trips_through_curl_download(cli: CliRun, drive_store: Any,
                                                       tmp_path: Path) -> None:
    size = 5 * MiB + 4097
    image = make_image(tmp_path / "dense.img", size, [(0, size)], seed=7)
    uuid = upload_ok(cli, image, "--buffer-size", "512K", "--read-size", "1M",
                     "--queue-depth", "2")
    assert_drive_holds(drive_store.store.raw_path(uuid), image)
    # Fetched back over HTTP with the curl CLI (credentials from a netrc file, not argv).
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {drive_store.username} "
                     f"password {drive_store.password}\n")
    netrc.chmod(0o600)
    back = tmp_path / "back.img"
    subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--location", "--netrc-file", str(netrc),
         "--range", f"0-{size - 1}", "--output", str(back),
         f"{drive_store.base_url}drives/{uuid}/download/"],
        check=True, timeout=60,
    )
    assert back.read_bytes() == image.read_bytes()


def test_image_of_only_holes(cli: CliRun, drive_store: Any, tmp_path: Path) -> None:
    image = make_image(tmp_path / "empty.img", 3 * MiB + 5, [])
    uuid = upload_ok(cli, image, "--no-meta")
    assert drive_store.store.get(uuid).image_size == 3 * MiB + 5
    assert_drive_holds(drive_store.store.raw_path(uuid), image)


# --- meta and name -------------------------------------------------------------------------


def test_meta_holds_checksum_and_size_and_other_fields_stay(cli: CliRun, drive_store: Any,
                                                            tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "m.img", 3)
    uuid = upload_ok(cli, image)
    rec = drive_store.store.get(uuid)
    assert rec.meta == {"drivepipe_xxh128": xxh128_of(image),
                        "drivepipe_size": str(image.stat().st_size)}
    assert rec.size == max(image.stat().st_size, drive_store.config.min_size)
    assert rec.media == "disk"
    assert rec.name  # the store's default name was kept


def test_name_is_set_and_no_meta_keeps_meta_empty(cli: CliRun, drive_store: Any,
                                                  tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "n.img", 4)
    uuid = upload_ok(cli, image, "--name", "my disk", "--no-meta")
    rec = drive_store.store.get(uuid)
    assert rec.name == "my disk"
    assert rec.meta == {}
    named = upload_ok(cli, image, "--name", "with meta")
    rec = drive_store.store.get(named)
    assert rec.name == "with meta"
    assert rec.meta["drivepipe_xxh128"] == xxh128_of(image)


def test_update_drive_keeps_other_meta_keys(drive_store: Any, tmp_path: Path) -> None:
    ep = Endpoint(drive_store.base_url, drive_store.base_url)
    with ApiClient(ep, Credentials(drive_store.username, drive_store.password)) as api:
        image = make_image(tmp_path / "k.img", MiB, [(0, 10)])
        uuid = upload_image(drive_store, image)
        api.update_drive(uuid, meta={"owner": "ops"})
        api.update_drive(uuid, meta={"drivepipe_size": "1"})
        assert drive_store.store.get(uuid).meta == {"owner": "ops", "drivepipe_size": "1"}


def upload_image(drive_store: Any, image: Path) -> str:
    from drivepipe._registry import open_image  # noqa: PLC0415 - only this helper needs it

    ep = Endpoint(drive_store.base_url, drive_store.base_url)
    creds = Credentials(drive_store.username, drive_store.password)
    return direct_upload(open_image(str(image)), ep, creds).uuid


# --- progress output -----------------------------------------------------------------------


def test_json_progress_has_summary_and_no_password(cli: CliRun, drive_store: Any,
                                                   tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "j.img", 5)
    code, out, err = cli(str(image), "--progress", "json")
    assert code == 0, err
    events = [json.loads(line) for line in err.splitlines()]
    assert events and all("event" in e for e in events)
    final = events[-1]
    assert final["event"] == "summary" and final["ok"] is True
    assert final["result"]["uuid"] == out.strip()
    assert final["result"]["size"] == image.stat().st_size
    assert {s["name"] for s in final["stages"]} >= {"send", "xxh3"}
    assert drive_store.password not in out + err


def test_plain_progress_has_no_password(cli: CliRun, drive_store: Any, tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "p.img", 6)
    code, out, err = cli(str(image), "--progress", "plain")
    assert code == 0, err
    assert "upload" in err and drive_store.password not in out + err


# --- failures: one line, non-zero exit, no drive ------------------------------------------


def assert_one_line_failure(code: int, out: str, err: str, *words: str) -> None:
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("drivepipe: error: ")
    for word in words:
        assert word in lines[0], lines[0]


def test_wrong_password(cli: CliRun, drive_store: Any, tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "w.img", 8)
    before = drive_uuids(drive_store)
    cli.monkeypatch.setenv("CLOUDSIGMA_PASSWORD", "wrong-" + drive_store.password)
    code, out, err = cli(str(image))
    assert_one_line_failure(code, out, err, "401")
    assert drive_store.password not in err
    assert drive_uuids(drive_store) == before


def test_unreachable_host(cli: CliRun, tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "u.img", 9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: connecting is refused.
    code, out, err = cli(str(image), endpoint=f"http://127.0.0.1:{port}/api/2.0/")
    assert_one_line_failure(code, out, err, "cannot connect", f"127.0.0.1:{port}")


def test_server_error_names_the_request(cli: CliRun, drive_store: Any, tmp_path: Path) -> None:
    # a 500 to a POST may have been acted on: not repeated (a 503 is, see test_retry_policy)
    image = random_sparse(tmp_path / "e.img", 10)
    before = drive_uuids(drive_store)
    drive_store.faults.fail_next(1, status=500, match="drives/upload")
    code, out, err = cli(str(image))
    assert_one_line_failure(code, out, err, "500", "[request ", "backend")
    assert drive_uuids(drive_store) == before


def test_upload_dropped_by_server(cli: CliRun, drive_store: Any, tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "d.img", 11)
    before = drive_uuids(drive_store)
    drive_store.faults.drop_upload_after(MiB, match="drives/upload")
    code, out, err = cli(str(image))
    assert_one_line_failure(code, out, err, "upload")
    assert drive_uuids(drive_store) == before


def test_missing_image_is_one_line(cli: CliRun, tmp_path: Path) -> None:
    code, out, err = cli(str(tmp_path / "nope.img"))
    assert_one_line_failure(code, out, err, "no such file")


@pytest.mark.parametrize("size", ["1K", "3M", "lots"])
def test_bad_buffer_size(cli: CliRun, tmp_path: Path, size: str) -> None:
    image = make_image(tmp_path / "b.img", MiB, [])
    code, out, err = cli(str(image), "--buffer-size", size)
    assert_one_line_failure(code, out, err)
    assert code == 2


# --- the stream lies about its size (Python API) -------------------------------------------


class ListSource(Source):
    """Yields the given extents and claims ``size`` bytes, whatever they add up to."""

    name = "list"

    def __init__(self, extents: list[Extent], size: int, fail_at: int | None = None) -> None:
        self._extents = extents
        self.size = size
        self._fail_at = fail_at

    def extents(self) -> Iterator[Extent]:
        for i, ext in enumerate(self._extents):
            if i == self._fail_at:
                raise CorruptImage("list: corrupt in the middle")
            yield ext


def pieces(total: int, step: int = MiB) -> list[Extent]:
    rng = random.Random(total)
    out = []
    for off in range(0, total, step):
        n = min(step, total - off)
        out.append(Extent.hole(off, n) if off // step % 2 else Extent(off, n, rng.randbytes(n)))
    return out


def send(drive_store: Any, source: ListSource) -> str:
    image = ImageInput(path="list", format="raw", size=source.size, source=source)
    ep = Endpoint(drive_store.base_url, drive_store.base_url)
    creds = Credentials(drive_store.username, drive_store.password)
    return direct_upload(image, ep, creds).uuid


@pytest.mark.parametrize(
    ("produced", "announced"),
    [
        (4 * MiB, 4 * MiB + 1),  # short by one byte
        (3 * MiB, 8 * MiB),  # short by a lot
        (4 * MiB + 1, 4 * MiB),  # one byte too many, right after a complete body
        (6 * MiB, 4 * MiB),  # a whole extent too many
        (4 * MiB + 100, 4 * MiB + 50),  # overflow inside the last extent
    ],
)
def test_stream_of_the_wrong_size_creates_no_drive(drive_store: Any, produced: int,
                                                   announced: int) -> None:
    before = drive_uuids(drive_store)
    extents = pieces(produced)
    if produced == 4 * MiB + 1:
        extents = [*pieces(4 * MiB), Extent(4 * MiB, 1, b"x")]
    with pytest.raises(SizeMismatch):
        send(drive_store, ListSource(extents, announced))
    assert drive_uuids(drive_store) == before


def test_error_inside_the_pipeline_is_reraised_not_curl_42(drive_store: Any) -> None:
    before = drive_uuids(drive_store)
    with pytest.raises(CorruptImage, match="corrupt in the middle"):
        send(drive_store, ListSource(pieces(8 * MiB), 8 * MiB, fail_at=5))
    assert drive_uuids(drive_store) == before


def test_sink_alone_without_the_runner_checks_the_size(drive_store: Any) -> None:
    """The sink guards itself too: a stream ending exactly at a full body but going on."""
    ep = Endpoint(drive_store.base_url, drive_store.base_url)
    sink = DirectUploadSink(ep, Credentials(drive_store.username, drive_store.password),
                          TlsOptions(), buffer_size=64 << 10)
    before = drive_uuids(drive_store)
    extents = [Extent(0, 1000, ZERO[:1000]), Extent(1000, 24, b"y" * 24)]
    try:
        with pytest.raises(SizeMismatch):
            sink.consume(iter(extents), 1000)
    finally:
        sink.close()
    assert drive_uuids(drive_store) == before


def test_exact_stream_without_overlap(drive_store: Any) -> None:
    extents = pieces(3 * MiB + 7, step=300_001)
    source = ListSource(extents, 3 * MiB + 7)
    from drivepipe._runner import run_pipeline  # noqa: PLC0415 - only this test needs it

    ep = Endpoint(drive_store.base_url, drive_store.base_url)
    sink = DirectUploadSink(ep, Credentials(drive_store.username, drive_store.password))
    uuid = run_pipeline(source, [], sink, size=source.size, overlap=False).uuid
    expected = xxhash.xxh3_128()
    for ext in extents:
        expected.update(ext.data if ext.data is not None else ZERO[: ext.length])
    with open(drive_store.store.raw_path(uuid), "rb") as f:
        got = xxhash.xxh3_128(f.read(source.size)).hexdigest()
    assert got == expected.hexdigest()


# --- Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_aborts_cleanly(drive_store: Any, tmp_path: Path) -> None:
    """SIGINT while curl waits on a stalled server: exit 130, one line, no drive."""
    image = make_image(tmp_path / "c.img", 64 * MiB, [(0, MiB)])  # more than socket buffers
    before = drive_uuids(drive_store)
    drive_store.faults.delay(3.0, match="drives/upload")
    env = {**os.environ, "HOME": str(tmp_path), "CLOUDSIGMA_USERNAME": drive_store.username,
           "CLOUDSIGMA_PASSWORD": drive_store.password}
    env.pop("CLOUDSIGMA_CONFIG", None)
    script = Path(sys.executable).with_name("drivepipe")
    proc = subprocess.Popen(
        [str(script), "upload", str(image), "--endpoint", drive_store.base_url,
         "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        while drive_store.faults.snapshot():  # until the request reached the stalled server
            assert proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out == ""
    assert err.strip() == "drivepipe: error: interrupted"
    time.sleep(3.0)  # the stalled handler wakes up, finds the body cut short
    assert drive_uuids(drive_store) == before


# --- --chunked is delegated, with the same meta and output ---------------------------------


def test_chunked_option_uploads_and_stores_meta(cli: CliRun, drive_store: Any,
                                                tmp_path: Path) -> None:
    image = random_sparse(tmp_path / "ch.img", 12)
    journal = tmp_path / "journal.json"
    uuid = upload_ok(cli, image, "--chunked", "--chunk-size", "1M", "--connections", "2",
                     "--journal", str(journal), "--name", "chunky")
    rec = drive_store.store.get(uuid)
    assert rec.name == "chunky"
    assert rec.meta["drivepipe_xxh128"] == xxh128_of(image)
    assert rec.meta["drivepipe_size"] == str(image.stat().st_size)
    assert_drive_holds(drive_store.store.raw_path(uuid), image)


# --- TLS: verified by default, --cacert for a private CA -----------------------------------


def test_tls_private_ca_needs_cacert(cli: CliRun, tls_drive_store: Any,
                                     tmp_path: Path) -> None:
    store, ca_pem = tls_drive_store.server, tls_drive_store.ca_pem
    cli.monkeypatch.setenv("CLOUDSIGMA_USERNAME", store.username)
    cli.monkeypatch.setenv("CLOUDSIGMA_PASSWORD", store.password)
    image = random_sparse(tmp_path / "t.img", 13)
    code, out, err = cli(str(image), endpoint=store.base_url)
    assert_one_line_failure(code, out, err, "--cacert")
    assert store.store.list() == []
    uuid = upload_ok(cli, image, "--cacert", str(ca_pem), endpoint=store.base_url)
    assert_drive_holds(store.store.raw_path(uuid), image)


# --- the request head, as curl sent it -------------------------------------------------------


def test_request_head_on_the_wire(drive_store: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact Content-Length, no chunked encoding, no Expect, octet-stream, Basic auth."""
    import pycurl  # noqa: PLC0415 - only this test looks at curl's debug output

    sent: list[bytes] = []
    setup = DirectUploadSink._setup

    def watching_setup(self: DirectUploadSink, c: pycurl.Curl, *args: Any) -> None:
        setup(self, c, *args)
        c.setopt(pycurl.VERBOSE, 1)
        c.setopt(pycurl.DEBUGFUNCTION,
                 lambda kind, data: sent.append(data) if kind == pycurl.INFOTYPE_HEADER_OUT
                 else None)

    monkeypatch.setattr(DirectUploadSink, "_setup", watching_setup)
    image = make_image(tmp_path / "h.img", 3 * MiB + 5, [(MiB, 10)])
    uuid = upload_image(drive_store, image)
    head = b"".join(sent).decode("latin-1")
    lines = head.split("\r\n")
    assert lines[0] == "POST /api/2.0/drives/upload/ HTTP/1.1"
    fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    assert fields["content-length"] == str(3 * MiB + 5)
    assert fields["content-type"] == "application/octet-stream"
    assert fields["authorization"].startswith("Basic ")
    assert "transfer-encoding" not in fields
    assert "expect" not in fields
    assert drive_store.store.get(uuid).image_size == 3 * MiB + 5


@pytest.mark.parametrize(
    "args",
    [["--progress", "fancy"], ["--connections", "0"], ["--chunk-size", "big"],
     ["--journal", "j.json"], ["--chunked", "--chunk-size", "0"], ["--queue-depth", "0"],
     ["--threads", "0"], ["--read-size", "0"], ["-q", "-v"]],
)
def test_bad_options_refused_before_anything_happens(cli: CliRun, drive_store: Any,
                                                     tmp_path: Path, args: list[str]) -> None:
    image = make_image(tmp_path / "o.img", MiB, [])
    before = drive_uuids(drive_store)
    code, out, err = cli(str(image), *args)
    assert_one_line_failure(code, out, err)
    assert code == 2
    assert drive_uuids(drive_store) == before


# --- decoded on the fly: the drive holds the raw image, the meta its checksum -----------------


def compressed(image: Path, kind: str) -> Path:
    if kind == "qcow2":
        out = image.with_suffix(".qcow2")
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(image),
                        str(out)], check=True)
        return out
    tool = {"gzip": ["gzip", "-k", "-1"], "zstd": ["zstd", "-q", "-1"]}[kind]
    subprocess.run([*tool, str(image)], check=True)
    return image.with_name(image.name + {"gzip": ".gz", "zstd": ".zst"}[kind])


@pytest.mark.parametrize(
    "kind",
    ["gzip",
     pytest.param("zstd", marks=pytest.mark.skipif(shutil.which("zstd") is None,
                                                   reason="needs the zstd CLI")),
     pytest.param("qcow2", marks=[pytest.mark.needs_qemu,
                                  pytest.mark.skipif(shutil.which("qemu-img") is None,
                                                     reason="needs qemu-img")])],
)
def test_compressed_image_uploads_as_raw(cli: CliRun, drive_store: Any, tmp_path: Path,
                                         kind: str) -> None:
    raw = random_sparse(tmp_path / "c.raw", 14)
    with open(raw, "r+b") as f:  # qcow2's virtual size is a whole number of sectors
        f.truncate(-(-raw.stat().st_size // 512) * 512)
    packed = compressed(raw, kind)
    uuid = upload_ok(cli, packed)
    rec = drive_store.store.get(uuid)
    assert rec.image_size == raw.stat().st_size
    assert rec.meta["drivepipe_xxh128"] == xxh128_of(raw)
    assert_drive_holds(drive_store.store.raw_path(uuid), raw)


# --- the direct host comes from GET /locations/ when only a location was named ----------------


def test_guessed_direct_host_resolved_through_locations(drive_store: Any, tmp_path: Path) -> None:
    guessed = Endpoint(drive_store.base_url, "https://direct.local.cloudsigma.com/api/2.0/",
                       location="local", direct_guessed=True)
    creds = Credentials(drive_store.username, drive_store.password)
    with ApiClient(guessed, creds) as api:
        resolved = api.resolve_direct()
    assert resolved.direct == drive_store.base_url
    image = make_image(tmp_path / "l.img", MiB + 3, [(5, 100)])
    from drivepipe._registry import open_image  # noqa: PLC0415 - only here and upload_image

    uuid = direct_upload(open_image(str(image)), resolved, creds).uuid
    assert_drive_holds(drive_store.store.raw_path(uuid), image)

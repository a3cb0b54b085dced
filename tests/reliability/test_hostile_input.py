"""Hostile input for every decoder: fuzzed with hypothesis, plus decompression bombs.

In: real images made by qemu-img and the real compressors (``tests/fixtures/
formats``), damaged on purpose - qcow2 header fields set to absurd values
(sizes, ``l1_size`` huge, table offsets past the end or misaligned), L1/L2
entries pointing past the end, at the tables themselves (cycles) or at
compressed clusters of nonsense; gzip/xz/zstd/bzip2 streams truncated, bytes
flipped, garbage appended; bombs (hundreds of MiB of zeros in a few KiB).

Out, for every example: the decode either produces exactly the announced size
or raises a :class:`DrivepipeError` subclass (never another exception, which
would be a traceback), within the per-test timeout (no hang), with bounded
Python allocations (tracemalloc) and, for the bombs, a bounded peak RSS
measured in a child process.  Through the CLI: uploading a corrupt image creates
no drive (the Content-Length sent is never one the stream cannot fill).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from fixtures.decode_helpers import bounded, size_or_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_support import Cli, MiB, Recorder, one_error_line, reply
from store_servers import when_upload_arrives

from drivepipe._errors import DrivepipeError
from drivepipe._registry import open_image
from drivepipe._runner import run_pipeline
from drivepipe._stage import OpenOptions
from drivepipe.server import RunningServer
from drivepipe_plugins.targets.discard import DiscardSink

FORMATS = Path(__file__).resolve().parents[1] / "fixtures" / "formats"
QCOW2_FIXTURES = ["plain.qcow2", "v2.qcow2", "zlib.qcow2", "zstd.qcow2", "extl2.qcow2",
                  "snapshot.qcow2"]
STREAM_FIXTURES = ["multi.gz", "bgzf.gz", "multi.xz", "multi.zst", "multi.bz2"]
#: Python allocations one decode of a small damaged file may make (read size 1 MiB,
#: queue of 4, decompressor output bounded at 16 MiB per call)
PY_PEAK_LIMIT = 96 * MiB
#: shorter than this, a stream no longer carries its magic and is (rightly) raw bytes
MAGIC_LEN = 6
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

pytestmark = pytest.mark.timeout(60)


# --- decoding one damaged file ------------------------------------------------------------


def decode_file(path: Path) -> int | DrivepipeError:
    """Decode ``path`` (format by magic) to a discarding sink: the size, or the error."""
    return size_or_error(
        lambda: open_image(str(path), None, OpenOptions(read_size=MiB)),
        lambda image: run_pipeline(image.source, image.stages, DiscardSink(), size=image.size,
                                   queue_depth=4))


def decode_bounded(path: Path) -> int | DrivepipeError:
    """:func:`decode_file` under tracemalloc: its Python peak stays bounded."""
    return bounded(lambda: decode_file(path), PY_PEAK_LIMIT, path.name)


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# --- qcow2: structured damage ----------------------------------------------------------------

# Header field offsets (qcow2 spec): (offset, struct format)
QCOW2_FIELDS = {
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"),
    "nb_snapshots": (60, ">I"), "incompatible_features": (72, ">Q"), "header_length": (100, ">I"),
}


def interesting(fmt: str, file_size: int) -> st.SearchStrategy[int]:
    bits = 32 if fmt == ">I" else 64
    top = (1 << bits) - 1
    near_eof = [file_size - 8, file_size, file_size + 512, file_size + (1 << 20)]
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 9, 16, 21, 22, 63, 64, 512, 4096, 1 << 20, 1 << 31,
                         top, top - 1, top >> 1, *[v for v in near_eof if v <= top]]),
        st.integers(0, top),
    )


@st.composite
def damaged_qcow2_header(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(QCOW2_FIXTURES))
    data = bytearray((FORMATS / name).read_bytes())
    for field in draw(st.lists(st.sampled_from(sorted(QCOW2_FIELDS)), min_size=1, max_size=3)):
        offset, fmt = QCOW2_FIELDS[field]
        struct.pack_into(fmt, data, offset, draw(interesting(fmt, len(data))))
    return name, bytes(data)


def l1_table(data: bytes) -> tuple[int, int, int]:
    """(offset, entries, cluster size) of the active L1 table."""
    cluster_bits, = struct.unpack_from(">I", data, 20)
    l1_size, = struct.unpack_from(">I", data, 36)
    l1_offset, = struct.unpack_from(">Q", data, 40)
    return l1_offset, l1_size, 1 << cluster_bits


def l2_offsets(data: bytes) -> list[int]:
    l1_offset, l1_size, _ = l1_table(data)
    entries = struct.unpack_from(f">{l1_size}Q", data, l1_offset)
    return [e & 0x00FFFFFFFFFFFE00 for e in entries if e & 0x00FFFFFFFFFFFE00]


@st.composite
def damaged_qcow2_tables(draw: st.DrawFn) -> tuple[str, bytes]:
    """L1 or L2 entries pointing past the end, at the tables (cycles), misaligned,
    compressed with absurd sizes, or with reserved bits set."""
    name = draw(st.sampled_from(QCOW2_FIXTURES))
    data = bytearray((FORMATS / name).read_bytes())
    l1_offset, l1_size, cluster = l1_table(bytes(data))
    l2s = l2_offsets(bytes(data))
    targets = st.sampled_from([
        len(data), len(data) + cluster, (1 << 55) - cluster, l1_offset, 0, 17,
        *(l2s[:2] or [cluster]),
    ])
    flags = st.sampled_from([0, 1 << 63, 1 << 62, (1 << 62) | (0x3FFF << 48), 1, 0x1FE])
    for _ in range(draw(st.integers(1, 4))):
        value = draw(targets) | draw(flags) | draw(st.sampled_from([0, 0, 1]))
        if l2s and draw(st.booleans()):
            table = draw(st.sampled_from(l2s))
            entries = max(1, cluster // 8)
            slot = table + 8 * draw(st.integers(0, entries - 1))
        else:
            slot = l1_offset + 8 * draw(st.integers(0, max(0, l1_size - 1)))
        if slot + 8 <= len(data):
            struct.pack_into(">Q", data, slot, value)
    return name, bytes(data)


@pytest.mark.parametrize("damage", [damaged_qcow2_header(), damaged_qcow2_tables()],
                         ids=["header-fields", "tables"])
@given(data=st.data())
@FUZZ
def test_qcow2_damaged(damage: st.SearchStrategy[tuple[str, bytes]], data: st.DataObject,
                       tmp_path: Path) -> None:
    name, damaged = data.draw(damage, label="damaged")
    decode_bounded(write(tmp_path, name, damaged))


@given(name=st.sampled_from(QCOW2_FIXTURES), data=st.data())
@FUZZ
def test_qcow2_random_bytes_flipped_or_truncated(name: str, data: st.DataObject,
                                                 tmp_path: Path) -> None:
    raw = bytearray((FORMATS / name).read_bytes())
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.one_of(st.just(len(raw)), st.integers(4, len(raw))))
    decode_bounded(write(tmp_path, name, bytes(raw[:cut])))


def test_qcow2_l1_size_huge_or_past_the_end(tmp_path: Path) -> None:
    data = bytearray((FORMATS / "plain.qcow2").read_bytes())
    struct.pack_into(">I", data, 36, 0xFFFFFFFF)  # far over qemu's 32 MiB L1 limit
    assert isinstance(decode_bounded(write(tmp_path, "a.qcow2", bytes(data))), DrivepipeError)
    # At the limit (32 MiB of L1, mostly past the end): like qemu, only the entries the
    # virtual size needs matter; what is read stays bounded either way.
    struct.pack_into(">I", data, 36, 4 << 20)
    result = decode_bounded(write(tmp_path, "b.qcow2", bytes(data)))
    assert result == 2098688 or isinstance(result, DrivepipeError)


def test_qcow2_l2_table_that_is_the_l1_table_is_refused_or_exact(tmp_path: Path) -> None:
    """A cycle: the first L1 entry points at the L1 table itself."""
    data = bytearray((FORMATS / "plain.qcow2").read_bytes())
    l1_offset, _, _ = l1_table(bytes(data))
    struct.pack_into(">Q", data, l1_offset, l1_offset | (1 << 63))
    result = decode_bounded(write(tmp_path, "cycle.qcow2", bytes(data)))
    assert isinstance(result, DrivepipeError | int)


# --- compressed streams: truncated, flipped, with trailing garbage --------------------------


@given(name=st.sampled_from(STREAM_FIXTURES), data=st.data())
@FUZZ
def test_streams_truncated_flipped_or_extended(name: str, data: st.DataObject,
                                               tmp_path: Path) -> None:
    raw = bytearray((FORMATS / name).read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "flip+truncate"]))
    if "flip" in how:
        for _ in range(data.draw(st.integers(1, 6))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] ^= data.draw(st.integers(1, 255))
    if "truncate" in how:
        raw = raw[: data.draw(st.integers(MAGIC_LEN, len(raw) - 1))]
    if how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    result = decode_bounded(write(tmp_path, name, bytes(raw)))
    if how == "truncate":
        assert isinstance(result, DrivepipeError), "a truncated stream must be refused"


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_every_truncation_point_of_a_stream_is_refused(name: str, tmp_path: Path) -> None:
    raw = (FORMATS / name).read_bytes()
    for cut in sorted({MAGIC_LEN, 10, len(raw) // 3, len(raw) // 2, len(raw) - 8, len(raw) - 1}):
        result = decode_bounded(write(tmp_path, f"cut{cut}-{name}", raw[:cut]))
        assert isinstance(result, DrivepipeError), (name, cut)


# --- bombs: huge output from tiny input, in a child process with its RSS measured -----------

CHILD = r"""
import json, sys
from drivepipe._errors import DrivepipeError
from drivepipe._registry import open_image
from drivepipe._runner import run_pipeline
from drivepipe._stage import OpenOptions
from drivepipe_plugins.targets.discard import DiscardSink
def status_kib(field):
    # VmHWM is this process image's own peak; ru_maxrss would include the parent's
    # RSS at fork time (Linux carries the high-water mark across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
base = status_kib("VmRSS")
size, error = None, None
try:
    image = open_image(sys.argv[1], None, OpenOptions())
    try:
        size = run_pipeline(image.source, image.stages, DiscardSink(), size=image.size)
    finally:
        image.close()
except DrivepipeError as exc:
    error = exc.one_line()
print(json.dumps({"size": size, "error": error, "growth_kib": status_kib("VmHWM") - base}))
"""
#: RSS growth (peak minus the RSS before decoding) allowed while decoding a bomb: a few
#: decompressor outputs and queued extents (5-10 MiB measured), far below every bomb's output
BOMB_RSS_LIMIT_KIB = 64 * 1024


def run_child(path: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                         text=True, timeout=50, check=False)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def compress(tool: list[str], size: int, path: Path) -> Path:
    with open(path, "wb") as f:
        zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        assert zeros.stdout is not None
        with zeros.stdout:
            subprocess.run(tool, stdin=zeros.stdout, stdout=f, check=True)
        zeros.wait()
    return path


BOMBS = {
    "gzip": (["gzip", "-9", "-c"], 192 * MiB, ".gz"),
    "xz": (["xz", "-c", "-T1", "-0"], 128 * MiB, ".xz"),
    "zstd": (["zstd", "-q", "-c", "-3"], 512 * MiB, ".zst"),
    "bzip2": (["bzip2", "-c", "-9"], 128 * MiB, ".bz2"),
}


@pytest.mark.parametrize("fmt", [
    pytest.param(fmt, marks=pytest.mark.skipif(shutil.which(BOMBS[fmt][0][0]) is None,
                                               reason=f"needs the {BOMBS[fmt][0][0]} CLI"))
    for fmt in sorted(BOMBS)
])
def test_decompression_bomb_memory_stays_bounded(fmt: str, tmp_path: Path) -> None:
    tool, size, suffix = BOMBS[fmt]
    bomb = compress(tool, size, tmp_path / f"bomb{suffix}")
    assert bomb.stat().st_size * 300 < size, "not a bomb"
    result = run_child(bomb)
    assert result["error"] is None and result["size"] == size
    print(f"{fmt} bomb: {bomb.stat().st_size} B -> {size >> 20} MiB, "
          f"RSS growth {result['growth_kib']} KiB")
    assert isinstance(result["growth_kib"], int) and result["growth_kib"] < BOMB_RSS_LIMIT_KIB


def test_gzip_bomb_with_a_lying_isize_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """Concatenated members whose trailers lie about their size: the decoder must not
    believe them, nor buffer what it decodes."""
    member = bytearray(gzip.compress(bytes(64 * MiB), compresslevel=9))
    struct.pack_into("<I", member, len(member) - 4, 12345)  # ISIZE lies
    bomb = write(tmp_path, "lie.gz", bytes(member) * 2)
    result = run_child(bomb)
    assert result["error"] is not None
    assert isinstance(result["growth_kib"], int) and result["growth_kib"] < BOMB_RSS_LIMIT_KIB


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_qcow2_of_a_huge_empty_disk_streams_holes_in_bounded_memory(tmp_path: Path) -> None:
    image = tmp_path / "huge.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4T"], check=True)
    result = run_child(image)
    assert result["error"] is None and result["size"] == 4 << 40
    assert isinstance(result["growth_kib"], int) and result["growth_kib"] < BOMB_RSS_LIMIT_KIB


# --- through the CLI: a corrupt image creates no drive ---------------------------------------


def corrupt_middle(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    for pos in range(len(data) // 2, len(data) // 2 + 64):
        data[pos] ^= 0x5A
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture
def qcow2_with_data_past_eof(tmp_path: Path) -> Path:
    """A qcow2 whose last L2 entry points past the end: found mid-stream, not at open."""
    data = bytearray((FORMATS / "plain.qcow2").read_bytes())
    table = l2_offsets(bytes(data))[-1]
    _, _, cluster = l1_table(bytes(data))
    for slot in range(table + cluster - 8, table - 8, -8):
        if struct.unpack_from(">Q", data, slot)[0]:
            struct.pack_into(">Q", data, slot, (1 << 63) | (len(data) + 64 * cluster))
            break
    else:
        raise AssertionError("no allocated cluster to damage")
    return write(tmp_path, "past.qcow2", bytes(data))


@pytest.mark.parametrize("kind", ["qcow2", "gzip", "xz", "zstd", "bzip2", "truncated-xz"])
def test_uploading_a_corrupt_image_creates_no_drive(
    kind: str, store: RunningServer, cli: Cli,
    tmp_path: Path, qcow2_with_data_past_eof: Path,
) -> None:
    sources = {"gzip": "multi.gz", "xz": "multi.xz", "zstd": "multi.zst", "bzip2": "multi.bz2"}
    if kind == "qcow2":
        image = qcow2_with_data_past_eof
    elif kind == "truncated-xz":
        raw = (FORMATS / "multi.xz").read_bytes()
        image = write(tmp_path, "cut.xz", raw[: len(raw) * 2 // 3])
    else:
        name = sources[kind]
        image = corrupt_middle(FORMATS / name, tmp_path / name)
    for extra in ((), ("--chunked", "--chunk-size", "256K")):
        before = {r.uuid: r.status for r in store.store.list()}
        code, out, err = cli("upload", str(image), "--endpoint", store.base_url,
                             "--progress", "none", *extra, env=store.env)
        assert code == 3 and out == "" and one_error_line(err), (kind, extra, err)
        after = {r.uuid: r.status for r in store.store.list()}
        done = [u for u, s in after.items() if s == "unmounted" and u not in before]
        assert done == [], f"a corrupt {kind} image made a finished drive"
        if not extra:
            assert after == before, "a direct upload of a corrupt image left a drive"


# --- a hostile server: the download's answers are input too ---------------------------------------


def lying_server(data: bytes, lie: str) -> Callable[[BaseHTTPRequestHandler], None]:
    """Serves ``data`` by ranges, lying in one way about what it sends."""

    def answer(h: BaseHTTPRequestHandler) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        first = int(m.group(1)) if m else 0
        last = min(int(m.group(2) or len(data) - 1), len(data) - 1) if m else len(data) - 1
        body, total, shown = data[first : last + 1], str(len(data)), (first, last)
        if lie == "size 2**62":
            total = str(1 << 62)
        elif lie == "size negative":
            total = "-5"
        elif lie == "size unknown":
            total = "*"
        elif lie == "other range":
            shown = (first + 1, last + 1)
        elif lie == "longer body":
            body += b"\xff" * 100
        headers = {"Content-Range": f"bytes {shown[0]}-{shown[1]}/{total}",
                   "Accept-Ranges": "bytes", "ETag": '"same"'}
        reply(h, 206, body, headers)

    return answer


LIES = ["size 2**62", "size negative", "size unknown", "other range", "longer body"]


@pytest.mark.parametrize("lie", LIES)
def test_a_lying_download_server_gets_one_error_line(
    lie: str, cli: Cli, tmp_path: Path
) -> None:
    data = random.Random(9).randbytes(3 * MiB)
    server = Recorder("127.0.0.1", lying_server(data, lie)).start()
    try:
        target = tmp_path / "out.raw"
        code, out, err = cli("download", f"{server.base}/disk.raw", "-o", str(target),
                             "--progress", "none", "--retries", "1", "--retry-delay", "0.01",
                             "--range-size", "1M", "--block-size", "1M")
    finally:
        server.stop()
    assert code != 0 and one_error_line(err) and out == "", err
    assert not target.exists(), "a lying server's bytes got the final name"


# --- the image changes under the upload ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["raw", "gzip"])
def test_image_truncated_during_the_upload_creates_no_drive(
    kind: str, store: RunningServer, cli: Cli, tmp_path: Path
) -> None:
    """Sized at open, cut short while sent: the upload stops before the last byte."""
    raw = random.Random(11).randbytes(24 * MiB)  # more than the socket buffers hold
    if kind == "raw":
        image = write(tmp_path, "disk.raw", raw)
    else:
        image = write(tmp_path, "disk.gz", gzip.compress(raw, compresslevel=1))
    truncated = when_upload_arrives(store, lambda: os.truncate(image, image.stat().st_size // 2))
    # a short queue of small reads: the reader cannot have read it all ahead of time
    code, out, err = cli("upload", str(image), "--endpoint", store.base_url, "--progress",
                         "none", "--read-size", "1M", "--queue-depth", "1", env=store.env)
    assert truncated.join(), "the image was truncated mid-upload"
    assert code in (3, 4) and out == "" and one_error_line(err), err
    assert store.store.list() == [], "a stream cut short made a drive"

"""OVA: appliances built here (OVF + manifest + streamOptimized VMDK, plain, gzip and
chunked members, several disks, several tar formats) read in place; a manifest
mismatch raises before the last extent of the stream."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import xxhash
from fixtures.decode_helpers import bounded, decode_detected
from fixtures.vmdk_writer import write_vmdk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sparse_files import scattered_bytes

from drivepipe._errors import CorruptImage, DrivepipeError, UnsupportedFormat
from drivepipe._stage import ImageInput, OpenOptions
from drivepipe.cli import main
from drivepipe_plugins.formats.ova import OvaFormat, open_ova_disk
from drivepipe_plugins.sources.file import SparseFileReader

MiB = 1 << 20

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:vmw="http://www.vmware.com/schema/ovf"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
{files}
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disks}
  </DiskSection>
  <VirtualSystem ovf:id="vm"><Info>A virtual machine</Info></VirtualSystem>
</Envelope>
"""
STREAM_URI = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


def disk_raw(seed: int, size: int = 2 * MiB) -> bytes:
    return scattered_bytes(size, seed, pieces=6, max_piece=200_000, head=1000, tail=512)


def vmdk_bytes(tmp: Path, raw: bytes, name: str, **kw: object) -> bytes:
    return write_vmdk(tmp / f"w-{name}", raw, **kw).read_bytes()  # type: ignore[arg-type]


def build_ova(
    tmp: Path,
    disks: list[tuple[str, bytes]],
    *,
    name: str = "app.ova",
    algo: str | None = "sha256",
    compression: str = "",
    chunk: int | None = None,
    tar_format: int = tarfile.USTAR_FORMAT,
    corrupt: str | None = None,
) -> Path:
    """An OVA holding ``disks`` (file name, file bytes), in the OVF's order."""
    members: list[tuple[str, bytes]] = []
    files, disk_lines = [], []
    for i, (href, plain) in enumerate(disks, 1):
        data = plain
        attrs = f'ovf:href="{href}" ovf:id="file{i}" ovf:size="{len(data)}"'
        if compression:
            attrs += f' ovf:compression="{compression}"'
            data = gzip.compress(data, mtime=0)
        if chunk:
            attrs += f' ovf:chunkSize="{chunk}"'
            for j in range(0, len(data), chunk):
                members.append((f"{href}.{j // chunk:09d}", data[j : j + chunk]))
        else:
            members.append((href, data))
        files.append(f"    <File {attrs}/>")
        disk_lines.append(
            f'    <Disk ovf:capacity="{2 * MiB}" ovf:capacityAllocationUnits="byte" '
            f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="{STREAM_URI}"/>'
        )
    ovf_name = name.replace(".ova", ".ovf")
    ovf = OVF.format(files="\n".join(files), disks="\n".join(disk_lines)).encode()
    out: list[tuple[str, bytes]] = [(ovf_name, ovf)]
    if algo:
        lines = []
        for n, d in [(ovf_name, ovf), *members]:
            digest = hashlib.new(algo, d).hexdigest()
            if n == corrupt:
                digest = ("0" if digest[0] != "0" else "1") + digest[1:]
            lines.append(f"{algo.upper()}({n})= {digest}\n")
        out.append((name.replace(".ova", ".mf"), "".join(lines).encode()))
    out += members
    path = tmp / name
    with tarfile.open(path, "w", format=tar_format) as tar:
        for n, d in out:
            info = tarfile.TarInfo(n)
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    return path


def open_ova(path: Path, disk: str | int | None = None, **options: int) -> ImageInput:
    source = SparseFileReader(str(path))
    try:
        if disk is None:
            fmt = OvaFormat()
            assert fmt.detect(source.head(), source)
            return fmt.open(source, OpenOptions(**options))
        return open_ova_disk(source, OpenOptions(**options), disk)
    except BaseException:
        source.close()
        raise


def content(image: ImageInput) -> bytes:
    out = bytearray()
    try:
        for ext in image.source.extents():
            assert ext.offset == len(out)
            out += bytes(ext.length) if ext.data is None else ext.data
    finally:
        image.close()
    assert len(out) == image.size
    return bytes(out)


@pytest.mark.parametrize("layout", ["vmware", "qemu-front"])
@pytest.mark.parametrize("algo", ["sha256", "sha1", None])
def test_single_disk_ova(tmp_path: Path, layout: str, algo: str | None) -> None:
    raw = disk_raw(1)
    vmdk = vmdk_bytes(tmp_path, raw, "d.vmdk", gd_at_end=layout == "vmware")
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk)], algo=algo)
    image = open_ova(path)
    assert image.size == len(raw)
    assert image.format == "ova > vmdk" and image.chain == ["ova", "vmdk"]
    assert image.details["ova_disk"] == "vmdisk1"
    assert image.details["disk_subformat"] == "streamOptimized"
    assert ("manifest" in image.details) == bool(algo)
    assert (image.random_access is None) == bool(algo)
    assert content(image) == raw


@pytest.mark.parametrize(
    "tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT],
    ids=["ustar", "pax", "gnu"],
)
def test_long_names_in_each_tar_format(tmp_path: Path, tar_format: int) -> None:
    raw = disk_raw(2)
    long = ("very-long-appliance-name-" * 5)[:120] + ".vmdk"
    if tar_format == tarfile.USTAR_FORMAT:
        long = "short-disk.vmdk"
    path = build_ova(tmp_path, [(long, vmdk_bytes(tmp_path, raw, "d.vmdk"))],
                     tar_format=tar_format,
                     name=("x" * 110 + ".ova") if tar_format != tarfile.USTAR_FORMAT else "a.ova")
    assert content(open_ova(path)) == raw


def test_chunked_members(tmp_path: Path) -> None:
    raw = disk_raw(3)
    vmdk = vmdk_bytes(tmp_path, raw, "d.vmdk")
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk)], chunk=100_000)
    image = open_ova(path)
    assert image.details["ova_chunks"] == -(-len(vmdk) // 100_000)
    assert content(image) == raw


def test_several_disks_need_a_choice(tmp_path: Path) -> None:
    raws = [disk_raw(4), disk_raw(5)]
    path = build_ova(tmp_path, [(f"disk{i}.vmdk", vmdk_bytes(tmp_path, r, f"d{i}"))
                                for i, r in enumerate(raws, 1)])
    with pytest.raises(UnsupportedFormat) as info:
        open_ova(path)
    line = info.value.one_line()
    assert "2 disks" in line and "vmdisk1" in line and "disk2.vmdk" in line
    assert content(open_ova(path, 2)) == raws[1]
    assert content(open_ova(path, "vmdisk1")) == raws[0]
    assert content(open_ova(path, "disk2.vmdk")) == raws[1]
    with pytest.raises(UnsupportedFormat, match="no disk"):
        open_ova(path, 3)


def collect_until_error(image: ImageInput) -> tuple[int, BaseException | None]:
    covered = 0
    try:
        for ext in image.source.extents():
            covered = ext.end
    except CorruptImage as exc:
        return covered, exc
    finally:
        image.close()
    return covered, None


@pytest.mark.parametrize("chunked", [False, True])
def test_manifest_mismatch_raises_before_the_last_extent(tmp_path: Path, chunked: bool) -> None:
    raw = disk_raw(6)
    vmdk = vmdk_bytes(tmp_path, raw, "d.vmdk")
    bad = "disk1.vmdk.000000001" if chunked else "disk1.vmdk"
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk)], corrupt=bad,
                     chunk=200_000 if chunked else None)
    try:
        image = open_ova(path)
    except CorruptImage as exc:  # small files: the footer read hashes it all at open
        assert "manifest" in str(exc) and bad in str(exc)
        return
    size = image.size
    covered, exc = collect_until_error(image)
    assert exc is not None and "manifest" in str(exc) and bad in str(exc)
    assert covered < size


def test_altered_disk_bytes_are_caught(tmp_path: Path) -> None:
    """A byte changed where the disk reader never looks (the embedded descriptor's
    padding) still fails the manifest."""
    raw = disk_raw(7)
    vmdk = bytearray(vmdk_bytes(tmp_path, raw, "d.vmdk", gd_at_end=False))
    path = build_ova(tmp_path, [("disk1.vmdk", bytes(vmdk))])
    data = bytearray(path.read_bytes())
    at = data.index(b"ddb.adapterType")
    data[at] = ord("D")
    path.write_bytes(bytes(data))
    image = open_ova(path)  # the front-layout reader reads no footer: nothing hashed yet
    covered, exc = collect_until_error(image)
    assert exc is not None and "does not match" in str(exc)
    assert covered < image.size


def test_ovf_digest_checked_at_open(tmp_path: Path) -> None:
    vmdk = vmdk_bytes(tmp_path, disk_raw(8), "d.vmdk")
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk)], corrupt="app.ovf")
    with pytest.raises(CorruptImage, match=r"app\.ovf"):
        open_ova(path)


def test_missing_disk_file(tmp_path: Path) -> None:
    path = build_ova(tmp_path, [("disk1.vmdk", b"")], algo=None)
    data = path.read_bytes().replace(b'ovf:href="disk1.vmdk"', b'ovf:href="disk9.vmdk"')
    path.write_bytes(data)
    with pytest.raises(CorruptImage, match=r"disk9\.vmdk"):
        open_ova(path)


def test_gzip_member(tmp_path: Path) -> None:
    pytest.importorskip("drivepipe._nesting", reason="the registry's nested-image port")
    raw = disk_raw(9)
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk_bytes(tmp_path, raw, "d.vmdk"))],
                     compression="gzip")
    image = open_ova(path)
    assert image.details["ova_compression"] == "gzip"
    assert image.chain == ["ova", "gzip", "vmdk"]
    assert content(image) == raw


def test_unknown_compression_refused(tmp_path: Path) -> None:
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk_bytes(tmp_path, disk_raw(1), "d"))],
                     algo=None)
    data = path.read_bytes().replace(b'ovf:size=', b'ovf:compression="lz4" ovf:size=')
    # keep the tar header's size of the .ovf right: rebuild with the edited OVF
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        for m, d in members:
            body = d
            if m.name.endswith(".ovf"):
                body = d.replace(b"ovf:size=", b'ovf:compression="lz4" ovf:size=')
                m.size = len(body)
            tar.addfile(m, io.BytesIO(body))
    assert data  # the first replacement only proves the attribute is there
    with pytest.raises(UnsupportedFormat, match="lz4"):
        open_ova(path)


def test_not_an_ovf_tar_is_not_detected(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    source = SparseFileReader(str(path))
    try:
        assert not OvaFormat().detect(source.head(), source)
    finally:
        source.close()


def test_threads_with_manifest(tmp_path: Path) -> None:
    raw = disk_raw(10, size=3 * MiB)
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk_bytes(tmp_path, raw, "d.vmdk"))])
    want = xxhash.xxh3_128_hexdigest(raw)
    for threads in (1, 4):
        assert xxhash.xxh3_128_hexdigest(content(open_ova(path, threads=threads))) == want





# -- one-step upload to a local drive store ---------------------------------------------


def upload(capfd: pytest.CaptureFixture[str], server: Any, path: Path) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(["upload", "--endpoint", server.base_url, "--progress", "none", str(path)])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["plain", "gzip", "chunked"])
def test_ova_uploads_in_one_step(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                 cli_store: Any, kind: str) -> None:
    raw = disk_raw(11)
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk_bytes(tmp_path, raw, "d.vmdk"))],
                     compression="gzip" if kind == "gzip" else "",
                     chunk=150_000 if kind == "chunked" else None)
    code, out, err = upload(capfd, cli_store, path)
    assert code == 0, err
    uuid = out.strip()
    with open(cli_store.store.raw_path(uuid), "rb") as f:
        assert f.read(len(raw)) == raw
    assert cli_store.store.get(uuid).image_size == len(raw)


@pytest.mark.parametrize("layout", ["vmware", "front"])
def test_bad_manifest_creates_no_drive(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                       cli_store: Any, layout: str) -> None:
    raw = disk_raw(12)
    vmdk = vmdk_bytes(tmp_path, raw, "d.vmdk", gd_at_end=layout == "vmware")
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk)], corrupt="disk1.vmdk")
    code, out, err = upload(capfd, cli_store, path)
    assert code == 3 and out == ""
    assert "manifest" in err and len(err.strip().splitlines()) == 1
    assert cli_store.store.list() == []


# -- hostile input: no traceback, no hang, bounded memory ------------------------------

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
_SAMPLE: dict[str, bytes] = {}


def sample_ova(tmp: Path, kind: str) -> bytes:
    if kind not in _SAMPLE:
        vmdk = vmdk_bytes(tmp, disk_raw(13, size=MiB), "d.vmdk")
        opts: dict[str, Any] = {"plain": {}, "chunked": {"chunk": 100_000},
                                "gzip": {"compression": "gzip"},
                                "pax": {"tar_format": tarfile.PAX_FORMAT}}[kind]
        _SAMPLE[kind] = build_ova(tmp, [("disk1.vmdk", vmdk)], name=f"s-{kind}.ova",
                                  **opts).read_bytes()
    return _SAMPLE[kind]


def decode_ova(path: Path) -> int | DrivepipeError:
    return bounded(lambda: decode_detected(OvaFormat(), path, read_size=MiB), what=path.name)


@given(kind=st.sampled_from(["plain", "chunked", "gzip", "pax"]), data=st.data())
@FUZZ
def test_fuzz_ova_bytes(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    buf = bytearray(sample_ova(tmp_path, kind))
    # damage the tar headers and the OVF/manifest (the first blocks) more often
    for _ in range(data.draw(st.integers(1, 6))):
        hi = data.draw(st.sampled_from([4096, len(buf)]))
        at = data.draw(st.integers(0, min(hi, len(buf)) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from([None, 100, 512, 1024, 3000, len(buf) // 2, len(buf) - 1]))
    if cut is not None:
        del buf[cut:]
    path = tmp_path / "f.ova"
    path.write_bytes(bytes(buf))
    decode_ova(path)


OVF_PIECES = st.sampled_from([
    '<File ovf:href="disk1.vmdk" ovf:id="file1"/>',
    '<File ovf:href="disk1.vmdk" ovf:id="file1" ovf:chunkSize="1"/>',
    '<File ovf:href="disk1.vmdk" ovf:id="file1" ovf:compression="gzip"/>',
    '<File ovf:href="../../etc/passwd" ovf:id="file2"/>',
    '<Disk ovf:diskId="d1" ovf:fileRef="file1" ovf:capacity="99999999999999999999"/>',
    '<Disk ovf:diskId="d2" ovf:fileRef="file2" ovf:capacityAllocationUnits="byte * 2^999"'
    ' ovf:capacity="1"/>',
    '<Disk ovf:diskId="d3" ovf:fileRef="nope"/>',
    "<Disk/>", "<File/>", "<References>", "</References>", "&amp;", "<![CDATA[x]]>",
    '<!DOCTYPE x [<!ENTITY a "aaaa">]>',
])


@given(pieces=st.lists(OVF_PIECES, max_size=8))
@FUZZ
def test_fuzz_ovf(tmp_path: Path, pieces: list[str]) -> None:
    vmdk = vmdk_bytes(tmp_path, disk_raw(14, size=256 * 1024), "d.vmdk")
    ovf = ('<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
           'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">' + "".join(pieces)
           + "</Envelope>").encode()
    path = tmp_path / "x.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, body in (("x.ovf", ovf), ("disk1.vmdk", vmdk)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    decode_ova(path)


def test_chunked_gzip_member(tmp_path: Path) -> None:
    raw = disk_raw(15)
    path = build_ova(tmp_path, [("disk1.vmdk", vmdk_bytes(tmp_path, raw, "d.vmdk"))],
                     compression="gzip", chunk=50_000)
    image = open_ova(path)
    assert image.chain == ["ova", "gzip", "vmdk"]
    assert content(image) == raw


def test_raw_disk_inside(tmp_path: Path) -> None:
    raw = disk_raw(16, size=MiB)
    path = build_ova(tmp_path, [("disk1.img", raw)])
    image = open_ova(path)
    assert image.chain == ["ova", "raw"] and image.format == "ova"
    assert content(image) == raw


def test_disk_option_on_the_cli(tmp_path: Path) -> None:
    def cli(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(args))
        return code, out.getvalue(), err.getvalue()

    raws = [disk_raw(6), disk_raw(7)]
    path = build_ova(tmp_path, [(f"disk{i}.vmdk", vmdk_bytes(tmp_path, r, f"e{i}"))
                                for i, r in enumerate(raws, 1)])
    code, _, err = cli("checksum", "--progress", "none", str(path))
    assert code == 3 and "2 disks" in err and "--disk" in err
    for choice, raw in (("1", raws[0]), ("disk2.vmdk", raws[1]), ("vmdisk2", raws[1])):
        code, out, err = cli("checksum", "--progress", "none", "--disk", choice, str(path))
        assert code == 0, err
        assert out.split()[0] == xxhash.xxh3_128_hexdigest(raw)
    code, out, err = cli("inspect", "--json", str(path))
    assert code == 0, err
    info = json.loads(out)
    assert len(info["ova_disks"]) == 2 and info["ova_disk"] == "vmdisk1"
    code, out, err = cli("convert", "--progress", "none", "--disk", "2", str(path),
                         str(tmp_path / "two.raw"))
    assert code == 0, err
    assert (tmp_path / "two.raw").read_bytes()[: len(raws[1])] == raws[1]

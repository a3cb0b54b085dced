"""ova: a VMware/VirtualBox appliance (a tar of an .ovf, a manifest and disks) in,
the raw disk of one of its disks out.

Detect: a tar header (``ustar`` at 257) whose first member (or its pax/GNU long
name) ends in ``.ovf``.  Size: the disk's own header (a VMDK's capacity), exact;
the OVF's capacity is only shown by ``inspect``.

How: the tar headers are walked (ustar, pax and GNU long names, base-256 sizes,
through :mod:`tarfile` over the byte source) and the members are read in place
through slices of the source, never extracted.  The disk is the OVF's
``DiskSection/Disk`` -> ``References/File``: a plain member, a gzip member
(``compression="gzip"``: opened through the registry, which decodes the layers),
or chunks ``NAME.000000000``, ``NAME.000000001``, ... read as one file.  An OVA
with one disk opens it; with several, :func:`open_ova_disk` picks one (by id,
file name or 1-based number) and ``open`` refuses in one line that lists them.

Manifest: the ``.mf`` entries (``SHA1(name)= hex``, ``SHA256(name)= hex``) of the
OVF and of the disk's members are checked: the OVF at open, the disk while it is
read (every byte of the member is hashed in file order, gaps the disk reader skips
are read for the hash), and the stream raises before its last extent when a digest
differs, so an upload aborts and no drive is created.  A checked disk is streamed
in order (no random access).

Refused: OVAs without an .ovf, without disks, disks whose file is missing, unknown
compression, a read that is not a file (an OVA from a pipe), digest mismatches.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from drivepipe._errors import CorruptImage, DrivepipeError, UnsupportedFormat
from drivepipe._extent import Extent
from drivepipe._registry import open_source
from drivepipe._stage import ByteSource, ImageFormat, ImageInput, OpenOptions, Source
from drivepipe_plugins.formats.vmdk import VmdkFormat

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

#: the .ovf is read whole, the manifest too: both are small
_MAX_OVF = 16 << 20
_MAX_MANIFEST = 1 << 20
_MAX_MEMBERS = 100_000
_HASH_CHUNK = 4 << 20
#: a read at most this far past the hash cursor fills the gap for the hash; one
#: further away (a footer, tables at the end) passes and the gap waits for later
_HASH_GAP = 8 << 20
_MANIFEST_LINE = re.compile(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
_ALGOS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


# -- byte sources over parts of another --------------------------------------------


class SliceSource(ByteSource):
    """``size`` bytes at ``offset`` of ``parent`` (a tar member read in place)."""

    name = "ova-member"

    def __init__(self, parent: ByteSource, offset: int, size: int, label: str) -> None:
        self.parent = parent
        self.offset = offset
        self.size = size
        self.label = label
        self.random = parent.random

    def pread(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self.parent.pread(self.offset + offset, min(length, self.size - offset))


class ConcatSource(ByteSource):
    """Several sources as one (chunked OVA members)."""

    name = "ova-chunks"

    def __init__(self, parts: list[ByteSource], label: str) -> None:
        self.parts = parts
        self.label = label
        self.starts: list[int] = []
        pos = 0
        for part in parts:
            self.starts.append(pos)
            pos += part.size
        self.size = pos
        self.random = all(p.random for p in parts)

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = min(offset + length, self.size)
        for start, part in zip(self.starts, self.parts, strict=True):
            lo, hi = max(offset, start), min(end, start + part.size)
            if lo < hi:
                out += part.pread(lo - start, hi - lo)
        return bytes(out)


@dataclass
class Segment:
    """A stretch of a member with its manifest digest."""

    start: int
    end: int
    algo: str
    expected: str
    name: str


class HashingSource(ByteSource):
    """Passes reads through and hashes the bytes in file order against the manifest.

    Reads may come in any order and from several threads.  A read a little past
    the hash cursor first reads the gap, for the hash only; a read far past it (a
    footer at the end of the file) passes unhashed, and :meth:`finish` hashes
    whatever is left at the end.
    """

    name = "ova-manifest"

    def __init__(self, inner: ByteSource, segments: list[Segment], label: str) -> None:
        self.inner = inner
        self.size = inner.size
        self.label = label
        self.random = inner.random
        self.segments = sorted(segments, key=lambda s: s.start)
        self._cursor = 0
        self._index = 0
        self._hash: Any = None
        self._lock = threading.Lock()
        self.checked: list[str] = []

    def pread(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self._cursor < offset <= self._cursor + _HASH_GAP:
                self._hash_up_to(offset)
            data = self.inner.pread(offset, length)
            if offset <= self._cursor < offset + len(data):
                self._feed(memoryview(data)[self._cursor - offset :])
            return data

    def finish(self) -> None:
        """Hash what is left and check every digest; raise on a mismatch."""
        with self._lock:
            self._hash_up_to(self.size)
            if self._index < len(self.segments):
                seg = self.segments[self._index]
                raise CorruptImage(
                    f"{self.label}: OVA member {seg.name} is shorter than its manifest entry "
                    "covers"
                )

    def _hash_up_to(self, end: int) -> None:
        while self._cursor < end:
            n = min(_HASH_CHUNK, end - self._cursor)
            data = self.inner.pread(self._cursor, n)
            if not data:
                raise CorruptImage(f"{self.label}: OVA member ends early at {self._cursor}")
            self._feed(memoryview(data))

    def _feed(self, view: memoryview) -> None:
        while len(view):
            if self._index >= len(self.segments):
                self._cursor += len(view)
                return
            seg = self.segments[self._index]
            if self._cursor < seg.start:
                skip = min(len(view), seg.start - self._cursor)
                view, self._cursor = view[skip:], self._cursor + skip
                continue
            if self._hash is None:
                import hashlib  # noqa: PLC0415 - see list_members

                self._hash = hashlib.new(seg.algo)
            n = min(len(view), seg.end - self._cursor)
            self._hash.update(view[:n])
            view, self._cursor = view[n:], self._cursor + n
            if self._cursor == seg.end:
                self._check(seg)

    def _check(self, seg: Segment) -> None:
        got = self._hash.hexdigest()
        self._hash = None
        self._index += 1
        if got.lower() != seg.expected.lower():
            raise CorruptImage(
                f"{self.label}: OVA manifest {seg.algo.upper()} of {seg.name} does not match "
                f"(manifest {seg.expected.lower()}, file {got}): the appliance is damaged "
                "or was altered"
            )
        self.checked.append(seg.name)


class CheckedStream(Source):
    """The disk's extents, the last one held back until the manifest check passed."""

    name = "ova"

    def __init__(self, inner: Source, hashing: HashingSource) -> None:
        self.inner = inner
        self.hashing = hashing
        self.size = inner.size

    def extents(self) -> Iterator[Extent]:
        held: Extent | None = None
        for ext in self.inner.extents():
            if held is not None:
                yield held
            held = ext
        self.hashing.finish()
        if held is not None:
            yield held

    def close(self) -> None:
        self.inner.close()


# -- tar members and the OVF -------------------------------------------------------


class _Reader(io.RawIOBase):
    """A file object over a random ByteSource, for :mod:`tarfile`."""

    def __init__(self, source: ByteSource) -> None:
        self.source = source
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.source.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        data = self.source.pread(self.pos, min(len(buffer), max(0, self.source.size - self.pos)))
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int


def list_members(source: ByteSource) -> dict[str, Member]:
    """Regular members by name (the last of equal names wins, as tar does)."""
    import tarfile  # noqa: PLC0415 - tarfile, hashlib and the XML parser load when an OVA is read

    members: dict[str, Member] = {}
    try:
        with tarfile.open(fileobj=_Reader(source), mode="r:") as tar:
            for count, info in enumerate(tar):
                if count >= _MAX_MEMBERS:
                    raise CorruptImage(f"{source.label}: OVA has more than {_MAX_MEMBERS} members")
                if not info.isreg():
                    continue
                if info.issparse():
                    raise UnsupportedFormat(
                        f"{source.label}: OVA member {info.name} is a GNU sparse file, which "
                        "is not read in place"
                    )
                if info.offset_data + info.size > source.size:
                    raise CorruptImage(
                        f"{source.label}: OVA member {info.name} runs past the end of the file"
                    )
                name = info.name.removeprefix("./")
                members[name] = Member(name, info.offset_data, info.size)
    except DrivepipeError:
        raise
    except (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError, OSError) as exc:
        raise CorruptImage(f"{source.label}: OVA is not a readable tar: {exc}") from exc
    return members


@dataclass
class OvfFile:
    id: str
    href: str
    size: int | None
    compression: str
    chunk_size: int | None


@dataclass
class OvfDisk:
    id: str
    file_ref: str
    capacity: int | None
    format: str
    file: OvfFile | None = None


@dataclass
class Ovf:
    files: dict[str, OvfFile] = field(default_factory=dict)
    disks: list[OvfDisk] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return value
    return None


_UNITS = {"byte": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20, "gigabytes": 1 << 30}


def _capacity(value: str | None, units: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    mult = 1
    if units:
        u = units.replace(" ", "").lower()
        m = re.fullmatch(r"byte\*2\^(\d+)", u)
        mult = 1 << int(m.group(1)) if m and int(m.group(1)) < 64 else _UNITS.get(u, 1)
    return int(value) * mult


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def parse_ovf(data: bytes, label: str) -> Ovf:
    """References/File and DiskSection/Disk, namespaces ignored."""
    if b"<!DOCTYPE" in data[:4096] or b"<!ENTITY" in data:
        raise CorruptImage(f"{label}: OVF descriptor declares entities; refused")
    import xml.etree.ElementTree as ET  # noqa: PLC0415 - see list_members

    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise CorruptImage(f"{label}: OVF descriptor is not valid XML: {exc}") from exc
    ovf = Ovf()
    for el in root.iter():
        tag = _local(el.tag) if isinstance(el.tag, str) else ""
        if tag == "File":
            fid, href = _attr(el, "id"), _attr(el, "href")
            if fid and href:
                ovf.files[fid] = OvfFile(
                    fid, href, _int(_attr(el, "size")), (_attr(el, "compression") or "").lower(),
                    _int(_attr(el, "chunkSize")),
                )
        elif tag == "Disk":
            did, ref = _attr(el, "diskId"), _attr(el, "fileRef")
            if did and ref:
                units = _attr(el, "capacityAllocationUnits")
                capacity = _capacity(_attr(el, "capacity"), units)
                ovf.disks.append(OvfDisk(did, ref, capacity, _attr(el, "format") or ""))
    for disk in ovf.disks:
        disk.file = ovf.files.get(disk.file_ref)
    return ovf


def parse_manifest(data: bytes) -> dict[str, tuple[str, str]]:
    """``{file name: (hashlib name, hex digest)}``."""
    out: dict[str, tuple[str, str]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        m = _MANIFEST_LINE.match(line)
        if m:
            out[m.group(2).strip().removeprefix("./")] = (_ALGOS[m.group(1)], m.group(3))
    return out


# -- opening -----------------------------------------------------------------------


@dataclass
class Appliance:
    source: ByteSource
    members: dict[str, Member]
    ovf_name: str
    ovf: Ovf
    manifest: dict[str, tuple[str, str]]

    def disk_names(self) -> list[str]:
        return [
            f"{i}: {d.id} ({d.file.href if d.file else d.file_ref + ', no file'})"
            for i, d in enumerate(self.ovf.disks, 1)
        ]


def read_appliance(source: ByteSource) -> Appliance:
    label = source.label
    if not source.random:
        raise UnsupportedFormat(f"{label}: an OVA is read in place: give drivepipe the file")
    members = list_members(source)
    ovfs = [m for m in members.values() if m.name.lower().endswith(".ovf")]
    if not ovfs:
        raise CorruptImage(f"{label}: OVA holds no .ovf descriptor")
    ovf_member = ovfs[0]
    if ovf_member.size > _MAX_OVF:
        raise CorruptImage(f"{label}: OVA descriptor {ovf_member.name} is absurdly large")
    ovf_data = source.pread_exact(ovf_member.offset, ovf_member.size, "OVF descriptor")
    manifest: dict[str, tuple[str, str]] = {}
    mfs = [m for m in members.values() if m.name.lower().endswith(".mf")]
    if mfs and mfs[0].size <= _MAX_MANIFEST:
        manifest = parse_manifest(source.pread_exact(mfs[0].offset, mfs[0].size, "manifest"))
    entry = manifest.get(ovf_member.name)
    import hashlib  # noqa: PLC0415 - see list_members

    if entry is not None and hashlib.new(entry[0], ovf_data).hexdigest() != entry[1].lower():
        raise CorruptImage(
            f"{label}: OVA manifest digest of {ovf_member.name} does not match: the appliance "
            "is damaged or was altered"
        )
    ovf = parse_ovf(ovf_data, f"{label}: {ovf_member.name}")
    return Appliance(source, members, ovf_member.name, ovf, manifest)


def _choose(app: Appliance, disk: str | int | None) -> OvfDisk:
    disks = app.ovf.disks
    label = app.source.label
    if not disks:
        raise CorruptImage(f"{label}: OVA descriptor {app.ovf_name} lists no disks")
    if disk is None:
        if len(disks) == 1:
            return disks[0]
        raise UnsupportedFormat(
            f"{label}: OVA holds {len(disks)} disks ({'; '.join(app.disk_names())}); pick the disk "
            "by its name or number"
        )
    if isinstance(disk, int) or disk.isdigit():
        n = int(disk)
        if 1 <= n <= len(disks):
            return disks[n - 1]
    for d in disks:
        if disk in (d.id, d.file_ref) or (d.file is not None and disk == d.file.href):
            return d
    raise UnsupportedFormat(
        f"{label}: OVA has no disk {disk!r} (it holds: {'; '.join(app.disk_names())})"
    )


def _member_source(app: Appliance, ref: OvfFile) -> tuple[ByteSource, list[Segment]]:
    """The file a reference names, in place, and the manifest entries covering it."""
    label = app.source.label
    segments: list[Segment] = []
    href = ref.href.removeprefix("./")
    member = app.members.get(href)
    if member is not None:
        src: ByteSource = SliceSource(app.source, member.offset, member.size,
                                      f"{label}[{href}]")
        digest = app.manifest.get(href)
        if digest:
            segments.append(Segment(0, member.size, digest[0], digest[1], href))
        return src, segments
    chunks: list[ByteSource] = []
    pos = 0
    while True:
        name = f"{href}.{len(chunks):09d}"
        part = app.members.get(name)
        if part is None:
            break
        chunks.append(SliceSource(app.source, part.offset, part.size, f"{label}[{name}]"))
        digest = app.manifest.get(name)
        if digest:
            segments.append(Segment(pos, pos + part.size, digest[0], digest[1], name))
        pos += part.size
    if not chunks:
        raise CorruptImage(f"{label}: OVA disk file {ref.href!r} is not in the archive")
    return ConcatSource(chunks, f"{label}[{ref.href}]"), segments


def open_ova_disk(
    source: ByteSource, options: OpenOptions, disk: str | int | None = None
) -> ImageInput:
    """Open one disk of the OVA in ``source``: ``disk`` is its id, file name or 1-based
    number; None takes the only disk (and refuses, listing them, when there are several).

    The result owns ``source``; if this raises, the caller closes it.
    """
    app = read_appliance(source)
    chosen = _choose(app, disk)
    if chosen.file is None:
        raise CorruptImage(
            f"{source.label}: OVA disk {chosen.id} names file {chosen.file_ref!r}, which "
            "References does not list"
        )
    ref = chosen.file
    if ref.compression not in ("", "identity", "gzip"):
        raise UnsupportedFormat(
            f"{source.label}: OVA disk file {ref.href} uses unknown compression "
            f"{ref.compression!r}"
        )
    member, segments = _member_source(app, ref)
    hashing = HashingSource(member, segments, member.label) if segments else None
    inner_src = hashing if hashing is not None else member
    head = inner_src.head()
    if ref.compression != "gzip" and VmdkFormat().detect(head, inner_src):
        image = VmdkFormat().open(inner_src, options)
    else:
        image = open_source(inner_src, None, options)
    details: dict[str, object] = {
        "ova_disks": app.disk_names(),
        "ova_disk": chosen.id,
        "ova_file": ref.href,
        "ova_compression": ref.compression or None,
        "ova_chunks": len(member.parts) if isinstance(member, ConcatSource) else None,
        "ovf_capacity": chosen.capacity,
        "manifest": [s.name for s in segments] if segments else None,
        **{f"disk_{k}": v for k, v in image.details.items()},
    }
    details = {k: v for k, v in details.items() if v is not None}
    source_out: Source = image.source
    random_access = image.random_access
    if hashing is not None:
        source_out = CheckedStream(image.source, hashing)
        random_access = None  # every byte must pass the hash, in order
    return ImageInput(
        path=source.label, format=" > ".join(_shown(["ova", *image.chain])), size=image.size,
        source=source_out,
        stages=image.stages, data_size=image.data_size, file_size=source.size,
        random_access=random_access, details=details, chain=["ova", *image.chain],
        resources=[source, *[r for r in image.resources if r is not inner_src]],
    )


def _shown(chain: list[str]) -> list[str]:
    """The chain as ``format`` names it (a raw disk at the end goes without saying)."""
    return chain[:-1] if len(chain) > 1 and chain[-1] == "raw" else chain


def _first_name(head: bytes) -> bytes:
    if len(head) < 512 or head[257:262] != b"ustar":
        return b""
    typeflag = head[156:157]
    if typeflag in (b"x", b"L"):
        # pax header or GNU long name: the name is in the next block(s)
        return head[512:4096]
    return head[:100].split(b"\0", 1)[0]


class OvaFormat(ImageFormat):
    name = "ova"
    detect_order = 25

    def detect(self, head: bytes, source: ByteSource) -> bool:
        name = _first_name(head)
        return bool(name) and (name.lower().endswith(b".ovf") or (
            head[156:157] in (b"x", b"L") and b".ovf" in name.lower()
        ))

    def open(self, source: ByteSource, options: OpenOptions) -> ImageInput:
        return open_ova_disk(source, options, options.disk)


def describe(source: ByteSource) -> list[str]:
    """The disks of an OVA, for messages and ``inspect``."""
    return read_appliance(source).disk_names()


__all__ = ["OvaFormat", "describe", "open_ova_disk"]

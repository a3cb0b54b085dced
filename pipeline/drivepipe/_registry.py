"""Finds plugins through entry points and picks the format of an image.

Formats live in the ``drivepipe.formats`` entry-point group and stages in
``drivepipe.stages``; drivepipe's own plugins are declared there by its
``pyproject.toml`` like anybody else's.  Detection reads the first 4 KiB and
asks each format in ``detect_order``; never the file name.
"""

from __future__ import annotations

import os
from functools import cache
from importlib.metadata import entry_points

from ._errors import CorruptImage, ImageError, UnsupportedFormat, UsageError
from ._stage import ImageFormat, ImageInput, OpenOptions, Stage

FORMATS_GROUP = "drivepipe.formats"
STAGES_GROUP = "drivepipe.stages"
HEAD_SIZE = 4096

#: formats we recognise but do not decode: refused rather than sent as raw
FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor"),
    (0, b"vhdxfile", "VHDX"),
    (64, b"\x7f\x10\xda\xbe", "VDI"),
    (0, b"conectix", "VHD (dynamic)"),
    (0, b"QFI\xfb", "qcow"),  # only reached when the qcow2 plugin refused the version
    (0, b"QED\x00", "QED"),
)


@cache
def formats() -> dict[str, ImageFormat]:
    """Every installed format, by name, in detection order."""
    found: list[ImageFormat] = []
    for ep in entry_points(group=FORMATS_GROUP):
        cls = ep.load()
        fmt = cls()
        if not isinstance(fmt, ImageFormat):
            raise TypeError(f"entry point {ep.name!r} is not an ImageFormat")
        found.append(fmt)
    found.sort(key=lambda f: (f.detect_order, f.name))
    return {f.name: f for f in found}


@cache
def stages() -> dict[str, type[Stage]]:
    """Every installed stage class, by entry-point name."""
    return {ep.name: ep.load() for ep in entry_points(group=STAGES_GROUP)}


def read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_SIZE)
            # A VHD footer sits in the last 512 bytes; fixed VHDs are raw plus footer.
            return head
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{path}: is a directory") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _vhd_footer(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 512:
                return False
            f.seek(size - 512)
            return f.read(8) == b"conectix"
    except OSError:
        return False


def foreign_format(path: str, head: bytes) -> str | None:
    """Name of a format we recognise but refuse, or None."""
    for offset, magic, name in FOREIGN_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    if _vhd_footer(path):
        return "VHD (fixed)"
    return None


def detect(path: str) -> ImageFormat:
    """The format of ``path`` from its magic bytes; raw when nothing else matches."""
    head = read_head(path)
    all_formats = formats()
    for fmt in all_formats.values():
        if fmt.name != "raw" and fmt.detect(head):
            return fmt
    foreign = foreign_format(path, head)
    if foreign is not None:
        raise UnsupportedFormat(
            f"{path}: looks like a {foreign} image, which drivepipe does not decode; "
            "convert it first (qemu-img convert -O raw) or pass --format raw to send it as is"
        )
    return all_formats["raw"]


def get_format(name: str) -> ImageFormat:
    try:
        return formats()[name]
    except KeyError:
        known = ", ".join(formats())
        raise UsageError(f"unknown format {name!r} (known: {known})") from None


def open_image(
    path: str, format: str | None = None, options: OpenOptions | None = None
) -> ImageInput:
    """Open ``path`` as its detected (or the given) format."""
    fmt = get_format(format) if format and format != "auto" else detect(path)
    try:
        return fmt.open(path, options or OpenOptions())
    except (ImageError, UsageError):
        raise
    except EOFError as exc:
        raise CorruptImage(f"{path}: truncated {fmt.name} image") from exc

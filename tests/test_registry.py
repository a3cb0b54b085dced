"""The registry: plugins from entry points, detection by magic, foreign formats refused."""

from __future__ import annotations

import random
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from drivepipe._errors import CorruptImage, ImageError, UnsupportedFormat, UsageError
from drivepipe._registry import (
    FORMATS_GROUP,
    STAGES_GROUP,
    detect,
    formats,
    get_format,
    open_image,
    stages,
)
from drivepipe._stage import ImageFormat, Stage
from drivepipe.cli._flags import with_flags
from drivepipe_plugins.formats.raw import RawFormat
from drivepipe_plugins.stages.xxh3 import Xxh3Stage


def image(tmp_path: Path, name: str, head: bytes, offset: int = 0, size: int = 64 << 10) -> Path:
    data = bytearray(random.Random(size).randbytes(size))
    data[offset : offset + len(head)] = head
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_formats_come_from_the_entry_point_group_and_raw_is_tried_last() -> None:
    found = formats()
    declared = {ep.name for ep in entry_points(group=FORMATS_GROUP)}
    assert set(found) == declared
    assert isinstance(found["raw"], RawFormat)
    assert all(isinstance(f, ImageFormat) for f in found.values())
    assert list(found)[-1] == "raw"
    orders = [f.detect_order for f in found.values()]
    assert orders == sorted(orders)


def test_stages_come_from_the_entry_point_group() -> None:
    found = stages()
    assert {ep.name for ep in entry_points(group=STAGES_GROUP)} == set(found)
    assert found["xxh3"] is Xxh3Stage
    assert all(issubclass(cls, Stage) for cls in found.values())


def test_unrecognised_bytes_are_raw_whatever_the_name(tmp_path: Path) -> None:
    for name in ("disk.qcow2", "disk.vmdk", "disk.gz", "noext"):
        assert detect(str(image(tmp_path, name, b"\x00\x01 not a magic"))).name == "raw"


def test_empty_and_tiny_files_are_raw(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    (tmp_path / "tiny").write_bytes(b"con")
    assert detect(str(tmp_path / "empty")).name == "raw"
    assert detect(str(tmp_path / "tiny")).name == "raw"


FOREIGN = [
    ("qed", b"QED\x00", 0, "QED"),
]


@pytest.mark.parametrize(("kind", "magic", "offset", "label"), FOREIGN, ids=[f[0] for f in FOREIGN])
def test_foreign_formats_are_refused_with_a_clear_message(
    tmp_path: Path, kind: str, magic: bytes, offset: int, label: str
) -> None:
    path = image(tmp_path, f"{kind}.img", magic, offset)
    with pytest.raises(UnsupportedFormat) as info:
        detect(str(path))
    message = info.value.one_line()
    assert f"looks like a {label} image" in message
    assert str(path) in message
    # the library names no CLI flag; the command line's rendering of the line does
    assert "qemu-img convert" in message and "read it as raw" in message
    assert "--" not in message.replace("qemu-img convert -O raw", "")
    assert "--format raw" in with_flags(message)
    assert info.value.exit_code == 3
    with pytest.raises(UnsupportedFormat):
        open_image(str(path))
    with pytest.raises(UnsupportedFormat):
        open_image(str(path), "auto")


@pytest.mark.parametrize(("kind", "magic", "offset", "label"), FOREIGN, ids=[f[0] for f in FOREIGN])
def test_format_raw_overrides_detection(
    tmp_path: Path, kind: str, magic: bytes, offset: int, label: str
) -> None:
    path = image(tmp_path, f"{kind}.img", magic, offset)
    opened = open_image(str(path), "raw")
    try:
        assert opened.format == "raw"
        assert opened.size == path.stat().st_size
    finally:
        opened.close()


def test_fixed_vhd_is_recognised_by_its_footer(tmp_path: Path) -> None:
    path = image(tmp_path, "fixed.vhd", b"conectix", offset=(64 << 10) - 512)
    assert detect(str(path)).name == "vhd"
    with pytest.raises(CorruptImage, match="checksum"):  # a junk footer is no VHD
        open_image(str(path))
    # the magic anywhere else is just data
    other = image(tmp_path, "data.raw", b"conectix", offset=(64 << 10) - 1024)
    assert detect(str(other)).name == "raw"


def test_unknown_format_name_is_a_usage_error_listing_the_known_ones() -> None:
    with pytest.raises(UsageError, match="unknown format 'nope'") as info:
        get_format("nope")
    assert "raw" in str(info.value)
    assert info.value.exit_code == 2


def test_unreadable_inputs_are_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        detect(str(tmp_path / "missing"))
    with pytest.raises(ImageError, match="is a directory"):
        detect(str(tmp_path))

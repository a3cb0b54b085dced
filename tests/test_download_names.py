"""Output names a server proposes (Content-Disposition) are made safe."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivepipe._names import (
    default_filename,
    disposition_filename,
    sanitize_filename,
)
from drivepipe._remote import ProbeResult


@pytest.mark.parametrize(("header", "name"), [
    ('attachment; filename="disk.img"', "disk.img"),
    ("attachment; filename=disk.img", "disk.img"),
    ('attachment; filename="a \\"b\\".img"', 'a "b".img'),
    ("attachment; filename*=UTF-8''d%C3%A9j%C3%A0.img; filename=\"x\"", "déjà.img"),
    ("attachment; filename*=bogus-charset''disk%2Eimg", "disk.img"),
    ("inline", None),
    (None, None),
])
def test_disposition_filename(header: str | None, name: str | None) -> None:
    assert disposition_filename(header) == name


@pytest.mark.parametrize(("proposed", "safe"), [
    ("../x", "x"), ("/etc/x", "x"), ("..\\..\\x", "x"), ("..", None), (".", None),
    ("...hidden", "hidden"), ("a\x00b\nc", "abc"), ("dir/", None), ("", None), (None, None),
    (" spaced ", "spaced"),
])
def test_sanitize_filename(proposed: str | None, safe: str | None) -> None:
    assert sanitize_filename(proposed) == safe


@settings(deadline=None)  # a loaded CI box must not turn slowness into a failure
@given(st.text(max_size=300))
def test_sanitized_names_never_leave_the_directory(text: str) -> None:
    name = sanitize_filename(text)
    if name is not None:
        assert "/" not in name and "\\" not in name and "\x00" not in name
        assert not name.startswith(".") and len(name) <= 200
        assert name == name.strip()


def probed(disposition: str | None, url: str = "http://h/api/2.0/drives/U/download/"
           ) -> ProbeResult:
    return ProbeResult(url, url, False, 1, True, None, None, disposition)


def test_default_filename_fallbacks() -> None:
    assert default_filename(probed('attachment; filename="../../u"'), "uuid") == "u"
    assert default_filename(probed('attachment; filename=".."'), "uuid") == "uuid"
    assert default_filename(probed(None), None) == "download"
    assert default_filename(probed(None, "http://h/files/disk.raw?x=1"), None) == "disk.raw"
    assert default_filename(probed(None, "http://h/"), None) == "download"

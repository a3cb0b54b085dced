"""Output names for downloads: what a server proposes, made safe for the current directory.

What goes in: a ``Content-Disposition`` header (RFC 6266, ``filename`` and
RFC 5987 ``filename*``), a fallback (the drive UUID), the URL the user gave.
What comes out: a plain base name - no directory parts, no NUL or control
characters, no leading dots or spaces (no hidden files, no ``..``), at most 200
characters.  Refused (None, so the next fallback is used): names with nothing
safe left.  The last resort is ``download``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # only for a type: a local convert does not load the network side
    from drivepipe._remote import ProbeResult

_NAME_MAX = 200


def disposition_filename(header: str | None) -> str | None:
    """The file name a ``Content-Disposition`` header proposes (RFC 6266), unsanitized."""
    if not header:
        return None
    extended = re.search(r"filename\*\s*=\s*([^;]+)", header, re.IGNORECASE)
    if extended:
        value = extended.group(1).strip().strip('"')
        charset, _, rest = value.partition("'")
        _, _, encoded = rest.partition("'")
        if encoded:
            try:
                return unquote(encoded, encoding=charset or "utf-8", errors="replace")
            except LookupError:  # a charset Python does not know
                return unquote(encoded, errors="replace")
    plain = re.search(r'filename\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]+)', header, re.IGNORECASE)
    if not plain:
        return None
    if plain.group(2) is not None:
        return re.sub(r"\\(.)", r"\1", plain.group(2))
    return plain.group(1).strip()


def sanitize_filename(name: str | None) -> str | None:
    """A safe base name from a server-proposed one, or None if nothing safe is left.

    Only the last path component survives (``/`` and ``\\`` both separate), control
    characters and NUL are dropped, leading dots and spaces are stripped (no hidden
    files, no ``..``), and the result is at most 200 characters.
    """
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = re.sub(r"^[\s.]+", "", name)[:_NAME_MAX].rstrip()
    if not name or name in (".", ".."):
        return None
    return name


def default_filename(probed: ProbeResult, fallback: str | None) -> str:
    """Content-Disposition's name, else ``fallback`` (a UUID), else the URL's last segment."""
    for candidate in (disposition_filename(probed.disposition), fallback,
                      urlsplit(probed.url).path.rstrip("/").rsplit("/", 1)[-1]):
        safe = sanitize_filename(candidate)
        if safe:
            return safe
    return "download"


#: extensions of the formats drivepipe reads; ``convert SRC DIR/`` strips them
FORMAT_EXTENSIONS = frozenset({
    "gz", "gzip", "xz", "zst", "zstd", "bz2", "qcow2", "qcow", "raw", "img", "vmdk", "vhd",
    "vhdx", "vdi",
})


def raw_name_for(src: str) -> str:
    """The name ``convert SRC DIR/`` gives its output inside DIR.

    SRC's base name with every trailing format extension stripped (``.qcow2``,
    ``.gz``, ``.img``, ... see :data:`FORMAT_EXTENSIONS`, any case), then ``.raw``:
    ``/srv/disk.qcow2.gz`` -> ``disk.raw``, ``web.img.xz`` -> ``web.raw``,
    ``backup.2024`` -> ``backup.2024.raw``.  Nothing left (``.qcow2``, ``-``):
    ``image.raw``.
    """
    stem = os.path.basename(src.rstrip("/"))
    while "." in stem:
        head, _, ext = stem.rpartition(".")
        if ext.lower() not in FORMAT_EXTENSIONS:
            break
        stem = head
    safe = sanitize_filename(stem)
    return f"{safe if safe and safe != '-' else 'image'}.raw"

"""The resume journal of a download: which blocks of ``NAME.part`` are done.

What goes in: the identity of the source (the URL the user gave, with its query
replaced by a SHA-256 so signed-link secrets never reach the disk, the size, the
ETag and Last-Modified), the block size, and one xxh3-64 digest per completed
block.  What comes out: a small JSON file beside the ``.part`` file, replaced
atomically (write a temporary file, fsync it, rename it over the old one), so a
crash at any moment leaves either the old or the new journal, never half of one.

A journal is only trusted for the same source: :meth:`DownloadJournal.matches`
compares the identity, and the downloader re-hashes every kept block against
its digest before keeping it.  A journal that is unreadable, of another
version, or inconsistent (a block index out of range, a digest that is not hex)
is refused by :func:`load_journal` returning ``None``, which means "start over".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import xxhash

from drivepipe._files import output_error
from drivepipe.resume.atomic import replace_file

JOURNAL_VERSION = 1
JOURNAL_SUFFIX = ".journal"
_HEX64 = frozenset("0123456789abcdef")


def block_digest(data: bytes | bytearray | memoryview) -> str:
    """The per-block digest the journal records (xxh3-64, 16 hex digits)."""
    return xxhash.xxh3_64_hexdigest(data)


#: query parameters of signed links (ours, S3, GCS, Azure SAS): a fresh link to the same
#: object differs only in these, so they are not part of what identifies the source
_SIGNING_PARAMS = frozenset({
    "expires", "sig", "signature", "token", "x-amz-algorithm", "x-amz-credential",
    "x-amz-date", "x-amz-expires", "x-amz-signature", "x-amz-signedheaders",
    "x-amz-security-token", "x-goog-algorithm", "x-goog-credential", "x-goog-date",
    "x-goog-expires", "x-goog-signature", "x-goog-signedheaders", "awsaccesskeyid",
    "googleaccessid", "se", "sp", "spr", "sr", "st", "sv", "skoid", "sktid",
})


def source_key(url: str) -> str:
    """A stable, secret-free name for ``url``: origin and path, plus a hash of the rest.

    Signing parameters (``expires``, ``sig``, ``X-Amz-Signature``, ...) are left out:
    a fresh signed link to the same drive resumes the same ``.part`` (the size and
    the ETag/Last-Modified validators still have to match).
    """
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.hostname or ''}"
    if parts.port:
        shown += f":{parts.port}"
    shown += parts.path
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in _SIGNING_PARAMS]
    if kept:
        shown += "?sha256=" + hashlib.sha256(urlencode(sorted(kept)).encode()).hexdigest()[:32]
    return shown


@dataclass(frozen=True)
class SourceIdentity:
    """What must stay the same for a kept block to still belong to the source."""

    source: str
    size: int
    etag: str | None = None
    last_modified: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "size": self.size, "etag": self.etag,
                "last_modified": self.last_modified}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceIdentity:
        return cls(str(data["source"]), int(data["size"]), _opt_str(data.get("etag")),
                   _opt_str(data.get("last_modified")))


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass
class DownloadJournal:
    """Done blocks of one download; ``blocks`` maps block index -> digest."""

    identity: SourceIdentity
    block_size: int
    blocks: dict[int, str] = field(default_factory=dict)

    @property
    def block_count(self) -> int:
        return -(-self.identity.size // self.block_size)

    def block_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of block ``index``; the last one may be short."""
        start = index * self.block_size
        return start, min(self.block_size, self.identity.size - start)

    def matches(self, identity: SourceIdentity, block_size: int) -> bool:
        return self.identity == identity and self.block_size == block_size

    def done_bytes(self) -> int:
        return sum(self.block_span(i)[1] for i in self.blocks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": JOURNAL_VERSION,
            "identity": self.identity.as_dict(),
            "block_size": self.block_size,
            "digest": "xxh3-64",
            "blocks": {str(i): d for i, d in sorted(self.blocks.items())},
        }

    def save(self, path: str) -> None:
        """Replace the journal at ``path`` atomically and durably (:func:`replace_file`)."""
        self.write_snapshot(path, self.snapshot())

    def snapshot(self) -> str:
        """The journal's text as it is now (for :meth:`write_snapshot`, maybe in another
        thread)."""
        return json.dumps(self.as_dict(), separators=(",", ":"))

    @staticmethod
    def write_snapshot(path: str, text: str) -> None:
        """Replace the journal at ``path`` with ``text`` (a :meth:`snapshot`)."""
        try:
            replace_file(path, text, prefix=f".{os.path.basename(path)}.", mode=0o644)
        except OSError as exc:
            raise output_error(path, exc) from exc


def parse_journal(data: Any) -> DownloadJournal | None:
    """A journal from its JSON form, or None when anything about it is off."""
    if not isinstance(data, dict) or data.get("version") != JOURNAL_VERSION:
        return None
    try:
        identity = SourceIdentity.from_dict(data["identity"])
        journal = DownloadJournal(identity, int(data["block_size"]))
        raw_blocks = data["blocks"]
        if journal.block_size <= 0 or identity.size < 0 or not isinstance(raw_blocks, dict):
            return None
        for key, digest in raw_blocks.items():
            index = int(key)
            if not 0 <= index < journal.block_count or not _is_hex64(digest):
                return None
            journal.blocks[index] = digest
    except (KeyError, TypeError, ValueError):
        return None
    return journal


def _is_hex64(value: object) -> bool:
    return isinstance(value, str) and len(value) == 16 and set(value) <= _HEX64


def load_journal(path: str) -> DownloadJournal | None:
    """The journal at ``path``; None if there is none or it cannot be trusted."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_journal(json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def remove_journal(path: str) -> None:
    for name in (path, f"{path}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)

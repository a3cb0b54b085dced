"""The resume journal of a chunked upload: what was sent where, from which image.

In: the drive UUID, the endpoint's API URL, the identity of the image file
(path, size, mtime_ns, inode, and the xxh3-128 of its first MiB), the chunk
size, and the chunk numbers the server has confirmed.

Out: one small JSON file, by default
``$XDG_CACHE_HOME/drivepipe/uploads/<key>.json`` (``~/.cache`` without
``XDG_CACHE_HOME``), the key a digest of the image's real path and the API URL,
so rerunning the same command finds it.  Every save is atomic: a temporary
file beside it, ``fsync``, ``rename``, ``fsync`` of the directory; a crash
leaves the old or the new journal, never a torn one.  Confirmed chunks are
stored as ``[first, end)`` ranges so a journal of 100 000 chunks stays small.

Refused (:class:`JournalError`, one line naming the file): a journal that is
not valid JSON of this version.  Deciding whether a journal may be resumed
(same image, same drive) is the uploader's job; :meth:`ImageIdentity.differences`
says what changed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from drivepipe._errors import ImageError, OutputError, UsageError
from drivepipe._locks import lock_exclusive
from drivepipe.resume.atomic import replace_file

VERSION = 1
#: the part of the image whose digest is part of its identity
HEAD_BYTES = 1 << 20


class JournalError(UsageError):
    """A journal file that cannot be read back."""


@dataclass(frozen=True)
class ImageIdentity:
    """Enough about a file to notice that it is not the one an upload started from."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    head_xxh3: str

    @classmethod
    def of(cls, path: str) -> ImageIdentity:
        real = os.path.realpath(path)
        try:
            with open(real, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(HEAD_BYTES)
                size = st.st_size or f.seek(0, os.SEEK_END)  # block devices report st_size 0
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        return cls(real, size, st.st_mtime_ns, st.st_ino, xxhash.xxh3_128_hexdigest(head))

    def differences(self, other: ImageIdentity) -> list[str]:
        """Human words for each field that differs between ``self`` and ``other``."""
        words = {
            "path": "path", "size": "size", "mtime_ns": "modification time",
            "inode": "inode", "head_xxh3": "content of the first MiB",
        }
        return [word for key, word in words.items() if getattr(self, key) != getattr(other, key)]

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "inode": self.inode, "head_xxh3": self.head_xxh3}

    @classmethod
    def from_dict(cls, data: Any) -> ImageIdentity:
        return cls(str(data["path"]), int(data["size"]), int(data["mtime_ns"]),
                   int(data["inode"]), str(data["head_xxh3"]))


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "drivepipe", "uploads")


def default_journal_path(image_path: str, api_url: str) -> str:
    """Where the journal of uploading ``image_path`` to ``api_url`` lives by default."""
    key = xxhash.xxh3_64_hexdigest(f"{os.path.realpath(image_path)}\0{api_url}".encode())
    return os.path.join(cache_dir(), f"{key}.json")


def to_ranges(numbers: Iterable[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` -> ``[[0, 3], [5, 6]]``."""
    out: list[list[int]] = []
    for n in sorted(set(numbers)):
        if out and out[-1][1] == n:
            out[-1][1] = n + 1
        else:
            out.append([n, n + 1])
    return out


def from_ranges(ranges: Iterable[Any]) -> set[int]:
    numbers: set[int] = set()
    for first, end in ranges:
        numbers.update(range(int(first), int(end)))
    return numbers


@dataclass(frozen=True)
class ChunkPlan:
    """How ``size`` bytes split into chunks of nominal size ``chunk_size``."""

    size: int
    chunk_size: int

    @property
    def count(self) -> int:
        return max(1, self.size // self.chunk_size)

    def span(self, number: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``number``; the last one takes the remainder."""
        offset = number * self.chunk_size
        if number == self.count - 1:
            return offset, self.size - offset
        return offset, self.chunk_size


@dataclass
class UploadJournal:
    """The state of one chunked upload, saved at ``path``."""

    path: str
    uuid: str
    api: str
    image: ImageIdentity
    raw_size: int
    chunk_size: int
    confirmed: set[int] = field(default_factory=set)

    @property
    def plan(self) -> ChunkPlan:
        """How the image splits into the chunks this journal numbers."""
        return ChunkPlan(self.raw_size, self.chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION, "uuid": self.uuid, "api": self.api,
            "image": self.image.as_dict(), "raw_size": self.raw_size,
            "chunk_size": self.chunk_size, "confirmed": to_ranges(self.confirmed),
        }

    @classmethod
    def load(cls, path: str) -> UploadJournal | None:
        """The journal at ``path``, or None when there is none."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JournalError(f"upload journal {path} is unreadable ({exc}); delete it to "
                               "start over") from exc
        try:
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}")
            return cls(path, str(data["uuid"]), str(data["api"]),
                       ImageIdentity.from_dict(data["image"]), int(data["raw_size"]),
                       int(data["chunk_size"]), from_ranges(data["confirmed"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"upload journal {path} is not a drivepipe journal ({exc}); "
                               "delete it to start over") from exc

    def save(self) -> None:
        """Replace the file atomically with the current state."""
        self.write_snapshot(self.snapshot())

    def snapshot(self) -> str:
        """The current state as the file's text (cheap: the confirmed chunks are ranges)."""
        return json.dumps(self.to_json())

    def write_snapshot(self, text: str) -> None:
        """Replace the file atomically with ``text`` (a :meth:`snapshot`); may run in
        another thread than the one that took the snapshot."""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                        exist_ok=True)
            replace_file(self.path, text, prefix=".journal-")
        except OSError as exc:
            raise OutputError(f"cannot write upload journal {self.path}: "
                              f"{exc.strerror or exc}") from exc

    def confirm(self, number: int) -> None:
        self.confirmed.add(number)
        self.save()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class JournalLock:
    """An exclusive ``flock`` on ``<journal>.lock`` for the length of one upload.

    Two runs resuming the same journal would race on its confirmations; the
    second is refused at once.  The kernel drops the lock when a process dies,
    so a killed run never blocks the next one.
    """

    def __init__(self, journal_path: str) -> None:
        self.path = f"{journal_path}.lock"
        self._fd = -1

    def __enter__(self) -> JournalLock:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {directory}: {exc.strerror or exc}") from exc
        self._fd = lock_exclusive(self.path, JournalError(
            f"another drivepipe upload is using {self.path[:-5]}; wait for it, or give "
            "another journal path to upload separately"))
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

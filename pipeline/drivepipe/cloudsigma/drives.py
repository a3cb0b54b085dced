"""The drives of an account: list, look up, delete, wait for; interrupted chunked uploads.

In: an :class:`~drivepipe.cloudsigma.api.ApiClient` (one endpoint, one account).  Out:
:class:`Drive` values built from the JSON API's answers
(``GET /drives/detail/``, ``GET /drives/{uuid}/``), deletions
(``DELETE /drives/{uuid}/``, 204), and :class:`PendingUpload` values for the
chunked-upload journals left in the journal directory.  Nothing here prints;
the CLI renders what these functions return.

A drive is *ready* (downloadable) when ``runtime.is_downloadable`` says so, or,
when the server does not say, when its status is ``unmounted`` or ``mounted``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from drivepipe._errors import HTTPError, TransferError, UsageError
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.resume.upload_journal import JournalError, UploadJournal, cache_dir
from drivepipe.transport.curl import UUID_RE

META_DIGEST = "drivepipe_xxh128"
META_SIZE = "drivepipe_size"
READY_STATUSES = frozenset({"unmounted", "mounted"})
#: statuses after which waiting longer cannot make a drive downloadable
DEAD_STATUSES = frozenset({"unavailable"})
#: drives fetched per page of ``GET /drives/detail/``
PAGE = 100


class DriveTimeout(TransferError):
    """A drive did not become downloadable in the time given."""


def default_drive_name(image_path: str) -> str:
    """A new drive's name: the image's file name (``/srv/disk.qcow2`` -> ``disk.qcow2``);
    of a URL, the last part of its path (never its query: signed links carry secrets)."""
    if image_path == "-":
        return "stdin"
    if "://" in image_path:
        image_path = unquote(urlsplit(image_path).path)
    return os.path.basename(image_path.rstrip("/")) or "drivepipe"


def check_uuid(text: str) -> str:
    """``text`` as a lower-case drive UUID; a UsageError if it is not one."""
    if not UUID_RE.match(text):
        raise UsageError(f"not a drive UUID: {text!r}")
    return text.lower()


@dataclass(frozen=True)
class Drive:
    """What the API says about one drive."""

    uuid: str
    name: str
    size: int
    status: str
    media: str = "disk"
    ready: bool = False
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_api(cls, obj: Any) -> Drive:
        if not isinstance(obj, dict) or not isinstance(obj.get("uuid"), str):
            raise TransferError(f"the API answered a drive without a uuid: {str(obj)[:80]!r}")
        status = str(obj.get("status") or "unknown")
        runtime = obj.get("runtime")
        flag = runtime.get("is_downloadable") if isinstance(runtime, dict) else None
        ready = flag if isinstance(flag, bool) else status in READY_STATUSES
        meta = obj.get("meta")
        return cls(
            uuid=obj["uuid"], name=str(obj.get("name") or ""), size=_whole(obj.get("size")),
            status=status, media=str(obj.get("media") or "disk"), ready=ready,
            meta={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        )

    @property
    def checksum(self) -> str | None:
        """The xxh3-128 a drivepipe upload stored in the meta, if any."""
        return self.meta.get(META_DIGEST)

    @property
    def checksum_size(self) -> int | None:
        """How many leading bytes :attr:`checksum` covers (the image's size)."""
        text = self.meta.get(META_SIZE, "")
        return int(text) if text.isdigit() else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid, "name": self.name, "size": self.size, "status": self.status,
            "media": self.media, "downloadable": self.ready, "xxh128": self.checksum,
            "xxh128_size": self.checksum_size, "meta": dict(self.meta),
        }


def _whole(value: Any) -> int:
    # Sizes may come as floats (1073741824.0).
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return int(value)
    return 0


def list_drives(api: ApiClient) -> list[Drive]:
    """Every drive of the account, page by page, in the order the API lists them."""
    drives: list[Drive] = []
    while True:
        data = api.get_json("drives/detail/", {"limit": PAGE, "offset": len(drives)})
        objects = data.get("objects") if isinstance(data, dict) else None
        if not isinstance(objects, list):
            raise TransferError("the drive list answer holds no objects")
        drives.extend(Drive.from_api(obj) for obj in objects)
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        total = meta.get("total_count")
        if not objects or not isinstance(total, int) or len(drives) >= total:
            return drives


def get_drive(api: ApiClient, uuid: str) -> Drive:
    return Drive.from_api(api.drive(check_uuid(uuid)))


def delete_drive(api: ApiClient, uuid: str) -> None:
    uuid = check_uuid(uuid)
    api.request("DELETE", api.url(f"drives/{uuid}/"), what=f"delete drive {uuid}")


def wait_ready(
    api: ApiClient,
    uuid: str,
    timeout: float,
    *,
    interval: float = 2.0,
    on_poll: Callable[[Drive], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Drive:
    """Poll the drive until it is downloadable; DriveTimeout after ``timeout`` seconds."""
    deadline = clock() + timeout
    while True:
        drive = get_drive(api, uuid)
        if on_poll is not None:
            on_poll(drive)
        if drive.ready:
            return drive
        if drive.status in DEAD_STATUSES:
            raise TransferError(f"drive {drive.uuid} is {drive.status}: it will not become "
                                "downloadable")
        left = deadline - clock()
        if left <= 0:
            raise DriveTimeout(f"drive {drive.uuid} is still {drive.status} after "
                               f"{timeout:g} s (not downloadable yet)")
        sleep(min(interval, left))


# --- interrupted chunked uploads --------------------------------------------------------


@dataclass(frozen=True)
class PendingUpload:
    """A chunked upload whose journal is still there: interrupted, or running now."""

    journal: UploadJournal
    #: another drivepipe process holds the journal's lock (the upload is running)
    running: bool

    @property
    def chunks(self) -> int:
        return self.journal.plan.count

    @property
    def confirmed(self) -> int:
        return len(self.journal.confirmed & set(range(self.chunks)))

    def as_dict(self) -> dict[str, Any]:
        j = self.journal
        return {
            "uuid": j.uuid, "endpoint": j.api, "image": j.image.path, "size": j.raw_size,
            "chunk_size": j.chunk_size, "chunks": self.chunks, "confirmed": self.confirmed,
            "running": self.running, "journal": j.path,
        }


def _locked_by_another(journal_path: str) -> bool:
    lock = f"{journal_path}.lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def pending_uploads(
    directory: str | None = None, problems: list[str] | None = None
) -> list[PendingUpload]:
    """The journals in ``directory`` (default: the journal cache), oldest first.

    Journals that cannot be read are skipped; their one-line reasons are appended to
    ``problems`` when given.
    """
    found: list[tuple[float, PendingUpload]] = []
    for path in _journal_files(directory or cache_dir()):
        try:
            journal = UploadJournal.load(path)
            mtime = os.path.getmtime(path)
        except (JournalError, OSError) as exc:
            if problems is not None:
                problems.append(str(exc))
            continue
        if journal is not None:
            found.append((mtime, PendingUpload(journal, _locked_by_another(path))))
    return [pending for _, pending in sorted(found, key=lambda item: item[0])]


def _journal_files(directory: str) -> Iterator[str]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".json") and not name.startswith("."):
                yield os.path.join(directory, name)


def find_pending(uuid: str, directory: str | None = None) -> PendingUpload:
    """The pending upload into drive ``uuid``; a UsageError if no journal names it."""
    uuid = check_uuid(uuid)
    for pending in pending_uploads(directory):
        if pending.journal.uuid == uuid:
            return pending
    raise UsageError(f"no interrupted upload into drive {uuid} is known "
                     "(see drivepipe drives uploads)")


def discard_upload(pending: PendingUpload, api: ApiClient | None) -> bool:
    """Forget ``pending``: delete its partial drive (through ``api``), then its journal.

    Returns True if a drive was deleted (False: none was asked for, or it was gone).
    Refused while the upload is running.  A drive that is no longer uploading is
    kept: it is complete and may be in use.
    """
    journal = pending.journal
    if pending.running or _locked_by_another(journal.path):
        raise UsageError(f"the upload into drive {journal.uuid} is running right now; stop "
                         "it first")
    deleted = False
    if api is not None:
        try:
            drive = get_drive(api, journal.uuid)
        except HTTPError as exc:
            if exc.status != 404:
                raise
        else:
            if drive.status == "uploading":
                delete_drive(api, journal.uuid)
                deleted = True
    journal.remove()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{journal.path}.lock")
    return deleted

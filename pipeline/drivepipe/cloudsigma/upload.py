"""What an upload into a new drive is asked to do, and what a drive target gives back.

The contract between :func:`drivepipe.jobs.upload.upload` and the drive targets (the
``drive`` and ``drive-chunked`` entry points of ``drivepipe.targets``, or a third
party's): the job builds a target with ``cls.for_upload(connection, options, image)``
(:class:`DriveTarget`), runs it as the sink of the pipeline, and gets a
:class:`SentDrive` back.  Library messages name these fields in words ("the chunk
size"); the CLI adds its flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from drivepipe._errors import UsageError
from drivepipe._stage import ImageInput, Sink
from drivepipe.cloudsigma.connection import Connection
from drivepipe.transport.retry import TRANSFER_POLICY, RetryPolicy

#: libcurl refuses upload buffers outside this range (CURLOPT_UPLOAD_BUFFERSIZE)
MIN_BUFFER_SIZE = 16 << 10
MAX_BUFFER_SIZE = 2 << 20
DEFAULT_BUFFER_SIZE = 1 << 20
#: chunk bytes held in memory at most by a chunked upload (unless two chunks are larger)
MEMORY_BUDGET = 256 << 20


@dataclass
class UploadOptions:
    """How an image goes into a new drive; every field has the CLI's default."""

    #: resumable upload in chunks over several connections (else one POST)
    chunked: bool = False
    #: the drive's name (default: from the image's file name)
    name: str | None = None
    media: str = "disk"
    #: store the xxh3-128 and raw size in the drive's meta after the upload
    meta: bool = True
    #: more meta fields to set with them
    extra_meta: dict[str, str] = field(default_factory=dict)
    #: direct upload: libcurl's upload buffer
    buffer_size: int = DEFAULT_BUFFER_SIZE
    #: extents between the reading thread and the sender
    queue_depth: int = 16
    #: chunked upload: nominal chunk size, parallel connections
    chunk_size: int = 32 << 20
    connections: int = 4
    #: chunked upload: continue into this drive (with or without a journal)
    resume_uuid: str | None = None
    #: chunked upload: the journal file (default: in the user's cache, keyed by image
    #: and endpoint)
    journal_path: str | None = None
    #: fewer chunks are in flight than ``connections`` when their data would exceed this
    memory_budget: int = MEMORY_BUDGET
    #: seconds the drive may stay "uploading" once every chunk is confirmed
    finish_timeout: float = 30.0
    #: retries of a chunk, and of a direct upload the server refused before taking it
    policy: RetryPolicy = TRANSFER_POLICY
    #: while curl runs, route Ctrl-C (SIGINT, main thread) to a clean stop of the transfer;
    #: the library installs no signal handler unless this is set (the CLI sets it)
    handle_signals: bool = False

    @property
    def is_chunked(self) -> bool:
        return self.chunked or self.resume_uuid is not None

    @property
    def target(self) -> str:
        """The name of the drive target in ``drivepipe.targets``."""
        return "drive-chunked" if self.is_chunked else "drive"

    def check(self) -> None:
        """Refuse contradictory or impossible options (before any password prompt)."""
        if not MIN_BUFFER_SIZE <= self.buffer_size <= MAX_BUFFER_SIZE:
            raise UsageError(f"the upload buffer must be between {MIN_BUFFER_SIZE >> 10} KiB "
                             f"and {MAX_BUFFER_SIZE >> 20} MiB, got {self.buffer_size} bytes")
        if self.queue_depth < 1:
            raise UsageError(f"the queue depth must be at least 1, got {self.queue_depth}")
        if self.chunk_size < 1:
            raise UsageError(f"the chunk size must be at least 1 byte, got {self.chunk_size}")
        if self.connections < 1:
            raise UsageError(f"the number of connections must be at least 1, got "
                             f"{self.connections}")
        if self.journal_path and not self.is_chunked:
            raise UsageError("a journal belongs to a chunked upload")

    def chunks_in_memory(self, chunk_size: int) -> int:
        """``connections + 1`` chunks (one sent per connection, one being read), within budget."""
        return max(2, min(self.connections + 1, self.memory_budget // max(1, chunk_size)))


@dataclass
class SentDrive:
    """What a drive target made: the drive, and what went over the wire."""

    uuid: str
    #: continued into a drive an earlier run created
    resumed: bool = False
    journal_path: str = ""
    #: body bytes this run sent and the server accepted
    sent_bytes: int = 0
    #: body bytes handed to libcurl, failed attempts included
    wire_bytes: int = 0
    chunks: int = 1
    #: chunks not sent: confirmed by an earlier run, or already on the server (416)
    skipped_chunks: int = 0


class DriveTarget(Protocol):
    """A target class that uploads into a new drive."""

    @classmethod
    def for_upload(
        cls, conn: Connection, options: UploadOptions, image: ImageInput
    ) -> Sink[SentDrive]: ...


__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "MAX_BUFFER_SIZE",
    "MIN_BUFFER_SIZE",
    "DriveTarget",
    "SentDrive",
    "UploadOptions",
]

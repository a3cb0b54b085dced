"""Jobs on images that need no endpoint: open, convert, checksum, inspect.

Each is a source (the image, through its formats), stages, and a target run
by :func:`drivepipe._runner.run_pipeline`, metered into the ``stats`` the
caller passes (the CLI draws its live view from it).  Nothing here prints; the
CLI is parse, one call, render.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from drivepipe._errors import UsageError
from drivepipe._extent import split_zeros
from drivepipe._files import check_free_space, check_target
from drivepipe._names import raw_name_for
from drivepipe._registry import STDIN, open_image, open_target, shown
from drivepipe._registry import stage as plugin_stage
from drivepipe._runner import run_pipeline
from drivepipe._stage import ImageInput, OpenOptions, TargetOptions
from drivepipe._stats import RunStats

if TYPE_CHECKING:  # types of fields only: a local job does not load the network side
    from drivepipe.cloudsigma.config import Credentials, Endpoint
    from drivepipe.transport.curl import TlsOptions

#: Measured on a warm 1 GiB file (benchmarks/bench_local.py): 2 MiB reads with 8 in
#: flight beat 4 MiB x 16; the smaller set of buffers stays in cache.
LOCAL_READ_SIZE = 2 << 20
LOCAL_QUEUE_DEPTH = 8


@dataclass
class ReadOptions:
    """How an image is read: every field has the CLI's default."""

    #: None or "auto": detect every layer; a name or a chain from the outside in ("xz,qcow2")
    format: str | None = None
    read_size: int = LOCAL_READ_SIZE
    #: decoder threads for formats that decode in parallel
    threads: int = 2
    #: read regular files through mmap windows (False: pread, for files another process
    #: may truncate while they are read: a mapped window cut short is a SIGBUS, which
    #: kills a library caller's process; the CLI turns it into one line)
    mmap: bool = True
    #: where a decoded layer that an inner format must read out of order is spooled
    spool_dir: str | None = None
    #: the disk of an image that holds several (an OVA): id, file name or 1-based number
    disk: str | None = None
    #: the exact size of a raw stream on standard input (no spool needed then)
    size: int | None = None
    #: how http(s) images are fetched, and the account sent only to its endpoint's
    #: origin (None: anonymous URLs only)
    tls: TlsOptions | None = None
    endpoint: Endpoint | None = None
    creds: Credentials | None = None
    #: where a source tells what a command would print (a remote source's retries)
    notify: Callable[[str], None] | None = None

    def check(self) -> None:
        if self.read_size <= 0:
            raise UsageError("the read size must be more than 0 bytes")
        if self.threads <= 0:
            raise UsageError("the number of decoder threads must be 1 or more")


def open_input(src: str, read: ReadOptions | None = None,
               stats: RunStats | None = None) -> ImageInput:
    """Open the image ``src`` (a path, ``-`` for standard input, or a URL), every layer
    decoded; the counting and spooling phases report into ``stats``."""
    read = read or ReadOptions()
    read.check()

    def on_phase(phase: str, done: int, total: int) -> None:
        if stats is not None:
            stats.set_phase(phase, done, total)

    def on_layer(name: str) -> None:
        if stats is not None:
            stats.chain.append(name)

    options = OpenOptions(
        read_size=read.read_size, on_phase=on_phase, threads=read.threads, mmap_reads=read.mmap,
        spool_dir=read.spool_dir, on_layer=on_layer, disk=read.disk, size=read.size,
        tls=read.tls, endpoint=read.endpoint, creds=read.creds, notify=read.notify,
    )
    image = open_image(src, read.format, options)
    if stats is not None:
        stats.chain[:] = image.chain
        stats.total = image.size
        stats.data_total = image.data_size
        stats.set_phase("transfer")
    return image


@dataclass
class ConvertResult:
    """Where the raw image went and what it holds."""

    output: str
    size: int
    #: the target's own result (the path for files; what a plugin target returns)
    result: object = None


def output_for(src: str, dst: str) -> str:
    """``DST``, or ``DST/NAME.raw`` when ``dst`` is a directory (or ends with ``/``)."""
    if dst != STDIN and (dst.endswith(os.sep) or os.path.isdir(dst)):
        return os.path.join(dst, raw_name_for(shown(src)))
    return dst


def convert(
    src: str,
    dst: str,
    *,
    read: ReadOptions | None = None,
    force: bool = False,
    direct: bool = False,
    queue_depth: int = LOCAL_QUEUE_DEPTH,
    stats: RunStats | None = None,
) -> ConvertResult:
    """Write the raw disk of image ``src`` to the target ``dst``.

    ``dst`` is a path (a sparse file, published only when complete and durable), a
    directory (the file is named after ``src``), ``-`` (standard output, in order),
    or ``NAME:ARG`` for an installed target plugin named ``NAME``.  ``direct``: a file's
    data is written with ``O_DIRECT`` where its file system takes it (it pays for
    long runs of data, not for scattered ones: :mod:`drivepipe._direct`).
    """
    if queue_depth <= 0:
        raise UsageError("the queue depth must be 1 or more")
    dst = output_for(src, dst)
    stats = stats if stats is not None else RunStats(title=f"convert {shown(src)}")
    # The target first: if it refuses (an existing file), no image is opened for nothing.
    sink, kind = open_target(dst, TargetOptions(force=force, direct=direct))
    try:
        image = open_input(src, read, stats)
    except BaseException:
        sink.close()
        raise
    try:
        if kind == "file":
            # the data bytes the input knows of are what will be written: if they
            # cannot fit, say so now rather than at the end
            check_free_space(dst, image.data_size, f"the disk in {src}")
    except BaseException:
        image.close()
        sink.close()
        raise
    result = run_pipeline(image.source, image.stages, sink, size=image.size, stats=stats,
                          queue_depth=queue_depth)
    return ConvertResult(dst, image.size, result)


def checksum(
    src: str,
    *,
    read: ReadOptions | None = None,
    queue_depth: int = LOCAL_QUEUE_DEPTH,
    stats: RunStats | None = None,
) -> str:
    """The xxh3-128 (hex, as ``xxh128sum`` prints it) of image ``src``'s raw disk."""
    if queue_depth <= 0:
        raise UsageError("the queue depth must be 1 or more")
    stats = stats if stats is not None else RunStats(title=f"checksum {shown(src)}")
    image = open_input(src, read, stats)
    hasher: Any = plugin_stage("xxh3")()
    discard, _ = open_target("discard:", TargetOptions())
    # Reading/decoding in one thread, hashing in the other.
    run_pipeline(image.source, [*image.stages, hasher], discard, size=image.size,
                 stats=stats, split=len(image.stages), queue_depth=queue_depth)
    return str(hasher.hexdigest())


@dataclass
class ImageInfo:
    """What ``inspect`` shows: the layers, the raw size, data and hole bytes."""

    path: str
    format: str
    chain: list[str]
    size: int
    file_size: int
    #: raw bytes that are data; None when the format does not record it (see ``scan``)
    data_bytes: int | None
    details: dict[str, object] = field(default_factory=dict)

    @property
    def hole_bytes(self) -> int | None:
        return None if self.data_bytes is None else self.size - self.data_bytes

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path, "format": self.format, "chain": self.chain,
            "size": self.size, "file_size": self.file_size, "data_bytes": self.data_bytes,
            "hole_bytes": self.hole_bytes, **self.details,
        }


def scan_data(image: ImageInput) -> int:
    """Count the raw image's data bytes by decoding it (zero blocks count as holes)."""
    stream = image.source.extents()
    for part in image.stages:
        stream = part.process(stream)
    data = 0
    for ext in stream:
        for piece in split_zeros(ext):
            if piece.data is not None:
                data += piece.length
    return data


def inspect(src: str, *, read: ReadOptions | None = None, scan: bool = False) -> ImageInfo:
    """Describe image ``src``; ``scan`` decodes it to count data bytes when the format
    does not record them.  An image of several disks (an OVA) shows its first unless
    ``read.disk`` says otherwise; its details list them all."""
    read = read or ReadOptions(read_size=4 << 20)
    if read.disk is None:
        read = replace(read, disk="1")
    image = open_input(src, read)
    try:
        data = image.data_size
        if data is None and scan:
            data = scan_data(image)
    finally:
        image.close()
    return ImageInfo(src, image.format, list(image.chain), image.size, image.file_size, data,
                     dict(image.details))


def check_output(dst: str, force: bool) -> None:
    """Refuse an output file that exists (unless ``force``) before any work is done."""
    if dst != STDIN:
        check_target(dst, force=force)

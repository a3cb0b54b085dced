"""``bench`` as library code: where the test sends go, and the measurement run on them.

In: an image (a path, any format), a :class:`BenchOptions` and where to send: a
:class:`~drivepipe.cloudsigma.connection.Connection` (a real API: the test uploads create
drives there, deleted right after), a local drive store started on a temporary directory
in a process of its own (the default), or a discard sink (``discard``).  Out: the
:class:`~drivepipe._bench.BenchReport` of :func:`drivepipe._bench.run_bench`: each stage
alone (read, decode, hash, send), the whole pipeline, the bottleneck, and advice whose gain
was measured (a bigger upload buffer, a chunked upload).  The sends use the registry's
``drive`` and ``drive-chunked`` targets like an upload does.  Nothing here prints; notes
go to ``notify``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from drivepipe._bench import BenchReport, Budget, SendVariant, SinkFactory, Subject, run_bench
from drivepipe._errors import TransferError, UsageError
from drivepipe._extent import Extent
from drivepipe._registry import open_image, stage, target
from drivepipe._runner import run_pipeline
from drivepipe._stage import ImageInput, OpenOptions, Sink, Source
from drivepipe._stats import RunStats, StageStats
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.cloudsigma.config import Credentials, Endpoint
from drivepipe.cloudsigma.connection import Connection as NetConnection
from drivepipe.cloudsigma.upload import (
    DEFAULT_BUFFER_SIZE,
    MAX_BUFFER_SIZE,
    MIN_BUFFER_SIZE,
    SentDrive,
    UploadOptions,
)
from drivepipe.jobs.upload import drive_target
from drivepipe.transport.curl import TlsOptions

#: the upload buffer tried when the network limits (libcurl's largest; the default is 1M)
BIGGER_BUFFER = MAX_BUFFER_SIZE
#: the chunked upload tried when the network limits
CHUNKED_CONNECTIONS = 4
CHUNK_SIZE = 16 << 20
BENCH_USER = "bench@drivepipe.local"
STORE_START_TIMEOUT = 60.0
STORE_STOP_TIMEOUT = 10.0


@dataclass
class Target:
    """Where test uploads go, and the drives made there (deleted afterwards)."""

    endpoint: Endpoint
    creds: Credentials
    tls: TlsOptions
    label: str
    made: list[str] = field(default_factory=list)

    def connection(self) -> NetConnection:
        return NetConnection(self.endpoint, self.creds, self.tls,
                             ApiClient(self.endpoint, self.creds, self.tls))

    def sink(self, buffer_size: int) -> Sink[SentDrive]:
        self.cleanup()  # untimed: the factory runs before the pipeline starts
        direct: Any = target("drive")  # DirectUploadSink(endpoint, creds, tls, buffer_size=)
        return TrackedSink(direct(self.endpoint, self.creds, self.tls, buffer_size=buffer_size),
                           self.made)

    def cleanup(self) -> None:
        """Delete the drives the measurements created."""
        if not self.made:
            return
        with ApiClient(self.endpoint, self.creds, self.tls) as api:
            while self.made:
                uuid = self.made.pop()
                with contextlib.suppress(TransferError):
                    api.request("DELETE", api.url(f"drives/{uuid}/"), what="delete test drive")


class TrackedSink(Sink[SentDrive]):
    """An upload sink that remembers the drive it created, for the cleanup."""

    def __init__(self, inner: Sink[SentDrive], made: list[str]) -> None:
        self.inner = inner
        self.made = made
        self.name = inner.name

    def meter(self, stats: StageStats) -> bool:
        return self.inner.meter(stats)

    def consume(self, extents: Iterator[Extent], size: int) -> SentDrive:
        sent = self.inner.consume(extents, size)
        self.made.append(sent.uuid)
        return sent

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


def _serve_child(root: str, password: str, pipe: Connection) -> None:
    """Child process: run a store until the parent says stop (or goes away)."""
    # Imported here: only the child (bench without --endpoint) needs the server.
    from drivepipe.server import serve_in_thread  # noqa: PLC0415

    with serve_in_thread(root, username=BENCH_USER, password=password, min_size=0) as srv:
        pipe.send(srv.base_url)
        with contextlib.suppress(EOFError):
            pipe.recv()


def _first_message(pipe: Connection) -> str:
    try:
        if pipe.poll(STORE_START_TIMEOUT):
            return str(pipe.recv())
    except EOFError:
        pass
    raise TransferError("bench: the local drive store did not start")


@contextlib.contextmanager
def local_store() -> Iterator[Target]:
    """A drive store on a temporary directory, in its own process, while the bench runs.

    Its own process, as ``drivepipe serve`` would be: in this one, the server's
    Python threads would compete with the pipeline's for the interpreter lock
    and the network would look slower than it is.
    """
    root = tempfile.mkdtemp(prefix="drivepipe-bench-")
    password = secrets.token_urlsafe(16)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_serve_child, args=(root, password, theirs), daemon=True,
                        name="drivepipe-bench-store")
    child.start()
    theirs.close()  # the child's end: if the child dies, our end sees EOF at once
    try:
        base = _first_message(ours)
        yield Target(Endpoint(api=base, direct=base), Credentials(BENCH_USER, password),
                     TlsOptions(), "network: local store")
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        child.join(STORE_STOP_TIMEOUT)
        if child.is_alive():
            child.terminate()
            child.join()
        shutil.rmtree(root, ignore_errors=True)


def subject_for(
    path: str, fmt: str, options: OpenOptions, queue_depth: int
) -> Subject:
    return Subject(path=path, open=lambda opts: open_image(path, fmt, opts), options=options,
                   queue_depth=queue_depth)


def with_target(subject: Subject, target: Target, buffer_size: int) -> None:
    subject.make_sink = lambda _size: target.sink(buffer_size)
    subject.sink_label = target.label
    other = BIGGER_BUFFER if buffer_size < BIGGER_BUFFER else DEFAULT_BUFFER_SIZE
    subject.send_variants.append(SendVariant(
        f"upload --buffer-size {other >> 10}K", _buffered(target, other)))
    subject.send_variants.append(SendVariant(
        f"upload --chunked --connections {CHUNKED_CONNECTIONS} --chunk-size "
        f"{CHUNK_SIZE >> 20}M", send=_chunked(target, subject.path)))


def _buffered(target: Target, buffer_size: int) -> SinkFactory:
    return lambda _size: target.sink(buffer_size)


def _chunked(target: Target, path: str) -> Callable[[Source, int], float]:
    """A chunked upload of a replayed stream; returns the seconds it took."""

    def send(source: Source, size: int) -> float:
        target.cleanup()  # before the clock starts
        image = ImageInput(path=path, format="raw", size=size, source=source)
        conn = target.connection()
        with tempfile.TemporaryDirectory(prefix="drivepipe-bench-") as tmp:
            # a fresh journal: never a resume
            options = UploadOptions(chunked=True, chunk_size=CHUNK_SIZE,
                                    connections=CHUNKED_CONNECTIONS,
                                    journal_path=f"{tmp}/journal", name="drivepipe-bench")
            sink = drive_target(options).for_upload(conn, options, image)
            try:
                t0 = time.perf_counter()
                # hashed like an upload: the chunked sender hashed its chunks before too
                sent = run_pipeline(source, [stage("xxh3")()], sink, size=size,
                                    stats=RunStats(title="bench chunked"))
                seconds = time.perf_counter() - t0
            finally:
                conn.close()
        target.made.append(sent.uuid)
        return seconds

    return send


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how; every field has the CLI's default."""

    #: seconds per measurement, and raw bytes of the image at most
    seconds: float = 3.0
    limit: int = 1 << 30
    #: None or "auto": detect every layer; a name or a chain ("xz,qcow2")
    format: str | None = None
    read_size: int = 4 << 20
    queue_depth: int = 16
    #: the direct upload's buffer
    buffer_size: int = DEFAULT_BUFFER_SIZE
    #: send into a discard sink instead of a drive store (without a connection)
    discard: bool = False

    def check(self) -> None:
        if self.seconds <= 0:
            raise UsageError("the time budget of a measurement must be more than 0 seconds")
        if self.limit < 1 or self.read_size < 1 or self.queue_depth < 1:
            raise UsageError("the byte limit, the read size and the queue depth must be "
                             "at least 1")
        if not MIN_BUFFER_SIZE <= self.buffer_size <= MAX_BUFFER_SIZE:
            raise UsageError(f"the upload buffer must be between {MIN_BUFFER_SIZE >> 10} KiB "
                             f"and {MAX_BUFFER_SIZE >> 20} MiB")


def connection_target(conn: NetConnection) -> Target:
    """Test sends to a real endpoint (its drives deleted after)."""
    return Target(conn.endpoint, conn.creds, conn.tls, f"network: {conn.endpoint.direct}")


def open_target(
    stack: contextlib.ExitStack[bool | None], connection: NetConnection | None, discard: bool,
    notify: Callable[[str], None],
) -> Target | None:
    """Where the sends go: the endpoint, a local store, or (None) a discard sink."""
    if connection is not None:
        return connection_target(connection)
    if discard:
        return None
    try:
        return stack.enter_context(local_store())
    except (TransferError, OSError, ImportError) as exc:
        notify(f"no local drive store ({exc}); measuring sends into a discard sink")
        return None


def bench(
    image: str,
    *,
    connection: NetConnection | None = None,
    options: BenchOptions | None = None,
    notify: Callable[[str], None] | None = None,
) -> BenchReport:
    """Measure each stage of uploading ``image`` alone and the whole pipeline; see the
    module docstring.  The drives the measurements create are deleted before this returns."""
    opts = options or BenchOptions()
    opts.check()
    say = notify or (lambda _msg: None)
    budget = Budget(seconds=opts.seconds, limit=opts.limit)
    subject = subject_for(image, opts.format or "auto", OpenOptions(read_size=opts.read_size),
                          opts.queue_depth)
    with contextlib.ExitStack() as stack:
        where = open_target(stack, connection, opts.discard, say)
        if where is not None:
            with_target(subject, where, opts.buffer_size)
            stack.callback(where.cleanup)
        return run_bench(subject, budget, say)


__all__ = ["BenchOptions", "BenchReport", "Target", "bench", "local_store"]

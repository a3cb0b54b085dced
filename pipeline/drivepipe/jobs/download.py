"""Download a drive (by UUID) or any http(s) URL: receive -> verify -> write, run by the runner.

:func:`download` is what ``drivepipe download``, the batch and the public API
call.  It resolves the source (a UUID through the endpoint, with the drive's
meta; a URL as it is, with credentials only on the endpoint's origin), probes
it, picks what to verify against (an expected digest, else the drive's meta:
``drivepipe_xxh128`` over the first ``drivepipe_size`` bytes, zeros after), and
runs the registry's ``download`` source (ranges over N connections, put back in
order) -> ``verify`` stage (hashes the bytes as they flow, fails before the
target publishes) -> a target chosen by the output:

- a path (or a directory: the server's sanitized name inside it): the
  ``resumable-file`` target, ``NAME.part`` and its journal, published as ``NAME``;
  rerunning resumes after a crash or Ctrl-C, the kept prefix re-checked and
  hashed in one read (nothing is read back to verify);
- a block device: the ``device`` target (every byte written, holes zeroed);
- ``-``: standard output, in order.

A source that changes under the download (size, ETag) starts over, a bounded
number of times.  :func:`open_remote` is the first half alone (the in-order
source, its size, the expectation and the verify stage), for jobs that send the
bytes elsewhere (drive to drive).  Nothing here prints: notes go to
``notify``, progress into ``stats``; signal handlers only with
``handle_signals=True``.  No plugin module is imported: the parts come from
:mod:`drivepipe._registry` by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from drivepipe._errors import Cancelled, ConfigError, SourceChanged, UsageError, VerifyError
from drivepipe._extent import Extent
from drivepipe._files import free_bytes
from drivepipe._names import default_filename
from drivepipe._registry import source as plugin_source
from drivepipe._registry import stage as plugin_stage
from drivepipe._registry import target as plugin_target
from drivepipe._remote import Auth, ProbeResult
from drivepipe._runner import run_pipeline
from drivepipe._sizes import format_size
from drivepipe._stage import Sink, Source, Stage
from drivepipe._stats import RunStats
from drivepipe._verify import Expectation, FileDigest, expectation_from_meta, parse_expect
from drivepipe.cloudsigma.api import ApiClient
from drivepipe.resume.download_journal import source_key
from drivepipe.transport.curl import UUID_RE, TlsOptions

#: ``{api}drives/UUID/download/`` (or the direct host's): a drive's own download URL
DRIVE_URL_RE = re.compile(
    r"/drives/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"/download/?$"
)
#: restarts after the source changed under a running download
MAX_RESTARTS = 2
MAX_CONNECTIONS = 64
#: extents between the receiving thread and the writer (pieces of at most 1 MiB)
QUEUE_DEPTH = 8

Notify = Callable[[str], None]


@dataclass(frozen=True)
class DownloadOptions:
    """How a download runs; every field has the CLI's default."""

    connections: int = 4
    #: bytes asked for per ranged request; None: the bytes to fetch split over the
    #: connections, 4-64 MiB (the source's ``range_step``); memory is about
    #: (connections + 2) of them, at most 112 MiB
    range_size: int | None = None
    #: resume granularity: each block of the output file is journaled with its digest
    block_size: int = 4 << 20
    #: attempts without progress before a range gives up, and the first wait (seconds)
    retries: int = 8
    retry_delay: float = 0.5
    #: seconds between journal saves
    checkpoint_interval: float = 1.0
    #: the expected xxh3-128 (``xxh128:HEX`` or 32 hex digits); None: the drive's meta
    expect: str | None = None
    #: replace an existing output file
    force: bool = False
    #: write the output file's data with O_DIRECT where its file system takes it
    direct: bool = True

    def check(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise UsageError(f"the connections must be between 1 and {MAX_CONNECTIONS}")
        if self.retries < 0:
            raise UsageError("the retries must be 0 or more")
        if self.range_size is not None and self.range_size < 1:
            raise UsageError("the range size must be at least 1 byte")
        if self.block_size < 4096 or self.block_size % 4096:
            raise UsageError(f"the block size must be a multiple of 4K, got {self.block_size}")
        if self.expect is not None:
            parse_expect(self.expect)


@dataclass(frozen=True)
class Remote:
    """Where the bytes come from, as whom, and what the source says they should be."""

    url: str
    auth: Auth
    uuid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Receiver(Protocol):
    """What this job uses of the ``download`` source (see its plugin module)."""

    size: int
    start: int
    counters: dict[str, Any]

    def probe(self) -> ProbeResult: ...
    def extents(self) -> Iterator[Extent]: ...
    def close(self) -> None: ...


@dataclass
class RemoteInput:
    """A remote source opened for reading: in order, its size, what it must hash to."""

    remote: Remote
    probed: ProbeResult
    #: the in-order source (probed; ``start`` may be set before its extents are pulled)
    receiver: Receiver
    size: int
    expected: Expectation | None
    #: to run right after the source: the verify stage (raises VerifyError at the end)
    stages: list[Stage]

    @property
    def digest(self) -> FileDigest | None:
        """The stream's digests once it has flowed through the verify stage."""
        found: FileDigest | None = getattr(self.stages[0], "digest", None)
        return found


@dataclass(frozen=True)
class DownloadResult:
    #: the published file, the device, or ``-``
    output: str
    #: ``file``, ``device`` or ``stdout``
    kind: str
    size: int
    xxh128: str
    #: what the bytes were verified against (None: nothing to verify against)
    expected: Expectation | None
    #: bytes of an earlier run kept (checked) and bytes fetched now
    kept: int
    received: int
    uuid: str | None = None


# --- where from ------------------------------------------------------------------------

def resolve(source: str, auth: Auth, tls: TlsOptions) -> Remote:
    """A UUID through the endpoint (with its meta), or a URL with credentials if owned."""
    if UUID_RE.match(source):
        if auth.endpoint is None or auth.creds is None:
            raise ConfigError(f"drive {source}: a drive UUID needs an endpoint and an account")
        uuid = source.lower()
        with ApiClient(auth.endpoint, auth.creds, tls) as api:
            endpoint = api.resolve_direct()
            meta = _meta(api.drive(uuid))
            url = api.url(f"drives/{uuid}/download/", direct=True)
        return Remote(url, Auth(endpoint, auth.creds), uuid, meta)
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not a drive UUID or an http(s) URL: {source!r}")
    if parts.username or parts.password:
        # they would end up in logs and error lines; the account is given separately
        raise UsageError("the URL must not contain a user or password; give the user on its "
                         "own, and the password in the environment, the config file or "
                         "~/.netrc")
    if auth.endpoint is None or not auth.endpoint.owns(source):
        return Remote(source, Auth())
    own = DRIVE_URL_RE.search(parts.path)
    if own is None or auth.creds is None:
        return Remote(source, auth)
    # The drive's own download URL: verified against its meta like a download by UUID.
    uuid = own.group(1).lower()
    with ApiClient(auth.endpoint, auth.creds, tls) as api:
        meta = _meta(api.drive(uuid))
    return Remote(source, auth, uuid, meta)


def owns(source: str, auth: Auth) -> bool:
    """True if ``source`` needs the account: a UUID, or a URL on the endpoint's origin."""
    return bool(UUID_RE.match(source)) or (
        auth.endpoint is not None and auth.endpoint.owns(source))


def _meta(drive: dict[str, Any]) -> dict[str, Any]:
    found = drive.get("meta")
    return dict(found) if isinstance(found, dict) else {}


def choose_expectation(expect: str | None, remote: Remote, size: int) -> Expectation | None:
    """The given digest, else the drive's meta (if our upload stored one), else None."""
    if expect:
        return parse_expect(expect)
    if remote.uuid is None or "drivepipe_xxh128" not in remote.meta:
        return None
    found = expectation_from_meta(remote.meta, size)
    if found is None:
        raise VerifyError(f"drive {remote.uuid}: its meta holds a checksum that does not fit "
                          f"the drive (drivepipe_size {remote.meta.get('drivepipe_size')!r}, "
                          f"size {size}); give an expected digest to verify against your own")
    return found


def open_remote(
    source: str,
    *,
    auth: Auth | None = None,
    tls: TlsOptions | None = None,
    options: DownloadOptions | None = None,
    remote: Remote | None = None,
) -> RemoteInput:
    """Resolve and probe ``source``; the in-order source, its size and its verify stage.

    Nothing is opened on disk and no byte is fetched beyond the probe's one.
    """
    options = options or DownloadOptions()
    options.check()
    tls = tls or TlsOptions()
    remote = remote or resolve(source, auth or Auth(), tls)
    receive_options = _receive_options(options)
    receiver: Receiver = _factory(plugin_source("download"))(
        remote.url, tls=tls, auth=remote.auth, options=receive_options)
    probed = receiver.probe()
    expected = choose_expectation(options.expect, remote, probed.size)
    verify: Stage = _factory(plugin_stage("verify"))(probed.size, expected)
    return RemoteInput(remote, probed, receiver, probed.size, expected, [verify])


def _factory(found: object) -> Any:
    """A plugin class found by name, to be called with its own arguments (which the
    registry's generic types do not know)."""
    return found


def _receive_options(options: DownloadOptions) -> Any:
    """The source plugin's options, built from its own class (found by name)."""
    cls = _factory(plugin_source("download"))
    return cls.options_type(connections=options.connections, range_size=options.range_size,
                            retries=options.retries, backoff_base=options.retry_delay)


# --- where to --------------------------------------------------------------------------

def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def output_path(output: str | None, probed: ProbeResult, uuid: str | None) -> str:
    """``output``; a directory (or nothing: the current one) gets the server's name."""
    if output and not os.path.isdir(output):
        return output
    name = default_filename(probed, uuid)
    return os.path.join(output, name) if output else name


@dataclass
class _Output:
    sink: Sink[Any]
    kind: str
    path: str
    #: the file target's checked kept prefix, and where it ends
    kept: Iterator[Extent] = field(default_factory=lambda: iter(()))
    kept_end: Callable[[], int] = lambda: 0


def _open_output(
    output: str | None, opened: RemoteInput, options: DownloadOptions, notify: Notify
) -> _Output:
    if output == "-":
        return _Output(_factory(plugin_target("stdout"))(1), "stdout", "-")
    if output and _is_block_device(output):
        return _Output(_factory(plugin_target("device"))(output), "device", output)
    path = output_path(output, opened.probed, opened.remote.uuid)
    writer: Any = _factory(plugin_target("resumable-file"))(
        path, force=options.force, block_size=options.block_size,
        checkpoint_interval=options.checkpoint_interval, notify=notify,
        direct=options.direct)
    identity = opened.probed.identity(source_key(opened.remote.url))
    offered = writer.open(identity, resumable=bool(identity.etag or identity.last_modified))
    _warn_free_space(writer.part, opened.size - offered, opened.expected, notify)
    return _Output(writer, "file", path, writer.kept(), lambda: int(writer.kept_end))


def _warn_free_space(part: str, left: int, expected: Expectation | None, notify: Notify) -> None:
    """Say so when the bytes still to write may not fit (holes are not written, so a
    sparse drive may fit all the same: a warning, not a refusal)."""
    if expected is not None and expected.length is not None:
        left = min(left, expected.length)  # past the uploaded image the drive is zeros
    free = free_bytes(part)
    if free is not None and free < left:
        notify(f"{os.path.dirname(os.path.abspath(part))}: {format_size(free)} free, "
               f"up to {format_size(left)} still to write (holes take no room, so it may fit)")


# --- the run ---------------------------------------------------------------------------

class _Stream(Source):
    """The kept prefix (checked as it is read) and then the receiver from where it ends."""

    name = "receive"

    def __init__(self, receiver: Receiver, out: _Output, stats: RunStats) -> None:
        self.receiver = receiver
        self.out = out
        self.stats = stats
        self.size = receiver.size

    def extents(self) -> Iterator[Extent]:
        own = [s for s in self.stats.stages if s.kind == "source"]
        if own:  # the runner's counters of this source: the receiver adds its own there
            self.receiver.counters = own[-1].extra
        yield from self.out.kept
        self.receiver.start = self.out.kept_end()
        yield from self.receiver.extents()

    def close(self) -> None:
        self.receiver.close()


@contextlib.contextmanager
def _stop_signals(active: bool) -> Iterator[None]:
    """SIGINT and SIGTERM as KeyboardInterrupt while active (the runner then stops every
    part, the file target saves its journal, and Cancelled is raised)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    saved = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def download(
    source: str,
    output: str | None = None,
    *,
    auth: Auth | None = None,
    tls: TlsOptions | None = None,
    options: DownloadOptions | None = None,
    stats: RunStats | None = None,
    notify: Notify | None = None,
    handle_signals: bool = False,
) -> DownloadResult:
    """Download ``source`` (a drive UUID or an http(s) URL) to ``output``.

    ``output``: a file path, a directory (the server's name inside it; None: the
    current directory), a block device, or ``-`` (standard output).  Raises
    :class:`~drivepipe.VerifyError` on a checksum mismatch (a file's ``.part`` is
    kept), :class:`~drivepipe.Cancelled` on Ctrl-C (its journal is kept: the same
    call resumes), other :class:`~drivepipe.DrivepipeError` subclasses for the rest.
    """
    options = options or DownloadOptions()
    options.check()
    tls = tls or TlsOptions()
    tell: Notify = notify or (lambda text: None)
    stats = stats or RunStats(title="download")
    with _stop_signals(handle_signals):
        try:
            return _download(source, output, auth or Auth(), tls, options, stats, tell)
        except KeyboardInterrupt as exc:  # outside the runner (resolving, probing)
            raise Cancelled() from exc


def _download(
    source: str, output: str | None, auth: Auth, tls: TlsOptions, options: DownloadOptions,
    stats: RunStats, tell: Notify,
) -> DownloadResult:
    remote = resolve(source, auth, tls)
    for restart in range(MAX_RESTARTS + 1):
        opened = open_remote(source, tls=tls, options=options, remote=remote)
        out = _open_output(output, opened, options, tell)
        if output is None or os.path.isdir(output):
            output = out.path  # a restart keeps the name
        try:
            return _run(opened, out, stats)
        except SourceChanged as exc:
            if restart == MAX_RESTARTS or out.kind == "stdout":
                raise
            tell(f"{exc.one_line()}; starting over")
            discard = getattr(out.sink, "discard", None)
            if discard is not None:
                discard()
    raise AssertionError("unreachable")


def _run(opened: RemoteInput, out: _Output, stats: RunStats) -> DownloadResult:
    stats.title = f"download {out.path}"
    stats.total = opened.size
    stats.stages.clear()  # a restart counts afresh
    stream = _Stream(opened.receiver, out, stats)
    try:
        run_pipeline(stream, opened.stages, out.sink, size=opened.size, stats=stats,
                     queue_depth=QUEUE_DEPTH)
    except VerifyError as exc:
        label = getattr(out.sink, "label", out.path)
        raise VerifyError(f"{label}: {exc}; every byte was hashed as the server sent it "
                          f"(kept ones checked against the journal), so the source itself "
                          f"differs; {_what_is_left(out)}") from exc
    got = opened.digest
    assert got is not None
    stats.result["xxh128"] = got.whole
    counters = opened.receiver.counters
    return DownloadResult(out.path, out.kind, opened.size, got.whole, opened.expected,
                          out.kept_end(), int(counters.get("received", 0)), opened.remote.uuid)


def _what_is_left(out: _Output) -> str:
    if out.kind == "file":
        return "the .part file is kept (delete it to download again from scratch)"
    if out.kind == "device":
        return f"{out.path} holds the bytes as they arrived"
    return "standard output got the bytes as they arrived"

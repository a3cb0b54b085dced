"""``drivepipe download UUID|URL``: a drive (or any http(s) file) in, a verified file out.

A UUID is resolved through the configured endpoint (same options and
credentials as ``upload``) to ``{direct}drives/{uuid}/download/``; a URL is
fetched as it is, with credentials only if it lies on the configured
endpoint's origin (an anonymous URL needs no configuration at all).  Redirects
are followed, credentials never go to another host.

The bytes land in ``NAME.part`` (sparse) with a resume journal
``NAME.part.journal``; rerunning the same command continues a download that was
killed or interrupted, after re-checking the blocks it keeps.  A source that
changed (size or ETag) starts over.  Then the file is verified against
``--expect xxh128:HEX`` or the drive's meta (``drivepipe_xxh128`` over the
first ``drivepipe_size`` bytes, zeros after), else its digest is printed on
stderr; then fsynced and renamed to NAME (never over an existing file without
``--force``) and the journal is deleted.  Stdout carries the output path and
nothing else.  A mismatch keeps ``NAME.part``, names the bad ranges and exits 7.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from drivepipe._errors import ConfigError, DiskFull, DrivepipeError, UsageError, VerifyError
from drivepipe._files import (
    SparseOutput,
    check_target,
    free_bytes,
    publish,
    punch_hole,
)
from drivepipe._names import default_filename
from drivepipe._progress import Reporter
from drivepipe._sizes import format_size, parse_size
from drivepipe._stats import RunStats
from drivepipe._verify import (
    Expectation,
    FileDigest,
    FileDigester,
    PrefixHasher,
    Progress,
    blocks_with_data,
    check_kept_blocks,
    describe_blocks,
    digest_file,
    expectation_from_meta,
    parse_expect,
)
from drivepipe.cli._app import app
from drivepipe.cli._common import (
    ForceOpt,
    ProgressOpt,
    QuietOpt,
    VerboseOpt,
    positive_size,
    progress_mode,
)
from drivepipe.cli._net import (
    CacertOpt,
    DirectOpt,
    EndpointOpt,
    InsecureHttpOpt,
    LimitRateOpt,
    LocationOpt,
    StallOpt,
    UserOpt,
    connect,
    transport,
)
from drivepipe.cloudsigma.config import Endpoint, resolve_credentials, resolve_endpoint
from drivepipe.resume.download_journal import (
    JOURNAL_SUFFIX,
    DownloadJournal,
    SourceIdentity,
    load_journal,
    remove_journal,
    source_key,
)
from drivepipe.transport.http import UUID_RE, ApiClient, TlsOptions
from drivepipe_plugins.sources.receiver import (
    Auth,
    ProbeResult,
    ReceiveOptions,
    Receiver,
    SourceChanged,
    probe,
)

#: ``{api}drives/UUID/download/`` (or the direct host's): a drive's own download URL
DRIVE_URL_RE = re.compile(
    r"/drives/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
    r"/download/?$"
)
PART_SUFFIX = ".part"
#: restarts after the source changed under a running download
MAX_RESTARTS = 2
MAX_CONNECTIONS = 64

OutputOpt = Annotated[
    str | None, typer.Option(
        "--output", "-o", metavar="PATH", help="Output file, or a directory to put it "
                             "in (default: the name the server gives, sanitized, in the "
                             "current directory).",
                             show_default=False)
]
ConnectionsOpt = Annotated[
    int, typer.Option("--connections", help="Parallel connections (ranged requests).")
]
RangeSizeOpt = Annotated[
    str, typer.Option(
        "--range-size", metavar="SIZE", help="Bytes asked for per ranged request (e.g. 32M).")
]
BlockSizeOpt = Annotated[
    str, typer.Option(
        "--block-size", metavar="SIZE", help="Resume granularity: each block of this size is "
                      "journaled with its own digest.")
]
ExpectOpt = Annotated[
    str | None, typer.Option("--expect", metavar="DIGEST", help="Expected xxh3-128 digest: "
                             "the 32 hex digits xxh128sum prints, or xxh128:HEX; default: the "
                             "drive's meta, if our upload stored one.", show_default=False)
]
RetriesOpt = Annotated[
    int, typer.Option("--retries", help="Attempts without progress before a range gives up.")
]
CheckpointOpt = Annotated[
    float, typer.Option("--checkpoint-interval", help="Seconds between journal saves.",
                        hidden=True)
]
BackoffOpt = Annotated[
    float, typer.Option("--retry-delay", help="First retry delay in seconds (doubles, with "
                        "jitter).", hidden=True)
]

HashEarlyOpt = Annotated[
    bool, typer.Option("--hash-early/--hash-after", help="Hash the file while it downloads "
                       "(default), or in a second pass afterwards.", hidden=True)
]


@dataclass
class Target:
    """Where the bytes come from, as whom, and what the source says they should be."""

    url: str
    auth: Auth
    tls: TlsOptions
    uuid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Paths:
    final: str
    part: str
    journal: str

    @classmethod
    def for_target(cls, final: str) -> Paths:
        part = final + PART_SUFFIX
        return cls(final, part, part + JOURNAL_SUFFIX)


# --- where from ------------------------------------------------------------------------

def resolve_target(
    source: str, endpoint: str | None, direct_endpoint: str | None, location: str | None,
    user: str | None, tls: TlsOptions,
) -> Target:
    """A UUID through the endpoint (with its meta), or a URL with credentials if owned."""
    if UUID_RE.match(source):
        conn = connect(endpoint, direct_endpoint, location, user, tls.cacert, tls.insecure_http)
        try:
            uuid = source.lower()
            drive = conn.api.drive(uuid)
            url = conn.api.url(f"drives/{uuid}/download/", direct=True)
        finally:
            conn.close()
        meta = drive.get("meta") if isinstance(drive.get("meta"), dict) else {}
        return Target(url, Auth(conn.endpoint, conn.creds), tls, uuid, dict(meta or {}))
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not a drive UUID or an http(s) URL: {source!r}")
    if parts.username or parts.password:
        # they would end up in logs and error lines; the config/env hold credentials
        raise UsageError("the URL must not contain a user or password; use --user and "
                         "CLOUDSIGMA_PASSWORD, the config file or ~/.netrc")
    ep = _optional_endpoint(endpoint, direct_endpoint, location)
    if ep is None or not ep.owns(source):
        return Target(source, Auth(), tls)
    creds = resolve_credentials(ep, user)
    own = DRIVE_URL_RE.search(parts.path)
    if own is None:
        return Target(source, Auth(ep, creds), tls)
    # The drive's own download URL: verified against its meta like a download by UUID.
    uuid = own.group(1).lower()
    api = ApiClient(ep, creds, tls)
    try:
        drive = api.drive(uuid)
    finally:
        api.close()
    meta = drive.get("meta") if isinstance(drive.get("meta"), dict) else {}
    return Target(source, Auth(ep, creds), tls, uuid, dict(meta or {}))


def _optional_endpoint(
    endpoint: str | None, direct_endpoint: str | None, location: str | None
) -> Endpoint | None:
    """The configured endpoint, or None when nothing is configured (anonymous URLs)."""
    try:
        return resolve_endpoint(endpoint, direct_endpoint, location)
    except ConfigError:
        if endpoint or direct_endpoint or location:
            raise
        return None


def choose_expectation(expect: str | None, target: Target, size: int) -> Expectation | None:
    if expect:
        return parse_expect(expect)
    if target.uuid is None or "drivepipe_xxh128" not in target.meta:
        return None
    found = expectation_from_meta(target.meta, size)
    if found is None:
        raise VerifyError(f"drive {target.uuid}: its meta holds a checksum that does not fit "
                          f"the drive (drivepipe_size {target.meta.get('drivepipe_size')!r}, "
                          f"size {size}); pass --expect to verify against your own digest")
    return found


def probe_target(target: Target, options: ReceiveOptions) -> ProbeResult:
    return probe(target.url, tls=target.tls, auth=target.auth, retries=options.retries,
                 backoff_base=options.backoff_base, backoff_cap=options.backoff_cap)


# --- the .part file and its journal ----------------------------------------------------

def note(text: str) -> None:
    typer.echo(f"drivepipe: {text}", err=True)


#: where the notes of a download go: :func:`note` (stderr) for the command
Notify = Callable[[str], None]


def discard_part(paths: Paths) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.part)
    remove_journal(paths.journal)


def open_part(
    paths: Paths, probed: ProbeResult, source: str, block_size: int, stats: RunStats,
    digester: FileDigester | None = None, notify: Notify = note,
) -> tuple[SparseOutput, DownloadJournal, set[int]]:
    """Continue a matching journal (its blocks re-checked) or start a fresh .part.

    Also returns the blocks still to fetch that hold old bytes on disk.  ``notify``
    gets the notes (the command prints them; the batch library passes its own).
    """
    identity = probed.identity(source_key(source))
    journal = load_journal(paths.journal)
    stale: set[int] = set()
    if journal is not None and journal.matches(identity, block_size) \
            and os.path.isfile(paths.part) and _has_validator(identity, paths, notify):
        _recheck(paths, journal, stats, digester, notify)
        missing = set(range(journal.block_count)) - set(journal.blocks)
        stale = blocks_with_data(paths.part, journal, missing)
    else:
        if journal is not None or os.path.lexists(paths.part):
            notify(f"{paths.part}: not from this source (or changed since), starting over")
        discard_part(paths)
        journal = DownloadJournal(identity, block_size)
    out = SparseOutput(paths.part, identity.size)
    journal.save(paths.journal)
    return out, journal, stale


def _has_validator(identity: SourceIdentity, paths: Paths, notify: Notify = note) -> bool:
    """Without an ETag or Last-Modified a changed source cannot be told: no resuming."""
    if identity.etag or identity.last_modified:
        return True
    notify(f"{paths.part}: the server gives no ETag or Last-Modified, so the kept part "
         "cannot be trusted to be the same file")
    return False


def _recheck(paths: Paths, journal: DownloadJournal, stats: RunStats,
             digester: FileDigester | None, notify: Notify = note) -> None:
    stats.set_phase("check")
    bad = check_kept_blocks(paths.part, journal, _phase_progress(stats), digester)
    for index in bad:
        del journal.blocks[index]
    stats.set_phase("transfer")
    kept = journal.done_bytes()
    extra = f", {len(bad)} damaged blocks will be fetched again" if bad else ""
    notify(f"resuming {paths.part}: {format_size(kept)} of "
         f"{format_size(journal.identity.size)} kept{extra}")
    stats.stages[-1].bytes += kept
    stats.stages[-1].extra["kept"] = kept


def _phase_progress(stats: RunStats) -> Progress:
    def update(done: int, total: int) -> None:
        stats.phase_done, stats.phase_total = done, total

    return update


# --- fetch, verify, publish ------------------------------------------------------------

def fetch(
    target: Target, probed: ProbeResult, paths: Paths, block_size: int, options: ReceiveOptions,
    stats: RunStats, expected: Expectation | None, hash_early: bool, notify: Notify = note,
) -> tuple[DownloadJournal, FileDigest | None]:
    """Fill ``paths.part``; start over (a bounded number of times) if the source changes.

    With ``hash_early`` the whole-file digest is computed while the blocks arrive
    (:class:`PrefixHasher`); it is returned when that worked, else None.
    """
    for restart in range(MAX_RESTARTS + 1):
        digester = FileDigester(probed.size, expected.length if expected else None) \
            if hash_early else None
        out, journal, stale = open_part(paths, probed, target.url, block_size, stats, digester,
                                        notify)
        hasher = PrefixHasher(paths.part, journal, digester, _phase_progress(stats)) \
            if digester is not None else None
        warn_free_space(paths, journal, expected, notify)
        try:
            if hasher is not None:
                hasher.start()
            Receiver(out, journal, paths.journal, probed, tls=target.tls, auth=target.auth,
                     options=options, receive=stats.stages[0], write=stats.stages[1],
                     relink=lambda: probe_target(target, options), stale=stale,
                     on_stored=hasher.wake if hasher is not None else None).run()
            out.sync()
            stats.set_phase("verify")
            return journal, hasher.finish() if hasher is not None else None
        except DiskFull as exc:
            raise disk_full(paths, journal, out) from exc
        except SourceChanged as exc:
            if restart == MAX_RESTARTS:
                raise
            notify(f"{exc.one_line()}; starting over")
            discard_part(paths)
            probed = probe_target(target, options)
            stats.total = probed.size
        finally:
            if hasher is not None:
                hasher.stop()
            out.close()
    raise AssertionError("unreachable")


def warn_free_space(paths: Paths, journal: DownloadJournal,
                    expected: Expectation | None, notify: Notify = note) -> None:
    """Say so when the bytes still to write may not fit (holes are not written, so a
    sparse drive may fit all the same: a warning, not a refusal)."""
    size = journal.identity.size
    if expected is not None and expected.length is not None:
        size = min(size, expected.length)  # past the uploaded image the drive is zeros
    left = max(size - journal.done_bytes(), 0)
    free = free_bytes(paths.part)
    if free is not None and free < left:
        notify(f"{os.path.dirname(os.path.abspath(paths.part))}: {format_size(free)} free, "
               f"up to {format_size(left)} still to write (holes take no room, so it may fit)")


def disk_full(paths: Paths, journal: DownloadJournal, out: SparseOutput) -> DiskFull:
    """The disk filled up: free the unfinished blocks' bytes so the journal can be saved,
    save it, and say what is kept for the rerun."""
    missing = [i for i in range(journal.block_count) if i not in journal.blocks]
    for index in missing:
        start, length = journal.block_span(index)
        punch_hole(out.fd, start, length)
    saved = ""
    try:
        journal.save(paths.journal)
    except DrivepipeError as exc:
        saved = f" (the journal could not be saved: {exc.one_line()})"
    kept = journal.done_bytes()
    return DiskFull(
        f"{paths.part}: no space left on device; {format_size(kept)} of "
        f"{format_size(journal.identity.size)} are kept{saved}: free space and run the "
        "same command again to go on from there"
    )


def verify(
    paths: Paths, journal: DownloadJournal, expected: Expectation | None, stats: RunStats,
    early: FileDigest | None = None,
) -> FileDigest:
    """Check the .part's digest (hashed now unless ``early``); on a mismatch keep it and
    say which blocks are bad."""
    stats.set_phase("verify")
    got = early or digest_file(paths.part, expected.length if expected else None,
                               _phase_progress(stats))
    stats.result["xxh128"] = got.whole
    if expected is None:
        return got
    if got.prefix != expected.digest:
        raise VerifyError(f"{paths.part}: xxh128 {got.prefix} of the first "
                          f"{got.prefix_length} bytes does not match {expected.digest} from "
                          f"{expected.origin}; {_bad_blocks(paths, journal)}; the .part file is "
                          "kept (delete it to download again from scratch)")
    if got.nonzero_tail_at is not None:
        raise VerifyError(f"{paths.part}: byte {got.nonzero_tail_at} is not zero, but the drive "
                          f"holds only {expected.length} bytes of data ({expected.origin}); "
                          "the .part file is kept")
    return got


def _bad_blocks(paths: Paths, journal: DownloadJournal) -> str:
    bad = check_kept_blocks(paths.part, journal)
    if not bad:
        return "every block on disk matches what the server sent, so the source itself differs"
    return f"blocks changed on disk since they arrived: {describe_blocks(journal, bad)}"


def finish(paths: Paths, force: bool) -> None:
    """Publish the verified .part under the final name and forget the journal."""
    publish(paths.part, paths.final, force=force)
    remove_journal(paths.journal)


def output_path(output: str | None, probed: ProbeResult, uuid: str | None) -> str:
    """``-o PATH``; a directory gets the server's (sanitized) name inside it."""
    if output and not os.path.isdir(output):
        return output
    name = default_filename(probed, uuid)
    return os.path.join(output, name) if output else name


def receive_options(
    connections: int, range_size: str, block: int, retries: int, checkpoint: float,
    retry_delay: float,
) -> ReceiveOptions:
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    ranged = max(block, positive_size(range_size, "--range-size") // block * block)
    return ReceiveOptions(connections=connections, range_size=ranged, retries=retries,
                          checkpoint_interval=checkpoint, backoff_base=retry_delay)


def block_size_option(text: str) -> int:
    size = parse_size(text)
    if size < 4096 or size % 4096:
        raise UsageError(f"--block-size must be a multiple of 4K, got {text!r}")
    return size


@app.command()
def download(
    source: Annotated[str, typer.Argument(help="Drive UUID, or an http(s) URL.")],
    output: OutputOpt = None,
    force: ForceOpt = False,
    expect: ExpectOpt = None,
    connections: ConnectionsOpt = 4,
    range_size: RangeSizeOpt = "32M",
    block_size: BlockSizeOpt = "4M",
    retries: RetriesOpt = 8,
    progress: ProgressOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    checkpoint_interval: CheckpointOpt = 1.0,
    retry_delay: BackoffOpt = 0.5,
    hash_early: HashEarlyOpt = True,
    endpoint: EndpointOpt = None,
    direct_endpoint: DirectOpt = None,
    location: LocationOpt = None,
    user: UserOpt = None,
    cacert: CacertOpt = None,
    insecure_http: InsecureHttpOpt = False,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
) -> None:
    """Download a drive or URL into a verified sparse file; prints the file's path.

    The bytes go to NAME.part with a resume journal NAME.part.journal: run the same
    command again after a crash or Ctrl-C to continue.  The file is checked against
    --expect or the drive's meta (else its xxh128 is shown on stderr), then renamed
    to NAME.  Stdout carries only NAME.  A checksum mismatch exits 7 and keeps
    NAME.part.
    """
    mode = progress_mode(progress, quiet, verbose)
    if output == "-":
        # "-" is standard output everywhere else; a download verifies and publishes a
        # file (resumable, never half-written under its name), which a pipe cannot be
        raise UsageError("-o - (standard output) is not supported for downloads yet: give a "
                         "file or directory, or pipe `drivepipe convert FILE -` after it")
    block = block_size_option(block_size)
    options = receive_options(connections, range_size, block, retries, checkpoint_interval,
                              retry_delay)
    if expect:
        parse_expect(expect)  # a bad digest is refused before anything is fetched
    tls = transport(cacert, insecure_http, limit_rate, stall_timeout, connections)
    target = resolve_target(source, endpoint, direct_endpoint, location, user, tls)
    probed = probe_target(target, options)
    paths = Paths.for_target(output_path(output, probed, target.uuid))
    check_target(paths.final, force=force)
    expected = choose_expectation(expect, target, probed.size)
    stats = RunStats(title=f"download {paths.final}", total=probed.size)
    stats.add("receive", "source")
    stats.add("write", "sink")
    with Reporter(stats, mode):
        journal, early = fetch(target, probed, paths, block, options, stats, expected,
                               hash_early)
        got = verify(paths, journal, expected, stats, early)
        finish(paths, force)
    if expected is None:
        note(f"no checksum to verify against; xxh128:{got.whole}  {paths.final}")
    elif expected.length is not None and expected.length < stats.total:
        note(f"{paths.final}: the first {expected.length} bytes verified against "
             f"{expected.origin}; the other {stats.total - expected.length} bytes (the drive "
             "was grown past the uploaded image) are zeros, as checked")
    typer.echo(paths.final)

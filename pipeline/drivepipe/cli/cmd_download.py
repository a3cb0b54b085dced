"""``drivepipe download UUID|URL``: a drive (or any http(s) file) in, a verified file out.

Parse, one call to :func:`drivepipe.jobs.download.download`, render.  A UUID is
resolved through the configured endpoint (same options and credentials as
``upload``); a URL is fetched as it is, with credentials only if it lies on the
configured endpoint's origin (an anonymous URL needs no configuration at all).
``-o PATH`` writes ``PATH.part`` with a resume journal and publishes ``PATH``
once verified (rerun the same command to resume); ``-o DIR`` uses the server's
name inside DIR; ``-o /dev/sdX`` writes a block device; ``-o -`` streams to
standard output.  Stdout carries the output path and nothing else (or the
bytes, with ``-o -``).  A mismatch names the digests and exits 7.
"""

from __future__ import annotations

from typing import Annotated

import typer

from drivepipe._errors import ConfigError, UsageError
from drivepipe._remote import Auth
from drivepipe._sizes import parse_size
from drivepipe._stats import RunStats
from drivepipe._verify import parse_expect
from drivepipe.cli._app import app
from drivepipe.cli._common import (
    FROM_OPTIONS,
    DirectOpt,
    ForceOpt,
    ProgressOptions,
    grouped_options,
    positive_size,
)
from drivepipe.cli._net import Account, LimitRateOpt, StallOpt
from drivepipe.cli._progress import Reporter
from drivepipe.cloudsigma.config import Endpoint, resolve_credentials, resolve_endpoint
from drivepipe.jobs.download import (
    MAX_CONNECTIONS,
    DownloadOptions,
    DownloadResult,
    owns,
)
from drivepipe.jobs.download import (
    download as run_download,
)
from drivepipe.transport.curl import UUID_RE

OutputOpt = Annotated[
    str | None, typer.Option(
        "--output", "-o", metavar="PATH", help="Output file, a directory to put it in "
                             "(default: the name the server gives, sanitized, in the "
                             "current directory), a block device, or - for standard output.",
                             show_default=False)
]
ConnectionsOpt = Annotated[
    int, typer.Option("--connections", help="Parallel connections (ranged requests).")
]
RangeSizeOpt = Annotated[
    str | None, typer.Option(
        "--range-size", metavar="SIZE", help="Bytes asked for per ranged request (e.g. 8M); "
                      "default: the bytes to fetch split over the connections, 4M-64M. "
                      "Memory is about connections + 2 of them, at most about 112M (many "
                      "connections get smaller ranges).", show_default=False)
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
    bool, typer.Option("--hash-early/--hash-after", help="No effect (kept for old scripts): "
                       "the download is always hashed as it flows.", hidden=True)
]


def download_options(
    connections: int, range_size: str | None, block_size: str, retries: int, checkpoint: float,
    retry_delay: float, expect: str | None, force: bool, direct: bool = True,
) -> DownloadOptions:
    """The library's options from the command line, each bad value in one line."""
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be between 1 and {MAX_CONNECTIONS}")
    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    block = parse_size(block_size)
    if block < 4096 or block % 4096:
        raise UsageError(f"--block-size must be a multiple of 4K, got {block_size!r}")
    if expect:
        try:
            parse_expect(expect)  # a bad digest is refused before anything is fetched
        except UsageError as exc:
            raise UsageError(f"--expect: {exc}") from None
    return DownloadOptions(
        connections=connections,
        range_size=None if range_size is None else positive_size(range_size, "--range-size"),
        block_size=block, retries=retries, retry_delay=retry_delay,
        checkpoint_interval=checkpoint, expect=expect or None, force=force, direct=direct)


def auth_for(source: str, account: Account) -> Auth:
    """The endpoint (none needed for an anonymous URL) and, where it is needed, the account."""
    if UUID_RE.match(source):
        ep = resolve_endpoint(account.endpoint, account.direct_endpoint, account.location)
        return Auth(ep, resolve_credentials(ep, account.user))
    found = _optional_endpoint(account.endpoint, account.direct_endpoint, account.location)
    if found is None:
        return Auth()
    if not owns(source, Auth(found)):
        return Auth(found)
    return Auth(found, resolve_credentials(found, account.user))


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


def note(text: str) -> None:
    typer.echo(f"drivepipe: {text}", err=True)


def render(result: DownloadResult) -> None:
    expected = result.expected
    if expected is None:
        note(f"no checksum to verify against; xxh128:{result.xxh128}  {result.output}")
    elif expected.length is not None and expected.length < result.size:
        note(f"{result.output}: the first {expected.length} bytes verified against "
             f"{expected.origin}; the other {result.size - expected.length} bytes (the drive "
             "was grown past the uploaded image) are zeros, as checked")
    if result.kind != "stdout":
        typer.echo(result.output)


@app.command()
@grouped_options
def download(
    source: Annotated[str, typer.Argument(help="Drive UUID, or an http(s) URL.")],
    output: OutputOpt = None,
    force: ForceOpt = False,
    direct: DirectOpt = True,
    expect: ExpectOpt = None,
    connections: ConnectionsOpt = 4,
    range_size: RangeSizeOpt = None,
    block_size: BlockSizeOpt = "4M",
    retries: RetriesOpt = 8,
    progress: ProgressOptions = FROM_OPTIONS,
    checkpoint_interval: CheckpointOpt = 1.0,
    retry_delay: BackoffOpt = 0.5,
    hash_early: HashEarlyOpt = True,
    account: Account = FROM_OPTIONS,
    limit_rate: LimitRateOpt = None,
    stall_timeout: StallOpt = 120.0,
) -> None:
    """Download a drive or URL into a verified sparse file; prints the file's path.

    The bytes go to NAME.part with a resume journal NAME.part.journal: run the same
    command again after a crash or Ctrl-C to continue.  The bytes are checked as
    they arrive against --expect or the drive's meta (else their xxh128 is shown on
    stderr), then the file is renamed to NAME.  Stdout carries only NAME.  -o
    /dev/sdX writes a block device; -o - streams to standard output.  A checksum
    mismatch exits 7 and keeps NAME.part.
    """
    mode = progress.mode
    options = download_options(connections, range_size, block_size, retries,
                               checkpoint_interval, retry_delay, expect, force, direct)
    tls = account.tls(limit_rate, stall_timeout, connections)
    auth = auth_for(source, account)
    stats = RunStats(title="download")
    with Reporter(stats, mode):
        result = run_download(source, output, auth=auth, tls=tls, options=options,
                              stats=stats, notify=note, handle_signals=True)
    render(result)

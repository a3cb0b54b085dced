"""Rendering ``checksum`` of many files: one line per result, errors carried past.

``hash_each`` prints xxh128sum lines; ``check_lists`` is ``xxh128sum -c``
(lists parsed by :mod:`drivepipe._sums`).  A file that fails gets one error line
on stderr and the others go on; errors about the whole command (usage,
configuration, Ctrl-C) still end it at once.  Both return the exit code of the
first failure, 0 if none.  No typer here: ``checksum`` of plain paths runs
without it (:mod:`drivepipe.cli._fast`), with these same functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from drivepipe._errors import Cancelled, ConfigError, DrivepipeError, UsageError
from drivepipe._registry import shown
from drivepipe._stats import RunStats
from drivepipe._sums import format_line, parse_lines
from drivepipe.cli._progress import Reporter

if TYPE_CHECKING:
    from drivepipe.jobs.images import ReadOptions


def _echo(text: str, err: bool = False) -> None:
    """One line on stdout (or stderr), flushed at once: as ``typer.echo`` writes it."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def checksum_one(path: str, read: ReadOptions, queue_depth: int, mode: str) -> str:
    """The xxh3-128 hex digest of ``path``'s raw content, with the progress ``mode``."""
    from drivepipe.jobs import images  # noqa: PLC0415 - the engine, when a file is hashed

    stats = RunStats(title=f"checksum {shown(path)}")
    with Reporter(stats, mode):
        return images.checksum(path, read=read, queue_depth=queue_depth, stats=stats)


def _failed(exc: DrivepipeError) -> int:
    """Report one file's failure on stderr; errors about the whole command go on up."""
    if isinstance(exc, (Cancelled, UsageError, ConfigError)):
        raise exc
    from drivepipe.cli._flags import with_flags  # noqa: PLC0415 - only when failing

    _echo(f"drivepipe: error: {with_flags(exc.one_line())}", err=True)
    return exc.exit_code


def hash_each(paths: Iterable[str], digest: Callable[[str], str]) -> int:
    code = 0
    for path in paths:
        try:
            _echo(format_line(digest(path), path))
        except DrivepipeError as exc:
            failure = _failed(exc)
            code = code or failure
    return code


def check_lists(lists: Iterable[str], digest: Callable[[str], str]) -> int:
    """``xxh128sum -c``: check every line of every list; the first failure's exit code."""
    code = mismatched = malformed = 0
    for listing in lists:
        try:
            lines = _read_list(listing)
        except OSError as exc:
            _echo(f"drivepipe: error: {listing}: cannot read: {exc.strerror or exc}",
                  err=True)
            code = code or 3
            continue
        entries = list(parse_lines(lines))
        if not any(entries):
            _echo(f"drivepipe: error: {listing}: no properly formatted checksum lines",
                  err=True)
            code = code or 1
            continue
        malformed += entries.count(None)
        for entry in filter(None, entries):
            try:
                ok = digest(entry.name) == entry.digest
            except DrivepipeError as exc:
                failure = _failed(exc)
                code = code or failure
                _echo(f"{entry.name}: FAILED open or read")
                continue
            _echo(f"{entry.name}: {'OK' if ok else 'FAILED'}")
            if not ok:
                mismatched += 1
                code = code or 7
    if malformed:
        _echo(f"drivepipe: warning: {malformed} line(s) improperly formatted", err=True)
    if mismatched:
        _echo(f"drivepipe: warning: {mismatched} computed checksum(s) did NOT match",
              err=True)
    return code


def _read_list(listing: str) -> list[str]:
    if listing == "-":
        return sys.stdin.readlines()
    with open(listing, encoding="utf-8", errors="surrogateescape") as f:
        return f.readlines()

"""``drivepipe drives``: see, inspect, delete and wait for drives; interrupted uploads.

Parse, call :mod:`drivepipe.cloudsigma.drives`, render.  Lists go to stdout as aligned
columns (``--json``: one JSON document); notes and questions go to stderr.
``rm`` and ``uploads --discard`` ask before they delete unless ``--yes``; with
no terminal to ask on they refuse.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from drivepipe._errors import DrivepipeError, UsageError
from drivepipe._sizes import format_size
from drivepipe.cli._app import app, group
from drivepipe.cli._common import FROM_OPTIONS, grouped_options
from drivepipe.cli._net import Account, CacertOpt, InsecureHttpOpt, UserOpt
from drivepipe.cloudsigma.drives import (
    Drive,
    PendingUpload,
    check_uuid,
    delete_drive,
    discard_upload,
    find_pending,
    get_drive,
    list_drives,
    pending_uploads,
    wait_ready,
)

drives = group(
    "drives",
    help="List, show, delete and wait for the account's drives; list or discard "
    "interrupted chunked uploads.  Without a command: the list.",
    invoke_without_command=True,
)
app.add_typer(drives, name="drives")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No notes on stderr.")]
UuidArg = Annotated[str, typer.Argument(metavar="UUID", help="The drive's UUID.")]


def note(text: str, quiet: bool = False) -> None:
    if not quiet:
        typer.echo(f"drivepipe: {text}", err=True)


def confirm(question: str, yes: bool) -> bool:
    """True to go ahead: ``--yes``, or a yes on the terminal; no terminal: refused."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{question.rstrip('?')}: refusing to delete without a terminal to "
                         "ask on; pass --yes")
    # Asked on stderr and read from stdin ourselves: click's prompt writes a space to
    # stdout, which carries only UUIDs here.
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns, two spaces apart (the last column unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False))
            + "  " + row[-1] for row in rows]


def drive_rows(found: Sequence[Drive]) -> list[str]:
    rows = [("UUID", "NAME", "SIZE", "STATUS", "XXH128")]
    rows += [(d.uuid, d.name or "-", format_size(d.size), d.status, d.checksum or "-")
             for d in found]
    return table(rows)


# --- list -------------------------------------------------------------------------------


@drives.callback()
@grouped_options
def _drives(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    account: Account = FROM_OPTIONS,
) -> None:
    if ctx.invoked_subcommand is not None:
        if as_json or account.given():
            raise UsageError(f"put the options after the command: drivepipe drives "
                             f"{ctx.invoked_subcommand} [OPTIONS] ...")
        return
    show_list(as_json, account)


@drives.command("list")
@grouped_options
def list_(
    as_json: JsonOpt = False,
    account: Account = FROM_OPTIONS,
) -> None:
    """List the drives: uuid, name, size, status, and the xxh128 our upload stored."""
    show_list(as_json, account)


def show_list(as_json: bool, account: Account) -> None:
    with account.connection() as conn:
        found = list_drives(conn.api)
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in found], indent=2))
    elif found:
        for line in drive_rows(found):
            typer.echo(line)


# --- show -------------------------------------------------------------------------------


@drives.command()
@grouped_options
def show(
    uuid: UuidArg,
    as_json: JsonOpt = False,
    account: Account = FROM_OPTIONS,
) -> None:
    """Show one drive: name, size, status, whether it can be downloaded, its meta."""
    with account.connection() as conn:
        drive = get_drive(conn.api, uuid)
    info = drive.as_dict()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    meta = info.pop("meta")
    rows = [(f"{key}:", shown_value(key, value)) for key, value in info.items()]
    rows += [(f"meta.{key}:", value) for key, value in sorted(meta.items())]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:{width}} {value}")


def shown_value(key: str, value: Any) -> str:
    if key in ("size", "xxh128_size") and isinstance(value, int):
        return f"{value} ({format_size(value)})"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)


# --- rm ---------------------------------------------------------------------------------


@drives.command()
@grouped_options
def rm(
    uuids: Annotated[list[str], typer.Argument(metavar="UUID", help="Drives to delete.")],
    yes: YesOpt = False,
    account: Account = FROM_OPTIONS,
) -> None:
    """Delete drives (asks first unless --yes); prints each deleted UUID."""
    uuids = [check_uuid(uuid) for uuid in uuids]  # all of them, before deleting any
    code = 0
    with account.connection() as conn:
        for uuid in uuids:
            try:
                drive = get_drive(conn.api, uuid)
                if not confirm(f"delete drive {drive.uuid} ({drive.name or 'no name'}, "
                               f"{format_size(drive.size)}, {drive.status})?", yes):
                    note(f"kept {drive.uuid}")
                    continue
                delete_drive(conn.api, drive.uuid)
            except UsageError:
                raise
            except DrivepipeError as exc:
                typer.echo(f"drivepipe: error: {exc.one_line()}", err=True)
                code = code or exc.exit_code
                continue
            typer.echo(drive.uuid)
    if code:
        raise typer.Exit(code)


# --- wait -------------------------------------------------------------------------------


@drives.command()
@grouped_options
def wait(
    uuid: UuidArg,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="Give up after this long (exit 6).")] = 600.0,
    interval: Annotated[float, typer.Option(
        "--interval", metavar="SECONDS", help="Time between two looks at the drive.",
        hidden=True)] = 2.0,
    quiet: QuietOpt = False,
    account: Account = FROM_OPTIONS,
) -> None:
    """Wait until a drive can be downloaded (its status allows it); prints its UUID."""
    if timeout < 0 or interval <= 0:
        raise UsageError("--timeout must be 0 or more and --interval more than 0")
    seen: list[str] = []

    def on_poll(drive: Drive) -> None:
        if not seen or seen[-1] != drive.status:
            seen.append(drive.status)
            note(f"drive {drive.uuid} is {drive.status}", quiet)

    with account.connection() as conn:
        drive = wait_ready(conn.api, uuid, timeout, interval=interval, on_poll=on_poll)
    typer.echo(drive.uuid)


# --- uploads ----------------------------------------------------------------------------


def upload_rows(found: Sequence[PendingUpload]) -> list[str]:
    rows = [("DRIVE", "DONE", "STATE", "ENDPOINT", "IMAGE")]
    rows += [(p.journal.uuid, f"{p.confirmed}/{p.chunks} chunks",
              "running" if p.running else "interrupted", p.journal.api, p.journal.image.path)
             for p in found]
    return table(rows)


@drives.command()
def uploads(
    discard: Annotated[str | None, typer.Option(
        "--discard", metavar="UUID", help="Forget this interrupted upload: delete its "
        "partial drive (still uploading) and its journal.", show_default=False)] = None,
    keep_drive: Annotated[bool, typer.Option(
        "--keep-drive", help="With --discard: delete only the journal, leave the drive.")
    ] = False,
    yes: YesOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    journal_dir: Annotated[str | None, typer.Option(
        "--journal-dir", metavar="DIR", help="Where the journals are (default: "
        "$XDG_CACHE_HOME/drivepipe/uploads).", show_default=False)] = None,
    user: UserOpt = None,
    cacert: CacertOpt = None,
    insecure_http: InsecureHttpOpt = False,
) -> None:
    """List the chunked uploads that were interrupted (their journals), or discard one.

    To resume one, run the same upload again (drivepipe upload --chunked IMAGE, same
    endpoint): it finds its journal and sends only the missing chunks.  Journals
    written with --journal elsewhere are not listed.
    """
    if discard is not None:
        discard_one(discard, journal_dir, keep_drive, yes, quiet, user, cacert, insecure_http)
        return
    if keep_drive:
        raise UsageError("--keep-drive belongs to --discard")
    problems: list[str] = []
    found = pending_uploads(journal_dir, problems)
    for problem in problems:
        note(f"warning: {problem}")
    if as_json:
        typer.echo(json.dumps([p.as_dict() for p in found], indent=2))
        return
    if not found:
        note("no interrupted chunked uploads", quiet)
        return
    for line in upload_rows(found):
        typer.echo(line)
    note("resume: run the same drivepipe upload --chunked IMAGE again (same endpoint); "
         "discard: drivepipe drives uploads --discard DRIVE", quiet)


def discard_one(
    uuid: str, journal_dir: str | None, keep_drive: bool, yes: bool, quiet: bool,
    user: str | None, cacert: str | None, insecure_http: bool,
) -> None:
    pending = find_pending(uuid, journal_dir)
    journal = pending.journal
    what = "its journal" if keep_drive else "its partial drive and journal"
    if not confirm(f"discard the upload of {journal.image.path} into drive {journal.uuid} "
                   f"({what})?", yes):
        note("kept it")
        return
    if keep_drive:
        discard_upload(pending, None)
    else:
        account = Account(journal.api, user=user, cacert=cacert, insecure_http=insecure_http)
        with account.connection() as conn:
            if not discard_upload(pending, conn.api):
                note(f"drive {journal.uuid} was gone or complete: kept it, removed the "
                     "journal", quiet)
    typer.echo(journal.uuid)

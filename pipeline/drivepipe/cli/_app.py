"""The typer application object every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="drivepipe",
    help="Move disk images to and from a cloud drive API: convert, checksum, "
    "upload and download as one streaming, sparse-aware pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

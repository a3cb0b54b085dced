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


@app.callback()
def _group() -> None:
    # A callback keeps drivepipe a command group even when only one command module
    # has been loaded (typer would otherwise run a lone command without its name).
    pass

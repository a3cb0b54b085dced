"""The typer application object every command module registers on.

Conventions every command gets from here rather than from its own code:
``-h`` as well as ``--help``; ``--version`` on ``drivepipe`` itself; commands
listed by name; placeholders that say what goes there.  An argument shows its
metavar (``UUID``, ``PATH...``) plainly in the usage line, and the "Missing
argument" error names it the same way; an option without a metavar of its own
gets one from its type (``N`` for numbers, ``SECONDS`` for fractions, ``VALUE``
otherwise) instead of typer's ``<str>``.  Make sub-groups with :func:`group`
so they get the same.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer import _click as click  # typer vendors click; its Context is click's
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

from drivepipe import __version__

HELP_NAMES = ["-h", "--help"]
CONTEXT: dict[str, Any] = {"help_option_names": HELP_NAMES}
#: placeholder of an option that declares none, by its click type's name
TYPE_METAVARS = {"int": "N", "integer": "N", "float": "SECONDS", "str": "VALUE", "text": "VALUE"}


class Command(TyperCommand):
    """A command whose placeholders say what goes there."""

    def __init__(self, name: str | None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument) and param.metavar is None:
                param.metavar = (param.name or "arg").upper()
            elif isinstance(param, TyperOption) and param.metavar is None and not (
                    param.is_flag or param.count):
                type_name = getattr(param.type, "name", "text")
                if type_name in TYPE_METAVARS:
                    param.metavar = TYPE_METAVARS[type_name]

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(usage_piece(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def usage_piece(arg: TyperArgument) -> str:
    """``UUID``, ``PATH...``, ``[DIR]``: typer would write ``{UUID}``."""
    text = arg.metavar or (arg.name or "arg").upper()
    if arg.nargs != 1:
        text += "..."
    return text if arg.required else f"[{text}]"


class Group(TyperGroup):
    """A command group listing its commands by name (whatever the import order)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(super().list_commands(ctx))


class App(typer.Typer):
    """A Typer whose commands are :class:`Command` unless told otherwise."""

    def command(  # the same as typer's, with a default for cls
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(name, cls=cls or Command, **kwargs)


def group(name: str, help: str, **kwargs: Any) -> App:
    """A sub-group of commands (``drivepipe NAME ...``) with the conventions above."""
    return App(name=name, help=help, cls=Group, context_settings=CONTEXT,
               add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
               **kwargs)


app = App(
    name="drivepipe",
    help="Move disk images to and from a cloud drive API: convert, checksum, "
    "upload and download as one streaming, sparse-aware pipeline.",
    cls=Group,
    context_settings=CONTEXT,
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion (bash, zsh, fish)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"drivepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _group(
    version: Annotated[bool, typer.Option(
        "--version", help="Print drivepipe's version and exit.", is_eager=True,
        callback=_show_version)] = False,
) -> None:
    # A callback keeps drivepipe a command group even when only one command module
    # has been loaded (typer would otherwise run a lone command without its name).
    pass

"""The ``drivepipe`` command: a thin edge that parses, builds, runs, renders.

Each group of commands lives in its own ``cmd_*`` module and registers on
:data:`app` when imported; this package imports them all.
Every :class:`~drivepipe.DrivepipeError` ends as one line on stderr and its
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

import typer

from .._errors import Cancelled, DrivepipeError
from ._app import app


def _register_commands() -> None:
    """Import every ``cmd_*`` module of this package; each registers its commands."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_commands()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Standalone mode: typer handles usage errors and --help itself (SystemExit).
        app(args=args, prog_name="drivepipe")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except DrivepipeError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return _fail(Cancelled())
    return 0


def _fail(exc: DrivepipeError) -> int:
    print(f"drivepipe: error: {exc.one_line()}", file=sys.stderr, flush=True)
    return exc.exit_code


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Warnings for users are one line, like errors, without the source line."""
    print(f"drivepipe: warning: {message}", file=file or sys.stderr, flush=True)


def console_main() -> None:
    warnings.showwarning = _show_warning
    sys.exit(main())


__all__ = ["app", "console_main", "main", "typer"]

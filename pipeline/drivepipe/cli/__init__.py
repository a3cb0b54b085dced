"""The ``drivepipe`` command: a thin edge that parses, builds, runs, renders.

Each group of commands lives in its own ``cmd_*`` module and registers on
:data:`app` when imported.  To start fast, ``main`` imports only the module
of the command being run (:data:`COMMAND_MODULES`; a test keeps that table
equal to what the modules register); ``drivepipe.cli.app`` and ``--help``
load them all.  ``checksum`` of plain paths runs without typer at all
(:mod:`drivepipe.cli._fast`).
Every :class:`~drivepipe.DrivepipeError` ends as one line on stderr and its
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pkgutil
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from drivepipe._errors import Cancelled, DrivepipeError
from drivepipe.cli import _fast

if TYPE_CHECKING:
    import typer
    from typer.models import CommandInfo

#: command name -> the module that registers it
COMMAND_MODULES: dict[str, str] = {
    "batch": "cmd_batch",
    "bench": "cmd_bench",
    "checksum": "cmd_local",
    "convert": "cmd_local",
    "copy": "cmd_copy",
    "demo": "cmd_demo",
    "download": "cmd_download",
    # the drives group: drives, drives list/show/rm/wait/uploads
    "drives": "cmd_drives",
    "inspect": "cmd_local",
    "serve": "cmd_serve",
    "upload": "cmd_upload",
}


def load_commands(command: str | None = None) -> typer.Typer:
    """Register ``command``'s module, or every ``cmd_*`` module; returns the app."""
    from drivepipe.cli import _app  # noqa: PLC0415 - typer, when a command needs it

    if command in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{COMMAND_MODULES[command]}")
        return _app.app
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}")
    # --help lists commands in registration order, which depends on what ran before
    # in this process: list them by name instead.
    _app.app.registered_commands.sort(key=_command_name)
    return _app.app


def _command_name(command: CommandInfo) -> str:
    callback = command.callback
    return command.name or (callback.__name__ if callback is not None else "")


def __getattr__(name: str) -> typer.Typer:
    if name == "app":  # the complete app, for docs and introspection
        return load_commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _fast.run(args)
        if code is not None:
            return code
        # Standalone mode: typer handles usage errors and --help itself (SystemExit).
        load_commands(args[0] if args else None)(args=args, prog_name="drivepipe")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except DrivepipeError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return _fail(Cancelled())
    return 0


def _fail(exc: DrivepipeError) -> int:
    from drivepipe.cli._flags import with_flags  # noqa: PLC0415 - only when failing

    print(f"drivepipe: error: {with_flags(exc.one_line())}", file=sys.stderr, flush=True)
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


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Ask glibc for at most ``arenas`` malloc arenas (like MALLOC_ARENA_MAX=2).

    Decoder threads each free multi-MiB buffers in an arena of their own, and the
    fragments add up: measured on 1 GiB of qcow2 in 24 MiB xz blocks, peak RSS 273
    MiB with glibc's default (8 per core), 222 MiB with 2, no slower.  The command
    line only: a library must not change its host process's allocator.  Best effort.
    """
    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


#: what a SIGBUS says: the only one drivepipe expects is a mapped input cut short
SIGBUS_LINE = (b"drivepipe: error: an input file was cut short while it was read "
               b"(SIGBUS); --no-mmap reads it with pread\n")
#: the ctypes callback libc calls on SIGBUS, kept alive here (libc holds only its address)
_SIGBUS_HANDLERS: list[object] = []


def _sigbus_as_one_line() -> None:
    """Turn SIGBUS into one line on stderr and exit code 3 (an input error).

    Regular files are read through mmap windows (drivepipe_plugins.sources.file);
    another process truncating the file under a window makes the next access to it
    a SIGBUS, which would otherwise end the process with the shell's "Bus error".
    Python cannot handle a synchronous fault itself (its handler returns to the
    faulting instruction), so a C-level handler, a ctypes callback, writes the line
    and leaves with ``os._exit``: nothing after the fault runs, no output is
    published (the temporary file is left as after a kill).  The command line only:
    a library must not install signal handlers.  Best effort.
    """
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)

    def on_sigbus(signum: int) -> None:
        os.write(2, SIGBUS_LINE)
        os._exit(3)

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.signal.argtypes = (ctypes.c_int, handler_type)
        libc.signal.restype = ctypes.c_void_p
        handler = handler_type(on_sigbus)
        _SIGBUS_HANDLERS.append(handler)
        libc.signal(signal.SIGBUS, handler)


def console_main() -> None:
    _limit_malloc_arenas()
    _sigbus_as_one_line()
    warnings.showwarning = _show_warning
    sys.exit(main())


__all__ = ["COMMAND_MODULES", "app", "console_main", "load_commands", "main"]

"""``checksum PATH...`` without typer, when nothing else is asked of it.

Importing typer (with the click it vendors) costs 140 ms of a command's start on
the CPython this runs on, where hashing 4 GiB of warm file takes 0.6 s and
``xxh128sum`` takes 0.77 s: a checksum in a script's loop over many images
would pay it for every one.  So :func:`drivepipe.cli.main` first offers its
arguments here, and this takes them only when there is nothing to parse: the
command ``checksum`` followed by paths, none of which starts with ``-`` (no
option, no ``--``, no standard input), and a standard error that is not a
terminal (``--progress auto`` shows nothing there).  The result is what typer's
``checksum`` prints, by the same functions (:mod:`drivepipe.cli._checklist`)
with the same defaults; ``tests/test_cli_fast.py`` runs both and compares.
Everything else - an option, ``--help``, a terminal's live view - returns None
and goes to typer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivepipe.jobs.images import ReadOptions


def run(args: Sequence[str]) -> int | None:
    """The exit code of ``args`` run here, or None when typer must parse them."""
    if len(args) < 2 or args[0] != "checksum" or sys.stderr.isatty():
        return None
    paths = args[1:]
    if any(not path or path.startswith("-") for path in paths):
        return None
    from drivepipe.cli._checklist import checksum_one, hash_each  # noqa: PLC0415

    read, depth = read_options()
    return hash_each(paths, lambda path: checksum_one(path, read, depth, "none"))


def read_options() -> tuple[ReadOptions, int]:
    """What ``checksum`` reads with when given no option: the read options, the queue depth."""
    from drivepipe.jobs.images import LOCAL_QUEUE_DEPTH, ReadOptions  # noqa: PLC0415

    return ReadOptions(format="auto"), LOCAL_QUEUE_DEPTH


__all__ = ["read_options", "run"]

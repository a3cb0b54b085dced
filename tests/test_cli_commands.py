"""The CLI loads only the module of the command it runs; the table must not drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import drivepipe
import drivepipe.jobs
import drivepipe.jobs.batching
import drivepipe.jobs.local
from drivepipe.cli import COMMAND_MODULES, load_commands


def test_command_table_matches_what_the_modules_register() -> None:
    app = load_commands()
    registered = {cmd.name or (cmd.callback.__name__ if cmd.callback else "")
                  for cmd in app.registered_commands}
    groups = {info.name or "" for info in app.registered_groups}  # drivepipe drives ...
    assert registered | groups == set(COMMAND_MODULES)
    for cmd in app.registered_commands:
        assert cmd.callback is not None
        name = cmd.name or cmd.callback.__name__
        assert cmd.callback.__module__.endswith("." + COMMAND_MODULES[name])
    for info in app.registered_groups:
        sub = info.typer_instance
        assert sub is not None and sub.registered_callback is not None
        callback = sub.registered_callback.callback
        assert callback is not None
        assert callback.__module__.endswith("." + COMMAND_MODULES[info.name or ""])


def test_running_a_local_command_does_not_import_the_network_side(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    code = (
        "import sys\n"
        "from drivepipe.cli import main\n"
        f"main(['checksum', '--progress', 'none', {str(empty)!r}])\n"
        "heavy = [m for m in ('drivepipe.server', 'drivepipe_plugins.targets.drive_chunked',"
        " 'drivepipe_plugins.sources.download', 'drivepipe_plugins.sources.url',"
        " 'drivepipe._bench', 'drivepipe.jobs.transfer', 'drivepipe.jobs.batching', 'rich')"
        " if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stderr.strip().splitlines()[-1] == "[]"
    assert out.stdout.startswith("99aa06d3014798d86001c324468d497f  ")  # xxh128 of nothing


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-c", "from drivepipe.cli import console_main;"
                          "console_main()", "--help"], capture_output=True, text=True,
                         check=True)
    for name in COMMAND_MODULES:
        assert name in out.stdout


def test_the_batch_api_stays_callable_once_its_modules_are_loaded() -> None:
    # a submodule named like a package attribute would replace it when first imported
    # (the modules are imported at the top of this file)
    assert callable(drivepipe.jobs.batch) and callable(drivepipe.batch)
    assert drivepipe.jobs.LocalExecutor.__module__ == "drivepipe.jobs.local"

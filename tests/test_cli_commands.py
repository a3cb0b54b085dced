"""The CLI loads only the module of the command it runs; the table must not drift."""

from __future__ import annotations

import subprocess
import sys

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


def test_running_a_local_command_does_not_import_the_network_side() -> None:
    code = (
        "import sys\n"
        "from drivepipe.cli import main\n"
        "main(['checksum', '--help'])\n"
        "heavy = [m for m in ('drivepipe.server', 'drivepipe_plugins.targets.drive_chunked',"
        " 'drivepipe_plugins.sources.download', 'drivepipe_plugins.sources.url',"
        " 'drivepipe._bench') if m in sys.modules]\n"
        "print(heavy, file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stderr.strip().splitlines()[-1] == "[]"
    assert "checksum" in out.stdout


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-c", "from drivepipe.cli import console_main;"
                          "console_main()", "--help"], capture_output=True, text=True,
                         check=True)
    for name in COMMAND_MODULES:
        assert name in out.stdout

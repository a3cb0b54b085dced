"""Fixtures of the reliability and security suites, and the fault table.

``store`` / ``make_store(**settings)``: the real local drive store
(:func:`drivepipe.server.serve_in_thread`) on 127.0.0.1 with a 1 MiB minimum
drive size and short timeouts, stopped after the test.

``cli(*argv, env=...)``: runs the ``drivepipe`` CLI in this process (the real
code path of the console script) with a clean ``HOME`` and the account in the
environment; returns ``(exit_code, stdout, stderr)``.

``fault_table``: every fault scenario records what happened with
``fault_table.record(scenario, operation, survived=..., how=..., data_lost=...)``
*before* asserting, so a failing scenario still shows in the table.
``pytest_terminal_summary`` prints the table (markdown) at the end of the run,
so it lands in the CI log: faults tried, survived, and data lost (must be 0:
a final file that does not hold the source's bytes, or a drive reported done
that does not hold the image's bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rel_support import Cli, FaultTable
from store_servers import store_fixtures

from drivepipe.cli import main

MiB = 1 << 20
STORE_MIN_SIZE = MiB
USERNAME = "reliable@example.com"
PASSWORD = "Rel-secret-9f3b2c"



# --- the fault table ---------------------------------------------------------------------------


TABLE = FaultTable()


@pytest.fixture(scope="session")
def fault_table() -> FaultTable:
    return TABLE


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TABLE.rows:
        return
    terminalreporter.write_sep("=", "drivepipe fault table")
    for line in TABLE.lines():
        terminalreporter.write_line(line)


# --- the store and the CLI ---------------------------------------------------------------------


make_store, store = store_fixtures("make_store", "store", username=USERNAME,
                                   password=PASSWORD, min_size=STORE_MIN_SIZE, idle_timeout=5.0)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean HOME and XDG dirs: no config, netrc or journals of the real user."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for name in ("CLOUDSIGMA_CONFIG", "DRIVEPIPE_ENDPOINT", "CLOUDSIGMA_USERNAME",
                 "CLOUDSIGMA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def cli(home: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capfd.readouterr()
        code = main(list(argv))
        out, err = capfd.readouterr()
        return code, out, err

    return run

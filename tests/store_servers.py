"""Starting real local drive stores for tests, shared by the test folders' fixtures.

Imported by name (``from store_servers import ...``): pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivepipe.cli import main
from drivepipe.server import RunningServer, serve_in_thread

MakeStore = Callable[..., RunningServer]


def store_factory(
    tmp_path_factory: pytest.TempPathFactory, **defaults: Any
) -> Iterator[MakeStore]:
    """Yield ``make(**settings)`` starting stores on fresh tmp roots; stop them all after.

    ``defaults`` fill the :class:`~drivepipe.server.ServerConfig` settings a call
    leaves out; ``root`` may be given to reuse a store's directory.
    """
    servers: list[RunningServer] = []

    def make(**settings: Any) -> RunningServer:
        for key, value in defaults.items():
            settings.setdefault(key, value)
        root = settings.pop("root", None) or str(tmp_path_factory.mktemp("store"))
        server = serve_in_thread(root, **settings)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def store_fixtures(make_name: str, name: str, **defaults: Any) -> tuple[Any, Any]:
    """A folder's pair of fixtures: ``make_name`` (:func:`store_factory` with ``defaults``)
    and ``name`` (one store it made); bind both in the conftest under those names."""

    @pytest.fixture(name=make_name)
    def make_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeStore]:
        yield from store_factory(tmp_path_factory, **defaults)

    @pytest.fixture(name=name)
    def one_fixture(request: pytest.FixtureRequest) -> RunningServer:
        make: MakeStore = request.getfixturevalue(make_name)
        return make()

    return make_fixture, one_fixture


def use_account(monkeypatch: pytest.MonkeyPatch, home: Path, server: RunningServer) -> None:
    """A clean ``HOME`` (no config or netrc of the real user) and ``server``'s account in
    the environment, where the CLI looks for it."""
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("CLOUDSIGMA_CONFIG", raising=False)
    monkeypatch.delenv("DRIVEPIPE_ENDPOINT", raising=False)
    monkeypatch.setenv("CLOUDSIGMA_USERNAME", server.username)
    monkeypatch.setenv("CLOUDSIGMA_PASSWORD", server.password)


def cli_upload(server: RunningServer, capfd: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch, home: Path, *args: str) -> tuple[int, str, str]:
    """``drivepipe upload --endpoint SERVER --progress none ARGS`` in this process, as
    :func:`use_account` sets it up: ``(exit code, stdout, stderr)``."""
    use_account(monkeypatch, home, server)
    capfd.readouterr()
    code = main(["upload", "--endpoint", server.base_url, "--progress", "none", *args])
    out, err = capfd.readouterr()
    return code, out, err


class Trigger:
    """Runs ``action`` in a thread as soon as ``condition`` holds (within 30 s)."""

    def __init__(self, condition: Callable[[], bool], action: Callable[[], None],
                 what: str = "") -> None:
        self.what = what
        self.fired = False
        self._thread = threading.Thread(target=self._watch, args=(condition, action),
                                        daemon=True)
        self._thread.start()

    def _watch(self, condition: Callable[[], bool], action: Callable[[], None]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if condition():
                action()
                self.fired = True
                return
            time.sleep(0.005)

    def join(self) -> bool:
        """Wait for the watcher; True if the action ran."""
        self._thread.join()
        return self.fired


def when_upload_arrives(server: RunningServer, action: Callable[[], None],
                        what: str = "") -> Trigger:
    """Hold the next direct upload 1 s before its body is read (the sender blocks
    meanwhile) and run ``action`` in a thread as soon as the request arrived."""
    server.faults.delay(1.0, match="/drives/upload")
    # the delay is taken (and gone from the list) when the request has arrived
    return Trigger(lambda: not server.faults.snapshot(), action, what)

"""Starting real local drive stores for tests, shared by the test folders' fixtures.

Imported by name (``from store_servers import ...``): pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

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

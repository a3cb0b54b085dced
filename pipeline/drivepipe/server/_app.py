"""The server object, and running it in a thread for tests and the demo.

:class:`StoreServer` is a ``ThreadingHTTPServer`` (one thread per connection,
HTTP/1.1 keep-alive) bound to ``(host, port)``, optionally TLS.
:func:`serve_in_thread` returns a :class:`RunningServer` (a context manager)
with ``base_url``, the credentials, the :class:`DriveStore` and the
:class:`Faults`; :meth:`RunningServer.restart` stops it (cutting every open
connection, like a crash) and starts a fresh one on the same root and port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import sys
import threading
from http.server import ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import Any

from drivepipe.server._config import ServerConfig, StoreContext
from drivepipe.server._faults import Faults
from drivepipe.server._handler import StoreHandler
from drivepipe.server._signing import Signer, load_secret
from drivepipe.server._store import DriveStore

log = logging.getLogger("drivepipe.server")


def make_context(config: ServerConfig, faults: Faults | None = None) -> StoreContext:
    """The store (holding its root's lock: close it, or the server made of it) and the rest."""
    store = DriveStore(config.root, min_size=config.min_size, max_size=config.max_size)
    try:
        signer = Signer(load_secret(os.path.join(store.root, "secret")))
    except BaseException:
        store.close()
        raise
    return StoreContext(config, store, signer, faults or Faults())


def tls_context(cert: str, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class StoreServer(ThreadingHTTPServer):
    """The drive store's HTTP server; ``context`` is shared by its handlers."""

    # Handler threads are joined on close (after their connections are cut), so a
    # restarted store never races a handler of the old one on the same root.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, context: StoreContext) -> None:
        self.context = context
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        config = context.config
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((config.host, config.port), StoreHandler)
        except BaseException:
            context.store.close()  # the root is free again when no server came of it
            raise
        if config.tls_cert:
            try:
                tls = tls_context(config.tls_cert, config.tls_key)
            except BaseException:
                self.server_close()
                context.store.close()
                raise
            # The handshake runs in the connection's thread (StoreHandler.setup).
            self.socket = tls.wrap_socket(
                self.socket, server_side=True, do_handshake_on_connect=False
            )

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): slow, and not needed.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    @property
    def base_url(self) -> str:
        host = self.server_name
        shown = f"[{host}]" if ":" in host else host
        return f"{self.context.config.scheme}://{shown}:{self.server_port}/api/2.0/"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._open_lock:
            return len(self._open) < self.context.config.max_connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that breaks the connection or the TLS handshake is not a server bug."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s failed: %s", client_address, exc)
            return
        super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close(self) -> None:
        """Stop accepting, cut open connections, wait for their handlers; free the root."""
        self.cut_connections()
        self.server_close()
        self.context.store.close()

    def cut_connections(self) -> None:
        """Shut every open connection down (their threads then end)."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class RunningServer:
    """A store server serving from a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.faults = Faults()
        self._server: StoreServer | None = None
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        server = StoreServer(make_context(self.config, self.faults))
        self.config.port = server.server_port
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"drive-store:{server.server_port}", daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread

    @property
    def server(self) -> StoreServer:
        assert self._server is not None, "the server is stopped"
        return self._server

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def store(self) -> DriveStore:
        return self.server.context.store

    @property
    def root(self) -> str:
        return self.store.root

    @property
    def username(self) -> str:
        return self.config.username

    @property
    def password(self) -> str:
        return self.server.context.password

    @property
    def env(self) -> dict[str, str]:
        """The account as the CLI reads it from the environment."""
        return {"CLOUDSIGMA_USERNAME": self.username, "CLOUDSIGMA_PASSWORD": self.password}

    @property
    def port(self) -> int:
        return self.config.port

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        thread.join()
        server.close()
        self._server = self._thread = None

    def restart(self) -> None:
        """Stop (cutting open connections) and serve again from the same root and port."""
        self.stop()
        self._start()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_in_thread(root: str, **settings: Any) -> RunningServer:
    """Start a store on ``root`` (127.0.0.1, a free port unless given) in a thread.

    ``settings`` are :class:`ServerConfig` fields: ``username``, ``password``,
    ``min_size``, ``max_size``, ``link_ttl``, ``chunk_link_ttl``,
    ``idle_timeout``, ``tls_cert``, ``tls_key``, ``host``, ``port``.
    """
    return RunningServer(ServerConfig(root=root, **settings))

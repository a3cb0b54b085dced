"""Fixtures for tests that talk to the local drive store over real HTTP on 127.0.0.1.

``drive_store`` (function scope): a fresh :class:`drivepipe.server.RunningServer`
on its own tmp root, min size 1 MiB (``STORE_MIN_SIZE``), serving in a thread:

- ``base_url``                 ``"http://127.0.0.1:PORT/api/2.0/"``
- ``username``, ``password``   the account (Basic auth)
- ``env``                      ``{"CLOUDSIGMA_USERNAME": ..., "CLOUDSIGMA_PASSWORD": ...}``
- ``root``                     the store's directory
- ``store``                    the :class:`DriveStore`: ``raw_path(uuid)`` (the drive's
  sparse file), ``get(uuid)`` (its record: ``size``, ``status``, ``meta``,
  ``image_size``, ``received`` chunk numbers...), ``list()``
- ``faults``                   fault injection, off until asked:
  ``fail_next(k, status=503, match="")``, ``delay(seconds, count=1, match="")``,
  ``drop_upload_after(nbytes)``, ``drop_download_after(nbytes)``,
  ``cut_download_after(nbytes)``, ``add(kind=..., count=0 for "always", ...)``, ``clear()``
  (``match`` is a substring of the request path+query, e.g. ``"/download/"``, ``"/chunk/"``)
- ``restart()``                stop (cutting open connections) and serve the same root
  on the same port again, as after a crash

``make_drive_store(**settings)``: more servers with other settings, any
:class:`drivepipe.server.ServerConfig` field (``root`` to share a directory,
``min_size``, ``max_size``, ``link_ttl``, ``chunk_link_ttl``, ``idle_timeout``
(10 s here), ``header_timeout``, ``max_connections``, ``max_uploads``,
``upload_wait``, ``tls_cert``, ``tls_key``, ``username``, ``password``); each is
stopped after the test.

``tls_drive_store``: a store serving https with a certificate from a throwaway private CA
(trustme; skipped without it): ``TlsStore(server, ca_pem)``, ``ca_pem`` the CA's PEM file
that ``TlsOptions(cacert=...)`` / ``--cacert`` must be given.

``put_drive(server, data_or_path) -> uuid`` (a fixture returning the function): a
finished drive made straight in the store (no HTTP), for download tests; sparse
input stays sparse.

``api(server)`` (a fixture returning the class): a tiny JSON client over
``http.client`` for API assertions:
``api(srv).call("GET", "drives/", body=None, auth=True) -> Answer(status, headers, body, json)``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from store_servers import MakeStore, store_fixtures

from drivepipe.server import RunningServer

STORE_MIN_SIZE = 1 << 20
USERNAME = "tester@example.com"
PASSWORD = "s3cret-pass"



make_drive_store, drive_store = store_fixtures(
    "make_drive_store", "drive_store", username=USERNAME, password=PASSWORD,
    min_size=STORE_MIN_SIZE, idle_timeout=10.0)


@dataclass
class TlsStore:
    server: RunningServer
    #: the private CA's certificate (PEM), which clients must be given to trust the server
    ca_pem: Path


@pytest.fixture
def tls_drive_store(make_drive_store: MakeStore, tmp_path: Path) -> TlsStore:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, ca_pem = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    server = make_drive_store(tls_cert=str(chain), tls_key=str(key))
    assert server.base_url.startswith("https://")
    return TlsStore(server, ca_pem)


def _put_drive(server: RunningServer, source: bytes | Path) -> str:
    """Create a finished drive from bytes or a (sparse) file, without HTTP."""
    if isinstance(source, bytes):
        incoming = server.store.begin_direct(len(source))
        incoming.write(source)
        return incoming.finish().uuid
    size = os.path.getsize(source)
    incoming = server.store.begin_direct(size)
    with open(source, "rb") as f:
        while block := f.read(4 << 20):
            incoming.write(block)
    return incoming.finish().uuid


@pytest.fixture
def put_drive() -> Callable[[RunningServer, bytes | Path], str]:
    return _put_drive


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """Minimal JSON client for assertions about the store's answers."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        parts = urlsplit(server.base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path

    def auth_header(self, user: str | None = None, password: str | None = None) -> str:
        pair = f"{user or self.server.username}:{password or self.server.password}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            hdrs = dict(headers or {})
            if auth:
                hdrs.setdefault("Authorization", self.auth_header())
            data = raw
            if body is not None:
                data = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            target = path if path.startswith("/") else self.prefix + path
            conn.request(method, target, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read())
        finally:
            conn.close()


@pytest.fixture
def api() -> Callable[[RunningServer], Api]:
    return Api

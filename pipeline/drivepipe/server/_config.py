"""Settings of one store server and the shared state its request handlers use."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from drivepipe.server._faults import Faults
from drivepipe.server._signing import Signer
from drivepipe.server._store import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, DriveStore

DEFAULT_USERNAME = "drivepipe@localhost"


def random_password() -> str:
    return secrets.token_urlsafe(18)


@dataclass(slots=True)
class ServerConfig:
    """How a store server runs; ``password`` None makes a random one."""

    root: str
    username: str = DEFAULT_USERNAME
    password: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    #: Lifetime of a signed download URL (the redirect target), seconds.
    link_ttl: float = 3600.0
    #: Lifetime of a one-time chunk upload link ("about 5 minutes").
    chunk_link_ttl: float = 300.0
    #: A connection silent this long is closed (slow or idle clients).
    idle_timeout: float = 60.0
    #: A request line and headers must arrive within this long in total: a client that
    #: trickles them a byte at a time (slowloris) beats the idle timeout, not this.
    header_timeout: float = 30.0
    #: Connections served at once; more are closed at once (a flood of idle sockets).
    max_connections: int = 256
    #: Request bodies received at once (each holds up to 12 MiB of buffers); more wait
    #: up to ``upload_wait`` seconds, then get 503.
    max_uploads: int = 16
    upload_wait: float = 30.0
    #: Bytes a second each request body is received at, at most (0: no cap): the
    #: per-flow limit of a real network, for benchmarks of parallel connections.
    rate_limit: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    realm: str = "drivepipe"

    def __post_init__(self) -> None:
        if self.password is None:
            self.password = random_password()

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


@dataclass(slots=True)
class StoreContext:
    """What every request handler of a server shares."""

    config: ServerConfig
    store: DriveStore
    signer: Signer
    faults: Faults = field(default_factory=Faults)
    upload_slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.upload_slots = threading.BoundedSemaphore(self.config.max_uploads)

    @property
    def password(self) -> str:
        assert self.config.password is not None  # set by ServerConfig.__post_init__
        return self.config.password

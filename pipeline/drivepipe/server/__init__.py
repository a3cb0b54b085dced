"""The local drive store: a CloudSigma-compatible drive upload/download server.

Serves the API host and the direct host under one base URL
(``http://HOST:PORT/api/2.0/``): direct uploads, downloads through a
redirect to a signed URL (Range, ETag, holes never read), the drives JSON
API, capabilities, locations, and the chunked upload protocol (initupload,
``upload_chunk`` one-time links), with drives stored as sparse files and
metadata written atomically under a root directory.  Fault injection for
reliability tests is off until asked for.

Python API::

    from drivepipe.server import serve_in_thread

    with serve_in_thread(tmpdir, username="u@example.com", password="pw",
                         min_size=1 << 20) as srv:
        srv.base_url          # "http://127.0.0.1:PORT/api/2.0/"
        srv.store.raw_path(uuid), srv.store.get(uuid)
        srv.faults.fail_next(2)            # next two requests: 503
        srv.faults.drop_upload_after(1 << 20)
        srv.restart()                      # same root and port, fresh process state
"""

from drivepipe.server._app import RunningServer, StoreServer, make_context, serve_in_thread
from drivepipe.server._config import ServerConfig, StoreContext
from drivepipe.server._errors import ApiError
from drivepipe.server._faults import Fault, Faults
from drivepipe.server._store import (
    DEFAULT_MAX_SIZE,
    DEFAULT_MIN_SIZE,
    DriveRecord,
    DriveStore,
    chunk_count,
    chunk_span,
)

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MIN_SIZE",
    "ApiError",
    "DriveRecord",
    "DriveStore",
    "Fault",
    "Faults",
    "RunningServer",
    "ServerConfig",
    "StoreContext",
    "StoreServer",
    "chunk_count",
    "chunk_span",
    "make_context",
    "serve_in_thread",
]

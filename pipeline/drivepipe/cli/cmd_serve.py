"""``drivepipe serve``: run the local CloudSigma-compatible drive store.

Prints the base URL (``http://HOST:PORT/api/2.0/``) on stdout once it accepts
connections, the root directory (and a generated password, when
``CLOUDSIGMA_PASSWORD`` is unset) on stderr, then serves until Ctrl-C.
The account is ``CLOUDSIGMA_USERNAME`` / ``CLOUDSIGMA_PASSWORD``; credentials
are never taken from the command line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated

import typer

from drivepipe._errors import ConfigError, UsageError
from drivepipe._sizes import parse_size
from drivepipe.cli._app import app
from drivepipe.cli._common import positive_size
from drivepipe.server import Fault, ServerConfig, StoreServer, make_context
from drivepipe.server._config import DEFAULT_USERNAME, random_password
from drivepipe.server._store import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE


def default_root() -> str:
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "drivepipe", "store")


def _faults(specs: list[str]) -> list[Fault]:
    faults: list[Fault] = []
    for spec in specs:
        try:
            obj = json.loads(spec)
            items = obj if isinstance(obj, list) else [obj]
            faults.extend(Fault.from_json(item) for item in items)
        except ValueError as exc:
            raise UsageError(f"--fault {spec!r}: {exc}") from exc
    return faults


def _config(
    root: str, host: str, port: int, min_size: str, max_size: str,
    tls_cert: str | None, tls_key: str | None, idle_timeout: float,
) -> ServerConfig:
    password = os.environ.get("CLOUDSIGMA_PASSWORD") or None
    if tls_key and not tls_cert:
        raise UsageError("--tls-key needs --tls-cert")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    if idle_timeout <= 0:
        raise UsageError("--idle-timeout must be more than 0 seconds")
    smallest, largest = parse_size(min_size), positive_size(max_size, "--max-size")
    if smallest > largest:
        raise UsageError(f"--min-size {min_size} is more than --max-size {max_size}")
    config = ServerConfig(
        root=root, username=os.environ.get("CLOUDSIGMA_USERNAME") or DEFAULT_USERNAME,
        password=password or random_password(), host=host, port=port,
        min_size=smallest, max_size=largest,
        tls_cert=tls_cert, tls_key=tls_key, idle_timeout=idle_timeout,
    )
    if password is None:
        print(
            f"drivepipe serve: account {config.username} password {config.password} "
            "(set CLOUDSIGMA_USERNAME / CLOUDSIGMA_PASSWORD to choose them)",
            file=sys.stderr, flush=True,
        )
    return config


def _stop(signum: int, frame: object) -> None:
    # SIGTERM ends the server like Ctrl-C: open uploads are aborted, exit 0.
    raise KeyboardInterrupt


@app.command()
def serve(
    root: Annotated[
        str | None, typer.Option(
            "--root", metavar="DIR", help="Directory of the drives (created if missing).")
    ] = None,
    host: Annotated[str, typer.Option(
        "--host", metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port; 0 picks a free one.")] = 8765,
    min_size: Annotated[
        str, typer.Option(
            "--min-size", metavar="SIZE", help="Smaller uploads are grown to this size.")
    ] = f"{DEFAULT_MIN_SIZE >> 20}M",
    max_size: Annotated[
        str, typer.Option("--max-size", metavar="SIZE", help="Largest drive accepted.")
    ] = str(DEFAULT_MAX_SIZE),
    tls_cert: Annotated[
        str | None, typer.Option(
            "--tls-cert", metavar="PATH", help="Serve HTTPS with this PEM certificate.")
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option(
            "--tls-key", metavar="PATH", help="Private key of --tls-cert (PEM).")
    ] = None,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="Close connections silent this long (s).")
    ] = 60.0,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault", metavar="JSON",
            help='Inject a fault, as JSON: {"kind": "status", "count": 2}.'),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No request log on stderr.")
                     ] = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also log what the request log leaves out (connections "
        "that fail, TLS handshakes).")] = False,
) -> None:
    """Run the local drive store (a CloudSigma-compatible upload/download API)."""
    faults = _faults(fault or [])
    config = _config(
        root or default_root(), host, port, min_size, max_size, tls_cert, tls_key, idle_timeout
    )
    if quiet and verbose:
        raise UsageError("-q/--quiet and -v/--verbose contradict each other: pick one")
    if not quiet:
        level = logging.DEBUG if verbose else logging.INFO
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        server = StoreServer(make_context(config))
    except OSError as exc:
        raise ConfigError(f"cannot serve on {host}:{port} from {config.root}: {exc}") from exc
    for item in faults:
        server.context.faults.add(item)
    print(f"drivepipe serve: drives in {server.context.store.root}", file=sys.stderr, flush=True)
    print(server.base_url, flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()

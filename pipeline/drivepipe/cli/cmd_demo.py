"""``drivepipe demo``: the whole job against a local drive store, in one command.

Starts the local store on a free 127.0.0.1 port in a temporary directory,
makes a sample disk (sparse, some compressible data, some not) and writes it
as a compressed qcow2 with drivepipe's own writer (no qemu-img needed),
uploads the qcow2 in one step (decoded to raw while streaming, exact
Content-Length, checksum stored in the drive's meta), downloads the drive back
with verification into a sparse file, and prints what happened and how fast.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated

import typer

from drivepipe._errors import DrivepipeError, VerifyError
from drivepipe._sample import make_sample_raw, write_qcow2
from drivepipe._sizes import format_size, parse_size
from drivepipe.cli._app import app
from drivepipe.cli._common import ProgressOpt, QuietOpt, VerboseOpt, progress_mode
from drivepipe.server import serve_in_thread

DEMO_USER = "demo@drivepipe.invalid"


def say(text: str) -> None:
    typer.echo(text, err=True)


@contextlib.contextmanager
def demo_account(base_url: str, password: str) -> Iterator[None]:
    """Point the commands at the demo store for the duration, then restore the env."""
    saved = {k: os.environ.get(k) for k in
             ("DRIVEPIPE_ENDPOINT", "CLOUDSIGMA_USERNAME", "CLOUDSIGMA_PASSWORD",
              "CLOUDSIGMA_CONFIG")}
    os.environ.update(DRIVEPIPE_ENDPOINT=base_url, CLOUDSIGMA_USERNAME=DEMO_USER,
                      CLOUDSIGMA_PASSWORD=password, CLOUDSIGMA_CONFIG=os.devnull)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_step(args: list[str]) -> tuple[str, float]:
    """Run one drivepipe command in-process; returns its stdout and seconds."""
    # The package imports this module while it is being built: import at call time.
    from drivepipe.cli import main  # noqa: PLC0415

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(args)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise DrivepipeError(f"demo step 'drivepipe {args[0]}' failed (exit {code})")
    return out.getvalue().strip(), seconds


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s" if seconds > 0 else "-"


def make_images(work: str, size: int) -> tuple[str, str, int]:
    raw = os.path.join(work, "sample.raw")
    qcow = os.path.join(work, "sample.qcow2")
    data = make_sample_raw(raw, size, data_fraction=0.08)
    write_qcow2(raw, qcow, compress=True)
    return raw, qcow, data


@app.command()
def demo(
    size: Annotated[str, typer.Option(
        "--size", metavar="SIZE", help="Virtual size of the sample disk.")] = "1G",
    keep: Annotated[
        str | None,
        typer.Option(
            "--keep", metavar="DIR", help="Keep the store and the files in this directory.",
            show_default=False),
    ] = None,
    progress: ProgressOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Upload a sample qcow2 to a local drive store and download it back, verified."""
    progress = progress_mode(progress, quiet, verbose)
    nbytes = parse_size(size)
    with contextlib.ExitStack() as stack:
        work = keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="drivepipe-demo-"))
        os.makedirs(work, exist_ok=True)
        run_demo(work, nbytes, progress)


def run_demo(work: str, nbytes: int, progress: str) -> None:
    say(f"drivepipe demo in {work}")
    t0 = time.perf_counter()
    raw, qcow, data = make_images(work, nbytes)
    say(f"  made a {format_size(nbytes)} sample disk and wrote it as compressed qcow2 "
        f"({time.perf_counter() - t0:.2f}s)")
    say(f"  sample.raw: {format_size(nbytes)} virtual, {format_size(data)} written; "
        f"sample.qcow2: {format_size(os.path.getsize(qcow))} on disk")
    password = secrets.token_urlsafe(18)
    with serve_in_thread(os.path.join(work, "store"), username=DEMO_USER,
                         password=password) as server, demo_account(server.base_url, password):
        say(f"local drive store listening at {server.base_url}")
        uuid, up_s = run_step(["upload", qcow, "--name", "drivepipe-demo",
                               "--progress", progress])
        say(f"uploaded sample.qcow2 as raw in one step: drive {uuid} "
            f"({up_s:.2f}s, {rate(nbytes, up_s)} of raw image)")
        back = os.path.join(work, "downloaded.raw")
        _, down_s = run_step(["download", uuid, "-o", back, "--force", "--progress", progress])
        drive_size = os.path.getsize(back)
        allocated = os.stat(back).st_blocks * 512
        grown = " (the store grew it to its minimum size)" if drive_size > nbytes else ""
        say(f"downloaded and verified drive {uuid}: {format_size(drive_size)}{grown}, "
            f"{format_size(allocated)} allocated on disk ({down_s:.2f}s, "
            f"{rate(drive_size, down_s)})")
    digest_raw, _ = run_step(["checksum", raw, "--progress", "none"])
    digest_qcow, _ = run_step(["checksum", qcow, "--progress", "none"])
    first, _ = run_step(["checksum", back, "--progress", "none"])
    if digest_raw.split()[0] != digest_qcow.split()[0]:
        raise VerifyError("demo: the qcow2 does not decode to the raw sample")
    say(f"xxh3-128 of the raw sample and of the qcow2's content: {digest_raw.split()[0]}")
    if drive_size == nbytes and first.split()[0] != digest_raw.split()[0]:
        raise VerifyError("demo: the downloaded drive differs from the sample")
    say(f"xxh3-128 of the downloaded drive{' (with its zero tail)' if grown else ''}: "
        f"{first.split()[0]}")
    say("demo finished: upload, download and verification all succeeded")

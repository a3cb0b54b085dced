"""Helpers of the batch tests: images, plans, and an opener while the registry is ported.

``patch_registry()`` makes :mod:`drivepipe.jobs.transfer` open images through
the formats' path-based ``open`` when ``open_image`` cannot open a plain raw
file (the ByteSource port not merged yet); once it can, it does nothing, so the
tests then run the real registry.  ``main()`` is the ``drivepipe`` command with
that patch, for the tests that run the CLI in a subprocess.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

from drivepipe import OpenOptions, open_image
from drivepipe._registry import formats
from drivepipe.cli import console_main
from drivepipe.jobs import transfer


def registry_works() -> bool:
    with tempfile.NamedTemporaryFile(suffix=".raw") as f:
        f.write(b"\1" * 4096)
        f.flush()
        try:
            open_image(f.name, "auto", OpenOptions()).close()
        except Exception:
            return False
    return True


def legacy_open_image(path: str, fmt: str, options: Any) -> Any:
    found = formats()
    if fmt == "auto":
        with open(path, "rb") as f:
            head = f.read(4096)
        fmt = next(name for name, f in found.items() if f.detect(head))  # type: ignore[call-arg]
    return found[fmt].open(path, options)  # type: ignore[arg-type]


def patch_registry() -> None:
    if registry_works():
        return
    transfer.open_image = legacy_open_image  # type: ignore[assignment]


def main() -> None:
    patch_registry()
    console_main()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()


def make_raw(path: Any, size: int, seed: int) -> Any:
    """A sparse raw image of ``size`` bytes: random pieces with holes between them."""


    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 96 << 10):
            f.seek(offset)
            f.write(rng.randbytes(min(rng.randint(1, 40 << 10), size - offset)))
    return path

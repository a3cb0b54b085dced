"""Helpers of the batch tests."""

from __future__ import annotations

import random
from pathlib import Path


def make_raw(path: Path, size: int, seed: int) -> Path:
    """A sparse raw image of ``size`` bytes: random pieces with holes between them."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 96 << 10):
            f.seek(offset)
            f.write(rng.randbytes(min(rng.randint(1, 40 << 10), size - offset)))
    return path

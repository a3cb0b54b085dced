"""Shared fixtures: real sparse files with random layouts."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

MakeImage = Callable[..., Path]


def write_sparse(
    path: Path, size: int, extents: list[tuple[int, bytes]]
) -> Path:
    """Create ``path`` of ``size`` bytes (a hole) with ``data`` written at each offset."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in extents:
            f.seek(offset)
            f.write(data)
    return path


def random_layout(
    rng: random.Random, size: int, pieces: int, max_piece: int, zero_pieces: int = 0
) -> list[tuple[int, bytes]]:
    """Random data pieces (and some written-zero pieces) inside ``[0, size)``."""
    out: list[tuple[int, bytes]] = []
    for i in range(pieces + zero_pieces):
        n = rng.randint(1, max_piece)
        off = rng.randrange(0, max(1, size - n))
        data = bytes(n) if i >= pieces else rng.randbytes(n)
        out.append((off, data))
    return out


@pytest.fixture
def make_sparse(tmp_path: Path) -> MakeImage:
    """``make_sparse(size, seed=0, pieces=8, max_piece=1<<20, zero_pieces=0, name=...)``."""
    counter = iter(range(1_000_000))

    def make(
        size: int,
        *,
        seed: int = 0,
        pieces: int = 8,
        max_piece: int = 1 << 20,
        zero_pieces: int = 0,
        name: str | None = None,
    ) -> Path:
        rng = random.Random(seed)
        path = tmp_path / (name or f"image-{next(counter)}.raw")
        return write_sparse(path, size, random_layout(rng, size, pieces, max_piece, zero_pieces))

    return make


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for ``path``."""
    return os.stat(path).st_blocks * 512

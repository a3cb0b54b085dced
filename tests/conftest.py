"""Shared fixtures: real sparse files with random layouts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sparse_files import MakeImage, random_layout, write_sparse


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

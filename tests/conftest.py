"""Shared fixtures: real sparse files with random layouts; a local store the CLI finds."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sparse_files import MakeImage, random_layout, write_sparse
from store_servers import store_factory, use_account

from drivepipe.server import RunningServer


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


@pytest.fixture
def cli_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
              tmp_path: Path) -> Iterator[RunningServer]:
    """A local store (1 MiB minimum drive) whose account is in the environment, with a
    clean HOME: ``main(["upload", "--endpoint", cli_store.base_url, ...])`` just works."""
    factory = store_factory(tmp_path_factory, username="u@example.com", password="pw-123456",
                            min_size=1 << 20, idle_timeout=10.0)
    server = next(factory)()
    use_account(monkeypatch, tmp_path / "home", server)
    yield server
    next(factory, None)

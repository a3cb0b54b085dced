"""Real sparse files for tests: a layout of data pieces over holes.

Imported by name (``from sparse_files import ...``): pytest puts ``tests/`` on
``sys.path`` because ``tests/conftest.py`` lives there.  ``conftest`` itself
is not importable by name once other test folders have their own.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

#: the ``make_sparse`` fixture of tests/conftest.py
MakeImage = Callable[..., Path]


def write_sparse(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> Path:
    """``path`` of ``size`` bytes: holes, except each ``(offset, data)`` piece."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def random_layout(
    rng: random.Random, size: int, pieces: int, max_piece: int, zero_pieces: int = 0
) -> list[tuple[int, bytes]]:
    """Random data pieces, then written-zero pieces, inside ``[0, size)``."""
    out: list[tuple[int, bytes]] = []
    for i in range(pieces + zero_pieces):
        n = rng.randint(1, max_piece)
        off = rng.randrange(0, max(1, size - n))
        out.append((off, bytes(n) if i >= pieces else rng.randbytes(n)))
    return out


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for ``path``."""
    return os.stat(path).st_blocks * 512


def scattered_bytes(size: int, seed: int, *, pieces: int, max_piece: int, head: int = 0,
                    tail: int = 0) -> bytes:
    """``size`` bytes of zeros but for ``pieces`` random runs (shorter than ``max_piece``)
    and random first ``head`` and last ``tail`` bytes: a disk image's content in memory."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for _ in range(pieces):
        at = rng.randrange(0, size)
        n = min(size - at, rng.randrange(1, max_piece))
        buf[at : at + n] = rng.randbytes(n)
    if head:
        buf[:head] = rng.randbytes(head)
    if tail:
        buf[-tail:] = rng.randbytes(tail)
    return bytes(buf)

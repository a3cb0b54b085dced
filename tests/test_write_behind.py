"""Write-behind: SparseOutput and the store's chunks start writeback as they go, bytes intact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivepipe import _files
from drivepipe._files import SparseOutput
from drivepipe.server import _writeback
from drivepipe.server._writeback import WriteBehind

MiB = 1 << 20


def test_sparse_output_starts_writeback_every_window_out_of_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = _files.start_writeback
    monkeypatch.setattr(_files, "WRITE_BEHIND", 2 * MiB)
    monkeypatch.setattr(_files, "start_writeback", lambda fd: (calls.append(fd), real(fd)))
    path = tmp_path / "out.raw"
    out = SparseOutput(str(path), 16 * MiB)
    blocks = {i: bytes([i + 1]) * MiB for i in (7, 1, 5, 3, 0, 6)}  # 2, 4 stay holes
    for i, data in blocks.items():  # out of order, as a download's ranges arrive
        out.write_at(i * MiB, data)
    out.write_at(9 * MiB, bytes(MiB))  # zeros: skipped, not counted
    out.sync()
    out.close()
    assert calls and len(calls) == len(blocks) // 2
    data = path.read_bytes()
    assert len(data) == 16 * MiB
    for i in range(16):
        want = blocks.get(i, bytes(MiB))
        assert data[i * MiB : (i + 1) * MiB] == want
    assert os.stat(path).st_blocks * 512 <= len(blocks) * MiB + 64 * 1024


def test_chunk_write_behind_covers_windows_from_the_chunk_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges: list[tuple[int, int]] = []

    def fake(fd: int, offset: int, length: int, flags: int) -> int:
        ranges.append((offset, length))
        return 0

    monkeypatch.setattr(_writeback, "_sync_file_range", fake)
    wb = WriteBehind(0, 16 * MiB, start=64 * MiB, window=4 * MiB)
    pos = 64 * MiB
    for _ in range(10):  # 1 MiB writes
        pos += MiB
        wb.advance(pos)
    assert ranges == [(64 * MiB, 4 * MiB), (68 * MiB, 4 * MiB)]

"""O_DIRECT output (drivepipe._direct): the same bytes, holes kept, order kept, errors seen.

Every check writes a real file on the test machine's disk (and a small tmpfs for
a full disk) and reads it back with plain reads.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
from pathlib import Path

import pytest
from tmpfs import needs_root, small_tmpfs

from drivepipe import _direct
from drivepipe._errors import DiskFull
from drivepipe._extent import Extent
from drivepipe._files import SparseOutput
from drivepipe.cli import main

MiB = 1 << 20


def direct_output(path: Path, size: int, *, buffer_size: int = _direct.BUFFER_SIZE,
                  buffers: int = _direct.BUFFERS) -> SparseOutput:
    out = SparseOutput(str(path), size, direct=True)
    if out._direct is None:
        pytest.skip("this file system refuses O_DIRECT")
    if buffer_size != _direct.BUFFER_SIZE or buffers != _direct.BUFFERS:
        direct_fd = _direct.open_direct(out.fd)
        assert direct_fd is not None
        out._direct.close()
        out._direct = _direct.DirectWrites(out.fd, direct_fd, buffer_size=buffer_size,
                                           buffers=buffers, flush_behind=64 << 10)
    return out


def random_writes(rng: random.Random, size: int, count: int) -> list[tuple[int, bytes]]:
    """Writes at aligned and unaligned offsets, of every length, overlapping each other."""
    writes = []
    for _ in range(count):
        offset = rng.randrange(size - 1)
        if rng.random() < 0.5:
            offset -= offset % 4096
        length = rng.randrange(1, min(size - offset, 3 * MiB) + 1)
        if rng.random() < 0.3:
            length = min(length, 5000)
        writes.append((offset, rng.randbytes(length)))
    return writes


@pytest.mark.parametrize("buffer_size", [_direct.BUFFER_SIZE, 8192])
def test_overlapping_writes_land_in_order(tmp_path: Path, buffer_size: int) -> None:
    size = 24 * MiB
    model = bytearray(size)
    out = direct_output(tmp_path / "out.raw", size, buffer_size=buffer_size, buffers=2)
    for i, (offset, data) in enumerate(random_writes(random.Random(buffer_size), size, 200)):
        model[offset : offset + len(data)] = data
        # bytes, a bytearray and a memoryview of a read-only mapping all go through
        buf: bytes | bytearray | memoryview = data if i % 3 == 0 else bytearray(data)
        if i % 3 == 2:
            mapped = mmap.mmap(-1, len(data))
            mapped.write(data)
            buf = memoryview(mapped)
        out.write_dense(offset, buf)
    out.sync()
    direct = out.direct_bytes
    out.close()
    assert (tmp_path / "out.raw").read_bytes() == model
    assert direct > size  # most of it went around the page cache


def test_holes_stay_holes(tmp_path: Path) -> None:
    size = 64 * MiB
    path = tmp_path / "out.raw"
    out = direct_output(path, size)
    rng = random.Random(3)
    data_at = [1 * MiB, 9 * MiB + 4096, 40 * MiB]
    chunks = {offset: rng.randbytes(2 * MiB) for offset in data_at}
    for offset in sorted(chunks):
        out.write_extent(Extent(offset, 2 * MiB, chunks[offset]))
        # zeros written as data stay holes too
        out.write_extent(Extent(offset + 2 * MiB, MiB, bytes(MiB)))
    out.sync()
    out.close()
    assert path.stat().st_blocks * 512 <= 3 * 2 * MiB + 3 * 8192
    content = path.read_bytes()
    for offset, chunk in chunks.items():
        assert content[offset : offset + len(chunk)] == chunk
    assert content.count(0) == size - 3 * 2 * MiB + sum(c.count(0) for c in chunks.values())


def test_landed_counts_only_bytes_in_the_file(tmp_path: Path) -> None:
    out = direct_output(tmp_path / "out.raw", 32 * MiB)
    out.write_dense(0, random.Random(4).randbytes(3 * MiB))  # staged: 16 MiB not full
    assert out.taken == 3 * MiB
    assert out.landed == 0
    out.flush()
    assert out.landed == 3 * MiB
    out.write_dense(3 * MiB, random.Random(5).randbytes(MiB + 100))
    assert out.landed == 3 * MiB
    out.push()  # a slow stream's staged run goes to the file without a wait for it
    assert out._direct is not None
    out._direct._work.join()
    assert out.landed == out.taken == 4 * MiB + 100
    out.close()


@pytest.mark.parametrize("offset", [0, 100])
def test_a_write_partly_staged_has_not_landed(tmp_path: Path, offset: int) -> None:
    """A write split over a staging buffer and the next (or a buffered head and a
    buffer) lands when its last part does: the journal must never count a block
    whose tail is still in memory."""
    path = tmp_path / "out.raw"
    out = direct_output(path, 64 << 10, buffer_size=8192, buffers=2)
    data = random.Random(offset).randbytes(12_000)
    out.write_dense(offset, data)  # 8 KiB (or a head) handed over, the rest staged
    assert out._direct is not None
    out._direct._work.join()  # what was handed over is in the file
    landed = out.landed
    content = path.read_bytes()
    assert landed < out.taken, "the staged part is not in the file yet"
    assert content[offset : offset + landed] == data[:landed]
    out.flush()
    assert out.landed == out.taken == len(data)
    out.close()
    assert path.read_bytes()[offset : offset + len(data)] == data


def test_an_extent_with_a_hole_inside_lands_piece_by_piece(tmp_path: Path) -> None:
    """Sparse writing splits an extent at its zero blocks: its first piece in the file
    says nothing of a later piece still staged."""
    path = tmp_path / "out.raw"
    out = direct_output(path, 64 << 10, buffer_size=8192, buffers=2)
    rng = random.Random(8)
    data = rng.randbytes(4096) + bytes(4096) + rng.randbytes(12288)
    out.write_extent(Extent(0, len(data), data))
    assert out._direct is not None
    out._direct._work.join()
    landed = out.landed
    assert 0 < landed < out.taken
    assert path.read_bytes()[:landed] == data[:landed]
    out.flush()
    assert out.landed == len(data)
    out.close()
    assert path.read_bytes()[: len(data)] == data


def test_close_writes_what_is_staged(tmp_path: Path) -> None:
    path = tmp_path / "out.raw"
    data = random.Random(5).randbytes(5 * MiB + 123)
    out = direct_output(path, 8 * MiB)
    out.write_dense(4096, data)
    out.close()  # an aborted output keeps what it was given
    assert path.read_bytes()[4096 : 4096 + len(data)] == data


@needs_root
def test_a_full_disk_is_seen_and_what_fit_is_counted(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "5m") as small:
        out = direct_output(small / "out.raw", 12 * MiB)
        pieces = [random.Random(i).randbytes(MiB) for i in range(12)]
        with pytest.raises(DiskFull, match="no space left on device"):
            for i, piece in enumerate(pieces):
                out.write_dense(i * MiB, piece)
            out.flush()
        landed = out.landed
        out.close()
        assert 3 * MiB <= landed <= 5 * MiB
        content = (small / "out.raw").read_bytes()
        assert content[:landed] == b"".join(pieces)[:landed]


def test_a_refused_direct_write_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that takes O_DIRECT at open and then refuses the writes (EINVAL):
    everything goes through the page cache instead, nothing is lost."""
    out = direct_output(tmp_path / "out.raw", 40 * MiB)
    direct = out._direct
    assert direct is not None
    refused = direct.direct_fd
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd == refused:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    rng = random.Random(6)
    model = bytearray(40 * MiB)
    # the refusal comes in the writer thread while later writes (overlapping the
    # earlier ones) are being staged: they must still land in the order made
    for offset, data in [(0, rng.randbytes(35 * MiB)), *random_writes(rng, 40 * MiB, 60)]:
        model[offset : offset + len(data)] = data
        out.write_dense(offset, data)
    out.sync()
    assert out.direct_bytes == 0
    out.close()
    assert (tmp_path / "out.raw").read_bytes() == model


def test_convert_says_what_went_around_the_page_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.raw"
    data = random.Random(7).randbytes(6 * MiB)
    src.write_bytes(data)

    def written_directly(*flags: str) -> int:
        out = tmp_path / "out.raw"
        out.unlink(missing_ok=True)
        assert main(["convert", "--progress", "json", *flags, str(src), str(out)]) == 0
        assert out.read_bytes() == data
        summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        return int({s["name"]: s for s in summary["stages"]}["write"].get("direct", 0))

    direct_output(tmp_path / "probe", 0).close()  # skips where O_DIRECT is refused
    assert written_directly("--direct") == 6 * MiB
    assert written_directly() == 0  # convert's default: through the page cache

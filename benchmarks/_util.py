"""Shared helpers for the benchmark scripts in this directory.

What goes in: command lines to time, sizes of test images to make.  What comes
out: best-of-N wall times with the peak RSS of the timed child, test images
made quickly (sparse with random data extents, or dense random data), and
markdown tables.  Nothing here asserts anything about speed: the scripts print
numbers for a human (or a report) to read.

Typical use::

    from _util import make_sparse_image, time_command, markdown_table

    img = make_sparse_image(Path("/var/tmp/s.raw"), 8 << 30, data_fraction=0.1)
    t = time_command(["xxh128sum", str(img)], repeat=3)
    print(t.best, t.peak_rss)

Run the scripts from the repository root (``python benchmarks/bench_local.py``);
they import this module as a sibling.
"""

from __future__ import annotations

import functools
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30

# The drivepipe a user runs was byte-compiled when pip installed it.  A session
# that sets PYTHONDONTWRITEBYTECODE makes every timed run compile all of
# drivepipe's modules again (measured: ~0.1 s of each run); cache the bytecode
# outside the source tree instead, as an installed package has it.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
    os.environ.setdefault("PYTHONPYCACHEPREFIX",
                          os.path.join(tempfile.gettempdir(), "drivepipe-bench-pycache"))

#: random data is cut from a pool this big: making multi-GiB images then costs
#: disk bandwidth, not random-number generation.  Repetition does not matter to
#: hashing or copying (nothing here deduplicates).
_POOL_SIZE = 64 * MiB
_WRITE_CHUNK = 8 * MiB


@dataclass
class Timing:
    """Wall seconds of each run of one command, and the peak RSS seen."""

    label: str
    seconds: list[float] = field(default_factory=list)
    #: highest resident set size of the timed process (bytes), over all runs
    peak_rss: int = 0
    #: user+system CPU seconds of each run: steadier than wall time on a shared machine
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def best_cpu(self) -> float:
        return min(self.cpu_seconds) if self.cpu_seconds else float("nan")


_TIME = "/usr/bin/time"
_MARK = "drivepipe-bench-usage="


@dataclass
class Usage:
    """One run: wall seconds, user+system CPU seconds, peak RSS bytes (0: unknown)."""

    wall: float
    cpu: float
    peak_rss: int


def run_measured(argv: Sequence[str], *, stdout: int | None = subprocess.DEVNULL) -> Usage:
    """Run ``argv`` once and measure it; raise if it fails.

    The peak RSS is measured by GNU ``/usr/bin/time`` around the command: Linux
    lets a forked child inherit its parent's RSS high-water mark, so ``wait4``
    or ``RUSAGE_CHILDREN`` from this (large) Python process would report our own
    size instead of the command's.  Without /usr/bin/time the RSS is 0 (unknown).
    """
    wrapped = list(argv)
    if os.access(_TIME, os.X_OK):
        wrapped = [_TIME, "-f", _MARK + "%M %U %S", *wrapped]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(wrapped, stdout=stdout, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = Usage(
        elapsed,
        after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
        0,
    )
    for line in err.splitlines():
        if line.startswith(_MARK):
            rss_kib, user, system = line[len(_MARK) :].split()
            usage.peak_rss = int(rss_kib) * 1024
            usage.cpu = float(user) + float(system)
    return usage


def time_command(
    argv: Sequence[str],
    *,
    repeat: int = 3,
    label: str | None = None,
    before: Callable[[], None] | None = None,
) -> Timing:
    """Time ``argv`` ``repeat`` times (best-of-N); ``before`` runs untimed before each."""
    timing = Timing(label or " ".join(argv))
    for _ in range(repeat):
        if before is not None:
            before()
        usage = run_measured(argv)
        timing.seconds.append(usage.wall)
        timing.cpu_seconds.append(usage.cpu)
        timing.peak_rss = max(timing.peak_rss, usage.peak_rss)
    return timing


def capture(argv: Sequence[str]) -> str:
    """Stdout of ``argv`` (which must succeed), for checking results agree."""
    return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout


def random_pool(seed: int = 0, size: int = _POOL_SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _write_random(fd: int, offset: int, length: int, pool: bytes, rng: random.Random) -> None:
    """Write ``length`` random-looking, never-all-zero bytes at ``offset``."""
    view = memoryview(pool)
    while length > 0:
        n = min(length, _WRITE_CHUNK)
        start = rng.randrange(0, len(pool) - n + 1)
        written = os.pwrite(fd, view[start : start + n], offset)
        offset += written
        length -= written


def make_sparse_image(
    path: Path,
    size: int,
    *,
    data_fraction: float = 0.1,
    extent_size: int = 4 * MiB,
    seed: int = 0,
    align: int = 4096,
) -> Path:
    """A ``size``-byte sparse file with about ``data_fraction`` of it in random data extents.

    Extents are ``extent_size`` bytes at most, placed at random ``align``-ed
    offsets (some may overlap, so the data is at most the requested fraction).
    """
    rng = random.Random(seed)
    pool = random_pool(seed)
    count = max(1, int(size * data_fraction) // extent_size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for _ in range(count):
            length = min(extent_size, size)
            offset = rng.randrange(0, (size - length) // align + 1) * align
            _write_random(fd, offset, length, pool, rng)
    finally:
        os.close(fd)
    return path


def make_dense_image(path: Path, size: int, *, seed: int = 1) -> Path:
    """A ``size``-byte file of random data with no holes and no zero blocks."""
    rng = random.Random(seed)
    pool = random_pool(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_random(fd, 0, size, pool, rng)
    finally:
        os.close(fd)
    return path


def warm_cache(path: Path) -> None:
    """Read ``path``'s data once so every timed run starts from a warm page cache."""
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for ``path`` (``st_blocks * 512``)."""
    return os.stat(path).st_blocks * 512


def remove(path: Path) -> None:
    """Delete a file if present (benchmarks call it untimed between runs)."""
    path.unlink(missing_ok=True)


def settle() -> None:
    """Flush every dirty page now (untimed), so no run pays for an earlier one's writeback."""
    os.sync()


def tool(name: str) -> str:
    """Absolute path of a required command, or exit with a clear message."""
    found = shutil.which(name)
    if found is None:
        sys.exit(f"benchmark needs {name!r} on PATH")
    return found


def drivepipe_command() -> str:
    """The ``drivepipe`` script beside this Python (the venv's), else the one on PATH.

    Its modules are byte-compiled first, as ``pip install`` leaves them: an editable
    install under ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module
    at every start (measured: 0.15 s of a 0.4 s checksum start), which is not what an
    installed drivepipe pays.
    """
    _byte_compile_drivepipe()
    beside = Path(sys.executable).with_name("drivepipe")
    return str(beside) if beside.exists() else tool("drivepipe")


@functools.cache
def _byte_compile_drivepipe() -> None:
    import compileall  # noqa: PLC0415 - once per run
    import importlib.util  # noqa: PLC0415

    for name in ("drivepipe", "drivepipe_plugins"):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, quiet=1)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``8G``/``512M``/``4096`` -> bytes (binary units), for command-line options."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_ratio(ours: float, theirs: float) -> str:
    """``ours/theirs`` as e.g. ``0.42x`` (below 1: we are faster)."""
    if theirs <= 0:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


@dataclass
class Pair:
    """One comparison measured as alternating runs: reference, drivepipe, reference, ..."""

    label: str
    reference: Timing
    ours: Timing

    @property
    def ratios(self) -> list[float]:
        return [o / r for o, r in zip(self.ours.seconds, self.reference.seconds, strict=True)]

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios: on a shared machine a pair shares its noise."""
        return median(self.ratios)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def alternate(
    label: str,
    reference: Sequence[str],
    ours: Sequence[str],
    *,
    pairs: int = 3,
    before: Callable[[], None] | None = None,
    after_ours: Callable[[], None] | None = None,
) -> Pair:
    """Run ``reference`` then ``ours``, ``pairs`` times over; ``before`` runs untimed
    before every run, ``after_ours`` (a check of drivepipe's output) after each of ours."""
    pair = Pair(label, Timing(" ".join(reference)), Timing(" ".join(ours)))
    for _ in range(pairs):
        for timing, argv in ((pair.reference, reference), (pair.ours, ours)):
            if before is not None:
                before()
            usage = run_measured(argv)
            timing.seconds.append(usage.wall)
            timing.cpu_seconds.append(usage.cpu)
            timing.peak_rss = max(timing.peak_rss, usage.peak_rss)
            if timing is pair.ours and after_ours is not None:
                after_ours()
    return pair

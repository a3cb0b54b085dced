"""Human sizes: ``8M``, ``1G``, ``512k``, ``4096`` (binary units), and back."""

from __future__ import annotations

import re

from drivepipe._errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse ``8M`` / ``1.5G`` / ``4096`` / ``64KiB`` into bytes (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 4096, 512K, 8M, 1G)")
    number, unit = m.groups()
    value = float(number) * _UNITS[unit.lower()]
    if value != int(value):
        raise UsageError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_rate(bps: float) -> str:
    """``1.2e9`` -> ``1.2 GB/s`` (decimal units, like curl and network links)."""
    for unit, scale in (("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6)):
        if bps >= scale or (unit == "MB/s" and bps >= 1e5):
            value = bps / scale
            if unit == "TB/s" and value >= 1000:
                return ">999 TB/s"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{bps / 1e3:.1f} kB/s"

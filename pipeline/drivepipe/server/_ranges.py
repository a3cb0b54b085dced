"""Byte ranges of a download: the ``Range`` header in, spans of data and holes out.

:func:`parse_range` understands one ``bytes=`` range (``a-b``, ``a-``, ``-n``).
A header it cannot parse, or one asking for several ranges, is ignored and the
whole body is served with 200 (RFC 9110 lets a server ignore Range; this keeps
clients simple).  A range starting at or past the end is unsatisfiable
(:class:`Unsatisfiable`, answered 416 with ``Content-Range: bytes */size``).

:func:`segments` splits ``[start, end)`` of a file into data and hole spans with
``SEEK_DATA``/``SEEK_HOLE``, so holes are served from the zero buffer without
reading the disk; on filesystems without hole support everything is data.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from typing import Final

_RANGE_RE: Final = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class Unsatisfiable(Exception):
    """The range lies outside the body."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single satisfiable range, or None for all."""
    if not header:
        return None
    m = _RANGE_RE.match(header)
    if not m:
        return None  # several ranges or not bytes: serve the whole body
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = size if not last else int(last) + 1
    if last and end <= start:
        return None  # a-b with b < a is invalid syntax: ignore the header
    if start >= size:
        raise Unsatisfiable
    return start, min(end, size)


def segments(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` spans covering ``[start, end)`` of ``fd``."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no hole support: all data
                yield pos, end - pos, True
                return
            data = end  # only a hole up to the end of the file
        data = min(data, end)
        if data > pos:
            yield pos, data - pos, False
            pos = data
            if pos >= end:
                return
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole - pos, True
        pos = hole

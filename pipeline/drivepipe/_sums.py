"""Checksum lists in ``xxh128sum``'s format: one ``HASH  NAME`` line per file.

In: the text of a list ``xxh128sum`` (or ``drivepipe checksum``) wrote.  Out:
:class:`SumLine` (digest, name) per line, in order; blank lines are skipped.
Understood: the GNU form ``HASH  NAME`` (``HASH *NAME`` in binary mode, same
thing here) and the BSD form ``XXH128 (NAME) = HASH``.  A line of neither form
comes out as None, so the caller can count it as improperly formatted, the way
``xxh128sum -c`` warns about it.  Names are used as written (relative names are
relative to the current directory, like ``xxh128sum -c``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_GNU = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")
_BSD = re.compile(r"^XXH128 \((.+)\) = ([0-9a-fA-F]{32})$")


@dataclass(frozen=True)
class SumLine:
    digest: str
    name: str


def format_line(digest: str, name: str) -> str:
    """The line ``xxh128sum`` prints for ``name``."""
    return f"{digest}  {name}"


def parse_line(line: str) -> SumLine | None:
    text = line.rstrip("\r\n")
    gnu = _GNU.match(text)
    if gnu:
        return SumLine(gnu.group(1).lower(), gnu.group(2))
    bsd = _BSD.match(text)
    if bsd:
        return SumLine(bsd.group(2).lower(), bsd.group(1))
    return None


def parse_lines(lines: Iterable[str]) -> Iterator[SumLine | None]:
    """One entry per non-blank line: its :class:`SumLine`, or None if malformed."""
    for line in lines:
        if line.strip():
            yield parse_line(line)

"""Fault injection for reliability tests: off until a fault is added.

A :class:`Fault` says what goes wrong, for which requests (``match``: a
substring of the request path and query; ``method``: one HTTP method or any),
and how many times (``count``; 0 means every matching request until cleared):

- ``status``: answer ``status`` (503 by default) instead of handling the request,
  with ``Retry-After: retry_after`` when that is set;
- ``delay``: sleep ``seconds`` before handling it;
- ``drop_upload``: read ``after`` bytes of the request body, then reset the
  connection (an upload that breaks mid-way);
- ``drop_download``: send ``after`` bytes of the response body, then reset;
- ``cut_download``: send ``after`` bytes of the response body, then close
  cleanly (a response shorter than its Content-Length).

Faults come from the Python API (:meth:`Faults.add` and the helpers), the
authenticated admin endpoint ``/api/2.0/_faults/`` (``POST`` a JSON object or
list of objects with these fields, ``GET`` lists them, ``DELETE`` clears) or
``drivepipe serve --fault JSON``.  Refused: unknown kinds or fields.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Final

KINDS: Final = frozenset({"status", "delay", "drop_upload", "drop_download", "cut_download"})


@dataclass(slots=True)
class Fault:
    """One injected failure; see the module docstring for the fields."""

    kind: str
    count: int = 1
    match: str = ""
    method: str = ""
    status: int = 503
    after: int = 0
    seconds: float = 0.0
    #: a ``status`` fault's Retry-After header (seconds); None: no header
    retry_after: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (one of {sorted(KINDS)})")
        if self.count < 0 or self.after < 0 or self.seconds < 0 or (self.retry_after or 0) < 0:
            raise ValueError("fault count, after and seconds must not be negative")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status {self.status} is not an HTTP status")
        self.method = self.method.upper()

    @classmethod
    def from_json(cls, obj: Any) -> Fault:
        if not isinstance(obj, dict):
            raise ValueError("a fault is a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc

    def applies(self, kind: str, method: str, target: str) -> bool:
        return (
            self.kind == kind
            and (not self.method or self.method == method)
            and self.match in target
        )


class Faults:
    """The thread-safe set of active faults of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault | None = None, /, **fields: Any) -> Fault:
        """Add ``fault`` or ``Fault(**fields)``; returns it."""
        item = fault if fault is not None else Fault(**fields)
        with self._lock:
            self._faults.append(item)
        return item

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dataclasses.asdict(f) for f in self._faults]

    def take(self, kind: str, method: str, target: str) -> Fault | None:
        """The first fault of ``kind`` matching the request, counted as used."""
        with self._lock:
            for i, fault in enumerate(self._faults):
                if not fault.applies(kind, method, target):
                    continue
                if fault.count == 1:
                    del self._faults[i]
                elif fault.count > 1:
                    fault.count -= 1
                return dataclasses.replace(fault)
        return None

    # Shorthands for tests.
    def fail_next(
        self, count: int = 1, status: int = 503, match: str = "", method: str = "",
        retry_after: int | None = None,
    ) -> Fault:
        return self.add(kind="status", count=count, status=status, match=match, method=method,
                        retry_after=retry_after)

    def delay(self, seconds: float, count: int = 1, match: str = "", method: str = "") -> Fault:
        return self.add(kind="delay", seconds=seconds, count=count, match=match, method=method)

    def drop_upload_after(self, nbytes: int, count: int = 1, match: str = "") -> Fault:
        return self.add(kind="drop_upload", after=nbytes, count=count, match=match)

    def drop_download_after(self, nbytes: int, count: int = 1, match: str = "") -> Fault:
        return self.add(kind="drop_download", after=nbytes, count=count, match=match)

    def cut_download_after(self, nbytes: int, count: int = 1, match: str = "") -> Fault:
        return self.add(kind="cut_download", after=nbytes, count=count, match=match)

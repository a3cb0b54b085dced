"""The state file of a batch: what finished, what failed, what was running.

One JSON object, ``{"version": 1, "items": {KEY: RECORD}}``, rewritten
atomically (temporary file, fsync, rename) each time an item changes, so a
batch killed at any point leaves the last complete state.  Only the process
that runs the batch writes it (on Dask: the submitting process, from the
results coming back), through one lock.

A record: ``status`` (``running``, ``done``, ``failed``), ``op``, ``source``,
``target``, and for ``done`` the result (``uuid`` of the drive or ``output``
path, ``xxh128``, ``size``, ``source_size``/``source_mtime_ns`` of the image
or ``mtime_ns`` of the output file), for ``failed`` the ``error`` line, and
``attempts`` and ``finished_at`` for both.
"""

from __future__ import annotations

import json
import os
import threading
from types import TracebackType
from typing import Any, Final

from drivepipe._errors import OutputError, UsageError
from drivepipe._locks import lock_exclusive
from drivepipe.resume.atomic import replace_file

VERSION: Final = 1
STATE_SUFFIX: Final = ".state.json"


def default_state_path(plan_path: str | None) -> str:
    if not plan_path:
        raise UsageError("a plan that is not read from a file needs a state file path")
    return plan_path + STATE_SUFFIX


class StateFile:
    """Records per item key; :meth:`update` persists at once.

    Used as a context manager it holds an exclusive ``flock`` on ``STATE.lock``:
    a second batch on the same state is refused at once (the kernel drops the
    lock of a killed batch).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = -1
        self.records: dict[str, dict[str, Any]] = self._load()

    def __enter__(self) -> StateFile:
        self._fd = lock_exclusive(self.path + ".lock", UsageError(
            f"another drivepipe batch is running with {self.path}; wait for it, or give "
            "another state file"))
        self.records = self._load()  # what the batch before this one left
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.path}: cannot read the batch state ({exc}); move it "
                             "away to start the batch from scratch") from exc
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, dict) or data.get("version") != VERSION:
            raise UsageError(f"{self.path}: not a drivepipe batch state file (version "
                             f"{VERSION}); move it away to start from scratch")
        return {k: v for k, v in items.items() if isinstance(v, dict)}

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            record = self.records.get(key)
            return dict(record) if record is not None else None

    def update(self, key: str, record: dict[str, Any]) -> None:
        with self._lock:
            self.records[key] = record
            self._save()

    def _save(self) -> None:
        text = json.dumps({"version": VERSION, "items": self.records}, indent=1,
                          sort_keys=True)
        try:
            replace_file(self.path, text, prefix=".state-")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the batch state: "
                              f"{exc.strerror or exc}") from exc

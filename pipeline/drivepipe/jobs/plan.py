"""The batch plan: a JSON-lines file, one transfer per line.

In: text with one JSON object per line (blank lines and lines starting with
``#`` are skipped)::

    {"op": "upload", "image": "vm1.qcow2", "name": "vm1", "meta": {"team": "a"}}
    {"op": "upload", "image": "vm2.raw.xz", "chunked": true, "key": "vm2"}
    {"op": "download", "drive": "UUID", "output": "backup/vm3.raw"}

Upload fields: ``image`` (required; relative paths are taken from the plan's
directory), ``name`` (default: the image's file name), ``meta`` (string values
merged into the drive's meta), ``chunked`` (resumable chunked upload),
``format`` (default ``auto``).  Download fields: ``drive`` (a UUID) or ``url``
(http(s); the account is only sent to the endpoint's own hosts), ``output`` (a
file path, required), ``force`` (replace an existing file).  Any item:
``key`` (a stable name; default a hash of op, source and target),
``resources`` (Dask worker resources, e.g. ``{"host-a": 1}``) and ``workers``
(Dask worker addresses or names) to place the item on the machine that holds
its data.

Out: a :class:`Plan` of :class:`Item` with unique keys.  Refused, as a
:class:`PlanError` naming the line: bad JSON, unknown ops or fields, missing or
mistyped fields, two items with the same key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import xxhash

from drivepipe._errors import UsageError
from drivepipe.cloudsigma.drives import default_drive_name
from drivepipe.transport.curl import UUID_RE

OPS: Final = ("upload", "download")
_COMMON: Final = frozenset({"op", "key", "resources", "workers"})
_FIELDS: Final = {
    "upload": _COMMON | {"image", "name", "meta", "chunked", "format"},
    "download": _COMMON | {"drive", "url", "output", "force"},
}
#: keys end up in file names (journals) and Dask task keys: keep them plain
KEY_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PlanError(UsageError):
    """The plan file cannot be read or holds a bad item."""


@dataclass(frozen=True)
class Item:
    """One transfer of a batch; ``source``/``target`` are what the key is made of."""

    key: str
    op: str
    #: upload: the image path (absolute); download: the drive UUID
    source: str
    #: upload: the drive's name; download: the output path (absolute)
    target: str
    meta: Mapping[str, str] = field(default_factory=dict)
    chunked: bool = False
    format: str = "auto"
    force: bool = False
    resources: Mapping[str, float] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    line: int = 0

    @property
    def label(self) -> str:
        """``upload vm1.qcow2 -> vm1`` for tables and error lines."""
        return f"{self.op} {self.source} -> {self.target}"


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    #: the plan file, when read from one (the state file goes beside it)
    path: str | None = None

    def __len__(self) -> int:
        return len(self.items)


def item_key(op: str, source: str, target: str) -> str:
    """The default key: stable across reruns of the same plan, short, file-name safe."""
    digest = xxhash.xxh3_64_hexdigest(f"{op}\0{source}\0{target}".encode())
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(source or target))[:40]
    return f"{op}-{stem.strip('._-') or 'item'}-{digest}"


def load_plan(path: str) -> Plan:
    """Read a plan file; relative image and output paths are taken from its directory."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the plan: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise PlanError(f"{path}: the plan is not UTF-8 text") from exc
    base = os.path.dirname(os.path.abspath(path))
    return Plan(parse_plan(text.splitlines(), base=base, where=path), os.path.abspath(path))


def parse_plan(
    lines: Iterable[str | Mapping[str, Any]], *, base: str | None = None, where: str = "plan"
) -> tuple[Item, ...]:
    """Items from JSON lines (or already parsed objects, as the Python API takes them)."""
    base = base or os.getcwd()
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(lines, 1):
        if isinstance(entry, str):
            text = entry.strip()
            if not text or text.startswith("#"):
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise PlanError(f"{where} line {number}: not JSON ({exc.msg})") from exc
        else:
            obj = entry
        item = parse_item(obj, base, f"{where} line {number}", number)
        if item.key in seen:
            raise PlanError(f"{where} line {number}: key {item.key!r} is already used on "
                            f"line {seen[item.key]}")
        seen[item.key] = number
        items.append(item)
    return tuple(items)


def parse_item(obj: Any, base: str, where: str, line: int = 0) -> Item:
    if not isinstance(obj, Mapping):
        raise PlanError(f"{where}: an item is a JSON object")
    op = obj.get("op")
    if op not in OPS:
        raise PlanError(f"{where}: op must be one of {', '.join(OPS)}, got {op!r}")
    unknown = sorted(set(obj) - _FIELDS[op])
    if unknown:
        raise PlanError(f"{where}: unknown field(s) for {op}: {', '.join(unknown)}")
    common = _placement(obj, where)
    if op == "upload":
        image = os.path.join(base, _text(obj, "image", where))
        name = _text(obj, "name", where, default_drive_name(image))
        source, target = os.path.abspath(image), name
        extra: dict[str, Any] = {
            "meta": _meta(obj.get("meta", {}), where),
            "chunked": _flag(obj, "chunked", where),
            "format": _text(obj, "format", where, "auto"),
        }
    else:
        source = _download_source(obj, where)
        target = os.path.abspath(os.path.join(base, _text(obj, "output", where)))
        extra = {"force": _flag(obj, "force", where)}
    key = obj.get("key")
    if key is None:
        key = item_key(op, source, target)
    elif not isinstance(key, str) or not KEY_RE.match(key):
        raise PlanError(f"{where}: key must be 1-128 letters, digits, '.', '_' or '-' "
                        f"(starting with a letter or digit), got {key!r}")
    return Item(key=key, op=op, source=source, target=target, line=line, **common, **extra)


def _download_source(obj: Mapping[str, Any], where: str) -> str:
    """A drive UUID (lower case) or an http(s) URL without credentials in it."""
    if ("drive" in obj) == ("url" in obj):
        raise PlanError(f"{where}: download needs either 'drive' (a UUID) or 'url'")
    if "drive" in obj:
        drive = _text(obj, "drive", where).lower()
        if not UUID_RE.match(drive):
            raise PlanError(f"{where}: drive must be a drive UUID, got {drive!r}")
        return drive
    url = _text(obj, "url", where)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PlanError(f"{where}: url must be an http(s) URL")
    if "@" in parts.netloc:
        # it would end up in the state file, the report and error lines
        raise PlanError(f"{where}: the url must not hold a user or password; the account "
                        "comes from the environment or the config file")
    return url


def _text(obj: Mapping[str, Any], name: str, where: str, default: str | None = None) -> str:
    value = obj.get(name, default)
    if value is None:
        raise PlanError(f"{where}: {obj['op']} needs {name!r}")
    if not isinstance(value, str) or not value:
        raise PlanError(f"{where}: {name} must be a non-empty string")
    return value


def _flag(obj: Mapping[str, Any], name: str, where: str) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise PlanError(f"{where}: {name} must be true or false")
    return value


def _meta(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PlanError(f"{where}: meta must be an object of string values")
    reserved = sorted(k for k in value if k.startswith("drivepipe_"))
    if reserved:
        raise PlanError(f"{where}: meta keys starting with drivepipe_ are drivepipe's own: "
                        f"{', '.join(reserved)}")
    return dict(value)


def _placement(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    resources = obj.get("resources", {})
    if not isinstance(resources, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and v > 0 for k, v in resources.items()):
        raise PlanError(f"{where}: resources must be an object of positive numbers, "
                        "e.g. {\"host-a\": 1}")
    workers = obj.get("workers", [])
    if isinstance(workers, str):
        workers = [workers]
    if not isinstance(workers, list) or not all(isinstance(w, str) and w for w in workers):
        raise PlanError(f"{where}: workers must be a worker address or name, or a list of them")
    return {"resources": dict(resources), "workers": tuple(workers)}

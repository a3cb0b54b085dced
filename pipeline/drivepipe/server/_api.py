"""The JSON resources: drives, capabilities, locations, initupload, actions, faults.

Request bodies and answers follow ``cloudsigma-api.md``: lists carry
``{"meta": {"limit", "offset", "total_count"}, "objects": [...]}`` (``limit``
defaults to 20, ``limit=0`` means all); ``PUT /drives/{uuid}/`` needs
``name``, ``size`` and ``media`` and replaces ``meta`` whole.  Refused with 400:
missing or mistyped fields, meta keys over 32 characters or non-string
values, unknown media or actions, sizes outside the capabilities.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Final

from drivepipe.server._errors import ApiError, validation
from drivepipe.server._faults import Fault
from drivepipe.server._http import HandlerBase
from drivepipe.server._store import DOWNLOADABLE, MEDIA, DriveRecord

DEFAULT_LIMIT: Final = 20
META_KEY_MAX: Final = 32
STORAGE_TYPE: Final = "dssd"


def owner_ref(username: str) -> dict[str, str]:
    owner = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"drivepipe:{username}"))
    return {"uuid": owner, "resource_uri": f"/api/2.0/user/{owner}/"}


def drive_ref(rec: DriveRecord, owner: dict[str, str]) -> dict[str, Any]:
    return {"uuid": rec.uuid, "resource_uri": f"/api/2.0/drives/{rec.uuid}/", "owner": owner}


def drive_json(rec: DriveRecord, owner: dict[str, str]) -> dict[str, Any]:
    """A drive as the API shows it (fields a real drive has that mean nothing here are empty)."""
    return {
        **drive_ref(rec, owner),
        "name": rec.name,
        "size": rec.size,
        "media": rec.media,
        "status": rec.status,
        "meta": dict(rec.meta),
        "storage_type": STORAGE_TYPE,
        "runtime": {
            "is_downloadable": rec.status in DOWNLOADABLE,
            "storage_type": STORAGE_TYPE,
            "snapshots_allocated_size": 0,
        },
        "tags": [],
        "jobs": [],
        "licenses": [],
        "mounted_on": [],
        "affinities": [],
        "grantees": [],
        "allow_multimount": False,
    }


def _whole_number(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    # Numbers may come as floats (1073741824.0); booleans are not numbers here.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise validation(f"{key} must be a whole number >= 0", key)
    return value


def _text(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise validation(f"{key} must be a string", key)
    return value


def _media(obj: dict[str, Any]) -> str:
    media = _text(obj, "media", "disk")
    if media not in MEDIA:
        raise validation(f"media must be one of {sorted(MEDIA)}", "media")
    return media


def _meta(obj: dict[str, Any]) -> dict[str, str]:
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise validation("meta must be an object of string values", "meta")
    for key, value in meta.items():
        if len(key) > META_KEY_MAX:
            raise validation(
                f"meta key {key[:40]!r} is longer than {META_KEY_MAX} characters", "meta"
            )
        if not isinstance(value, str):
            raise validation(f"meta value of {key!r} must be a string", "meta")
    return dict(meta)


def _object_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise validation("the body must be a JSON object")
    return body


class ApiViews(HandlerBase):
    """Views of the JSON resources; the router calls them by name."""

    def _owner(self) -> dict[str, str]:
        return owner_ref(self.ctx.config.username)

    def list_drives(self) -> None:
        self._list(detail=False)

    def list_drives_detail(self) -> None:
        self._list(detail=True)

    def _list(self, *, detail: bool) -> None:
        limit = self.int_query("limit", DEFAULT_LIMIT)
        offset = self.int_query("offset", 0)
        records = self.ctx.store.list()
        page = records[offset : offset + limit] if limit else records[offset:]
        owner = self._owner()
        # The short list names each drive and its status, as the real API's does.
        objects = [drive_json(r, owner) if detail else {**drive_ref(r, owner), "status": r.status}
                   for r in page]
        meta = {"limit": limit, "offset": offset, "total_count": len(records)}
        self.reply_json(200, {"meta": meta, "objects": objects})

    def get_drive(self, uuid: str) -> None:
        self.reply_json(200, drive_json(self.ctx.store.get(uuid), self._owner()))

    def put_drive(self, uuid: str) -> None:
        body = _object_body(self.read_json())
        for key in ("name", "size", "media"):
            if key not in body:
                raise validation(f"{key} is required (send name, size and media with meta)", key)
        rec = self.ctx.store.update(
            uuid, name=_text(body, "name"), size=_whole_number(body, "size"),
            media=_media(body), meta=_meta(body),
        )
        self.reply_json(200, drive_json(rec, self._owner()))

    def delete_drive(self, uuid: str) -> None:
        self.ctx.store.delete(uuid)
        self.reply(204, content_type=None)

    def capabilities(self) -> None:
        store = self.ctx.store
        size = {"min": store.min_size, "max": store.max_size}
        self.reply_json(200, {"drives": {STORAGE_TYPE: {"size": size}}})

    def locations(self) -> None:
        base = self.base_url()
        here = {
            "id": "local",
            "display_name": "drivepipe local drive store",
            "country_code": "",
            "api_endpoint": base,
            "upload_url": base,
        }
        meta = {"limit": 0, "offset": 0, "total_count": 1}
        self.reply_json(200, {"meta": meta, "objects": [here]})

    def init_upload(self) -> None:
        body = _object_body(self.read_json())
        name = _text(body, "name", "Upload")
        rec = self.ctx.store.init_upload(name, _whole_number(body, "size"), _media(body))
        location = f"{self.base_url()}drives/{rec.uuid}/"
        self.reply_json(
            201, {"objects": [drive_json(rec, self._owner())]}, (("Location", location),)
        )

    def drive_action(self, uuid: str) -> None:
        action = self.query.get("do", "")
        if action != "upload_chunk":
            raise validation(f"unknown action {action!r} (supported: upload_chunk)", "do")
        body = _object_body(self.read_json())
        number = _whole_number(body, "chunk_number")
        size = _whole_number(body, "chunk_size")
        self.ctx.store.check_chunk(uuid, number, size)
        self.reply_json(200, {"link": self.chunk_link(uuid, number, size)})

    def chunk_link(self, uuid: str, number: int, size: int) -> str:
        query = self.ctx.signer.query(
            "chunk", (uuid, str(number), str(size)), self.ctx.config.chunk_link_ttl
        )
        return f"/api/2.0/direct/{uuid}/chunk/{number}/?size={size}&{query}"

    # --- fault injection (admin) ----------------------------------------

    def get_faults(self) -> None:
        self.reply_json(200, {"objects": self.ctx.faults.snapshot()})

    def post_faults(self) -> None:
        body = self.read_json()
        items = body if isinstance(body, list) else [body]
        try:
            faults = [Fault.from_json(item) for item in items]
        except ValueError as exc:
            raise ApiError(400, "validation", str(exc)) from exc
        for fault in faults:
            self.ctx.faults.add(fault)
        self.get_faults()

    def delete_faults(self) -> None:
        self.ctx.faults.clear()
        self.reply(204, content_type=None)

"""The store's JSON API over real HTTP: drives, pagination, meta limits, errors, faults."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivepipe.server import RunningServer

Api = Any  # the conftest's Api class, handed out by the ``api`` fixture
PutDrive = Callable[[RunningServer, bytes | Path], str]


@pytest.fixture
def client(drive_store: RunningServer, api: Callable[[RunningServer], Api]) -> Api:
    return api(drive_store)


def test_every_answer_has_a_request_id_and_errors_are_the_documented_list(client: Api) -> None:
    for method, path, auth in [
        ("GET", "drives/", True),
        ("GET", "drives/", False),
        ("GET", "nothing/here/", True),
        ("GET", "/elsewhere", True),
        ("GET", "drives/00000000-0000-0000-0000-000000000000/", True),
    ]:
        answer = client.call(method, path, auth=auth)
        assert len(answer.headers["X-REQUEST-ID"]) >= 16
        if answer.status >= 400:
            (error,) = answer.json
            assert set(error) == {"error_type", "error_message", "error_point"}
    missing = client.call("GET", "drives/00000000-0000-0000-0000-000000000000/")
    assert missing.status == 404
    assert missing.json[0]["error_type"] == "notexist"


def test_request_ids_differ(client: Api) -> None:
    ids = {client.call("GET", "capabilities/").headers["X-REQUEST-ID"] for _ in range(3)}
    assert len(ids) == 3


def test_missing_or_wrong_credentials_get_a_basic_challenge(client: Api) -> None:
    for headers in ({}, {"Authorization": client.auth_header(password="nope")},
                    {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):
        answer = client.call("GET", "drives/", auth=False, headers=headers)
        assert answer.status == 401
        assert answer.headers["WWW-Authenticate"].startswith('Basic realm="')
        assert answer.json[0]["error_type"] == "permission"


def test_wrong_method_is_405_with_allow(client: Api) -> None:
    answer = client.call("DELETE", "capabilities/")
    assert answer.status == 405
    assert "GET" in answer.headers["Allow"]


def test_pagination(drive_store: RunningServer, client: Api, put_drive: PutDrive) -> None:
    uuids = [put_drive(drive_store, os.urandom(100)) for _ in range(5)]
    page = client.call("GET", "drives/?limit=2&offset=1").json
    assert page["meta"] == {"limit": 2, "offset": 1, "total_count": 5}
    assert [d["uuid"] for d in page["objects"]] == uuids[1:3]
    everything = client.call("GET", "drives/detail/?limit=0").json
    assert [d["uuid"] for d in everything["objects"]] == uuids
    assert everything["meta"]["total_count"] == 5
    assert all(d["status"] == "unmounted" for d in everything["objects"])
    # the short list carries each drive's status, as the real API's does (docs:
    # response_drive_list); the detailed one everything
    assert set(page["objects"][0]) == {"uuid", "resource_uri", "owner", "status"}
    assert page["objects"][0]["status"] == "unmounted"
    past_end = client.call("GET", "drives/?offset=10").json
    assert past_end["objects"] == [] and past_end["meta"]["total_count"] == 5
    assert client.call("GET", "drives/?limit=-1").status == 400


def test_default_page_is_20(drive_store: RunningServer, client: Api, put_drive: PutDrive) -> None:
    for _ in range(21):
        put_drive(drive_store, b"x")
    page = client.call("GET", "drives/").json
    assert len(page["objects"]) == 20
    assert page["meta"]["total_count"] == 21


def test_drive_detail_fields(drive_store: RunningServer, client: Api, put_drive: PutDrive) -> None:
    uuid = put_drive(drive_store, os.urandom(1000))
    drive = client.call("GET", f"drives/{uuid}/").json
    assert drive["uuid"] == uuid
    assert drive["size"] == drive_store.store.min_size
    assert drive["media"] == "disk"
    assert drive["status"] == "unmounted"
    assert drive["meta"] == {}
    assert drive["storage_type"] == "dssd"
    assert drive["runtime"]["is_downloadable"] is True


def _put(client: Api, uuid: str, **changes: Any) -> Any:
    body = {"name": "disk", "size": client.server.store.get(uuid).size, "media": "disk"}
    body.update(changes)
    return client.call("PUT", f"drives/{uuid}/", body=body)


def test_put_replaces_meta_whole_and_checks_limits(
    drive_store: RunningServer, client: Api, put_drive: PutDrive
) -> None:
    uuid = put_drive(drive_store, b"abc")
    first = _put(client, uuid, meta={"a": "1", "k" * 32: "long key is fine"})
    assert first.status == 200
    assert _put(client, uuid, meta={"b": "2"}).json["meta"] == {"b": "2"}
    assert client.call("GET", f"drives/{uuid}/").json["meta"] == {"b": "2"}
    too_long = _put(client, uuid, meta={"k" * 33: "x"})
    assert too_long.status == 400
    assert too_long.json[0]["error_type"] == "validation"
    assert _put(client, uuid, meta={"n": 5}).status == 400
    assert _put(client, uuid, meta=["not", "a", "dict"]).status == 400
    assert drive_store.store.get(uuid).meta == {"b": "2"}


def test_put_needs_name_size_media_and_valid_values(
    drive_store: RunningServer, client: Api, put_drive: PutDrive
) -> None:
    uuid = put_drive(drive_store, b"abc")
    assert client.call("PUT", f"drives/{uuid}/", body={"meta": {}}).status == 400
    assert _put(client, uuid, media="floppy").status == 400
    assert _put(client, uuid, size=100).status == 400  # shrinking
    assert client.call("PUT", f"drives/{uuid}/", raw=b"{not json").status == 400
    renamed = _put(client, uuid, name="new name", media="cdrom")
    assert renamed.json["name"] == "new name" and renamed.json["media"] == "cdrom"


def test_put_grows_the_drive(drive_store: RunningServer, client: Api, put_drive: PutDrive) -> None:
    uuid = put_drive(drive_store, b"abc")
    size = drive_store.store.min_size + 4096
    assert _put(client, uuid, size=float(size)).json["size"] == size
    assert os.path.getsize(drive_store.store.raw_path(uuid)) == size


def test_delete(drive_store: RunningServer, client: Api, put_drive: PutDrive) -> None:
    uuid = put_drive(drive_store, b"abc")
    raw = drive_store.store.raw_path(uuid)
    for listing in ("drives/", "drives/detail/", f"drives/{uuid}/"):
        assert client.call("GET", listing, auth=False).status == 401
    assert client.call("DELETE", f"drives/{uuid}/", auth=False).status == 401
    wrong = {"Authorization": client.auth_header(password="wrong")}
    assert client.call("DELETE", f"drives/{uuid}/", auth=False, headers=wrong).status == 401
    assert os.path.exists(raw)
    answer = client.call("DELETE", f"drives/{uuid}/")
    assert answer.status == 204 and answer.body == b""
    assert client.call("GET", f"drives/{uuid}/").status == 404
    assert not os.path.exists(raw)
    assert client.call("DELETE", f"drives/{uuid}/").status == 404


def test_capabilities_and_locations_describe_this_server(
    make_drive_store: Callable[..., RunningServer], api: Callable[[RunningServer], Api]
) -> None:
    server = make_drive_store(min_size=2 << 20, max_size=1 << 40)
    client = api(server)
    caps = client.call("GET", "capabilities/").json
    assert caps["drives"]["dssd"]["size"] == {"min": 2 << 20, "max": 1 << 40}
    (here,) = client.call("GET", "locations/").json["objects"]
    assert here["api_endpoint"] == server.base_url
    assert here["upload_url"] == server.base_url


def test_state_survives_a_restart(
    drive_store: RunningServer, client: Api, put_drive: PutDrive
) -> None:
    uuid = put_drive(drive_store, b"abc")
    _put(client, uuid, name="kept", meta={"x": "y"})
    drive_store.restart()
    drive = client.call("GET", f"drives/{uuid}/").json
    assert (drive["name"], drive["meta"]) == ("kept", {"x": "y"})


def test_fault_endpoint_injects_503s(client: Api) -> None:
    assert client.call("POST", "_faults/", body={"kind": "status"}, auth=False).status == 401
    added = client.call("POST", "_faults/", body={"kind": "status", "count": 2, "match": "capab"})
    assert added.status == 200
    assert client.call("GET", "drives/").status == 200  # does not match
    assert [client.call("GET", "capabilities/").status for _ in range(3)] == [503, 503, 200]
    assert client.call("POST", "_faults/", body={"kind": "explode"}).status == 400
    client.call("POST", "_faults/", body=[{"kind": "status", "count": 0}])
    assert client.call("GET", "drives/").status == 503
    assert client.call("GET", "_faults/").json["objects"][0]["count"] == 0
    assert client.call("DELETE", "_faults/").status == 204
    assert client.call("GET", "drives/").status == 200


def test_restart_sweeps_what_a_crash_left_behind(
    drive_store: RunningServer, put_drive: PutDrive
) -> None:
    uuid = put_drive(drive_store, b"kept")
    drives = Path(drive_store.store.drives_dir)
    orphan = drives / "11111111-2222-3333-4444-555555555555.raw"
    orphan.write_bytes(b"data whose record was never written")
    half_saved = drives / f"{uuid}.json.1234.tmp"
    half_saved.write_text("{")
    incoming = Path(drive_store.store.incoming_dir) / "partial.raw"
    incoming.write_bytes(b"half an upload")
    drive_store.restart()
    assert not orphan.exists() and not half_saved.exists() and not incoming.exists()
    assert [r.uuid for r in drive_store.store.list()] == [uuid]

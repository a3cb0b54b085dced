"""What the drives library makes of the API's answers (the live calls: with_server/)."""

from __future__ import annotations

import pytest

from drivepipe._errors import TransferError, UsageError
from drivepipe.cloudsigma.drives import Drive, check_uuid, default_drive_name

UUID = "3e511b71-5dde-4798-90ff-f199be28860e"


def test_a_real_api_drive_without_runtime_flag_is_ready_by_its_status() -> None:
    for status, ready in (("unmounted", True), ("mounted", True), ("uploading", False),
                          ("creating", False), ("resizing", False)):
        drive = Drive.from_api({"uuid": UUID, "status": status, "size": 1073741824.0})
        assert (drive.ready, drive.size) == (ready, 1 << 30)
    # when the server says, its word wins
    said = Drive.from_api({"uuid": UUID, "status": "unmounted",
                           "runtime": {"is_downloadable": False}})
    assert said.ready is False


def test_checksum_fields_come_from_the_meta() -> None:
    drive = Drive.from_api({"uuid": UUID, "name": "d", "status": "unmounted", "size": 5,
                            "meta": {"drivepipe_xxh128": "ab" * 16, "drivepipe_size": "3",
                                     "other": 7}})
    assert drive.checksum == "ab" * 16 and drive.checksum_size == 3
    assert drive.as_dict()["meta"] == {"drivepipe_xxh128": "ab" * 16, "drivepipe_size": "3",
                                       "other": "7"}
    bare = Drive.from_api({"uuid": UUID, "meta": None, "size": True})
    assert bare.checksum is None and bare.checksum_size is None and bare.size == 0
    assert bare.status == "unknown"


def test_an_answer_without_uuid_is_a_transfer_error() -> None:
    with pytest.raises(TransferError, match="without a uuid"):
        Drive.from_api({"name": "x"})
    with pytest.raises(TransferError):
        Drive.from_api(["not", "a", "drive"])


def test_names_and_uuids() -> None:
    assert default_drive_name("/srv/images/disk.qcow2") == "disk.qcow2"
    assert default_drive_name("disk.img") == "disk.img"
    assert default_drive_name("-") == "stdin"
    # a URL: the last part of its path, never the query of a signed link
    assert default_drive_name("https://h.example/img/web%20disk.qcow2?sig=s3cret") == \
        "web disk.qcow2"
    assert default_drive_name("https://h.example/") == "drivepipe"
    assert check_uuid(UUID.upper()) == UUID
    with pytest.raises(UsageError, match="not a drive UUID"):
        check_uuid("3e511b71")

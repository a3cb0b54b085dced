"""The HTTP boundary's pure parts: UUID parsing, error lines, auth policy."""

from __future__ import annotations

import json

import pycurl
import pytest

from drivepipe import AuthError, ConfigError, HTTPError, TransferError
from drivepipe.cloudsigma.config import Credentials, Endpoint, normalize_base
from drivepipe.transport.curl import (
    Response,
    TlsOptions,
    check_auth_transport,
    curl_failure,
    error_detail,
    http_failure,
    parse_uuid,
    safe_url,
)

UUID = "3bd0c2a4-4c3b-4f6e-9a71-0d6f1e2a7b55"


@pytest.mark.parametrize(
    "body",
    [
        UUID.encode(),
        f"  {UUID}\n".encode(),
        f'"{UUID}"'.encode(),
        json.dumps({"uuid": UUID}).encode(),
        json.dumps({"objects": [{"uuid": UUID, "name": "x"}]}).encode(),
        UUID.upper().encode(),
    ],
)
def test_parse_uuid_accepts_documented_shapes(body: bytes) -> None:
    assert parse_uuid(body) == UUID


@pytest.mark.parametrize("body", [b"", b"ok", b"<html>502</html>", b'{"objects": []}'])
def test_parse_uuid_refuses_answers_without_uuid(body: bytes) -> None:
    with pytest.raises(TransferError, match="no drive UUID"):
        parse_uuid(body)


def test_error_detail_formats_documented_error_list() -> None:
    body = json.dumps([{"error_type": "validation", "error_message": "Size too big",
                        "error_point": "size"}]).encode()
    assert error_detail(body) == "validation: Size too big (size)"


def test_http_failure_is_one_line_with_request_id() -> None:
    body = json.dumps([{"error_type": "backend", "error_message": "no\ncapacity",
                        "error_point": None}]).encode()
    resp = Response(503, {"x-request-id": "req-42"}, body, "https://h.example/api/2.0/x")
    err = http_failure(resp, "upload")
    assert isinstance(err, HTTPError) and not isinstance(err, AuthError)
    assert err.transient and err.status == 503 and err.request_id == "req-42"
    line = err.one_line()
    assert "\n" not in line and "HTTP 503" in line and "req-42" in line and "capacity" in line


def test_http_failure_401_is_auth_error() -> None:
    err = http_failure(Response(401, {}, b"", "https://h.example/"), "upload")
    assert isinstance(err, AuthError) and not err.transient
    assert "authentication refused" in str(err)


def test_curl_failure_names_host_not_credentials() -> None:
    exc = pycurl.error(pycurl.E_COULDNT_CONNECT, "Failed to connect to 127.0.0.1 port 9")
    err = curl_failure(exc, "http://127.0.0.1:9/api/2.0/drives/upload/", "upload")
    assert err.transient and err.curl_code == pycurl.E_COULDNT_CONNECT
    assert str(err) == "upload to 127.0.0.1:9 failed: cannot connect"


def test_plain_http_auth_refused_off_loopback() -> None:
    check_auth_transport("http://127.0.0.1:8080/x", TlsOptions())
    check_auth_transport("http://localhost/x", TlsOptions())
    check_auth_transport("https://zrh.cloudsigma.com/x", TlsOptions())
    check_auth_transport("http://zrh.cloudsigma.com/x", TlsOptions(insecure_http=True))
    with pytest.raises(ConfigError, match="plain http"):
        check_auth_transport("http://zrh.cloudsigma.com/x", TlsOptions())


def test_endpoint_owns_only_its_origins() -> None:
    ep = Endpoint(normalize_base("https://zrh.cloudsigma.com"),
                  normalize_base("https://direct.zrh.cloudsigma.com/api/2.0"))
    assert ep.api == "https://zrh.cloudsigma.com/api/2.0/"
    assert ep.owns("https://zrh.cloudsigma.com/api/2.0/drives/")
    assert ep.owns("https://direct.zrh.cloudsigma.com:443/api/2.0/drives/upload/")
    assert not ep.owns("http://zrh.cloudsigma.com/api/2.0/")  # other scheme
    assert not ep.owns("https://zrh.cloudsigma.com:8443/")  # other port
    assert not ep.owns("https://evil.example/api/2.0/")


def test_credentials_never_show_password() -> None:
    creds = Credentials("me@example.com", "s3cret-pw")
    assert "s3cret-pw" not in repr(creds) and "s3cret-pw" not in str(creds)
    assert "s3cret-pw" not in repr([creds]) and "s3cret-pw" not in f"{creds}"


def test_safe_url_drops_query() -> None:
    assert safe_url("https://h/a/b?sig=abc&expires=1") == "https://h/a/b"


def test_normalize_base_refuses_credentials_in_url() -> None:
    with pytest.raises(ConfigError, match="must not contain credentials"):
        normalize_base("https://me:pw@zrh.cloudsigma.com/api/2.0/")
    with pytest.raises(ConfigError):
        normalize_base("ftp://zrh.cloudsigma.com/")

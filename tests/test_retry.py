"""The one retry policy: the transient set, backoff with jitter, Retry-After."""

from __future__ import annotations

import email.utils
import random

import pycurl
import pytest

from drivepipe._errors import AuthError, HTTPError, NetworkError, TransferError, UsageError
from drivepipe.transport.retry import (
    TRANSIENT_STATUS,
    RetryPolicy,
    is_transient,
    parse_retry_after,
    retry_after_of,
)


def _net(code: int) -> NetworkError:
    err = NetworkError("x")
    err.curl_code = code
    return err


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    assert is_transient(HTTPError("x", status))
    assert HTTPError("x", status).transient


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 416, 501, 505])
def test_other_statuses_are_not_transient(status: int) -> None:
    assert not is_transient(HTTPError("x", status))
    assert not HTTPError("x", status).transient


def test_transient_curl_codes() -> None:
    for code in (pycurl.E_COULDNT_CONNECT, pycurl.E_OPERATION_TIMEDOUT, pycurl.E_RECV_ERROR,
                 pycurl.E_SEND_ERROR, pycurl.E_PARTIAL_FILE, pycurl.E_GOT_NOTHING):
        assert is_transient(_net(code)), code
    for code in (pycurl.E_COULDNT_RESOLVE_HOST, pycurl.E_PEER_FAILED_VERIFICATION,
                 pycurl.E_TOO_MANY_REDIRECTS, pycurl.E_ABORTED_BY_CALLBACK):
        assert not is_transient(_net(code)), code


def test_not_idempotent_only_retries_what_the_server_did_not_act_on() -> None:
    assert is_transient(HTTPError("x", 503), idempotent=False)
    assert is_transient(HTTPError("x", 429), idempotent=False)
    assert not is_transient(HTTPError("x", 500), idempotent=False)
    assert not is_transient(HTTPError("x", 502), idempotent=False)
    assert is_transient(_net(pycurl.E_COULDNT_CONNECT), idempotent=False)
    assert not is_transient(_net(pycurl.E_RECV_ERROR), idempotent=False)


def test_other_errors() -> None:
    assert not is_transient(UsageError("x"))
    assert not is_transient(ValueError("x"))
    assert not is_transient(AuthError("x", 401))
    cut = TransferError("cut off in its headers")
    cut.transient = True
    assert is_transient(cut) and not is_transient(cut, idempotent=False)
    assert {408, 429, 500, 502, 503, 504} == TRANSIENT_STATUS


def test_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    date = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(30.0)
    assert parse_retry_after(date, now=2_000_000.0) == 0.0  # in the past
    assert retry_after_of({"retry-after": "2"}) == 2.0
    assert retry_after_of({}) is None


def test_backoff_doubles_capped_with_half_jitter() -> None:
    policy = RetryPolicy(retries=10, base=0.5, cap=4.0, rng=random.Random(1))
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        for _ in range(50):
            assert ceiling / 2 <= policy.delay(attempt) <= ceiling


def test_full_jitter() -> None:
    policy = RetryPolicy(base=1.0, cap=1.0, jitter="full", rng=random.Random(2))
    waits = [policy.delay(1) for _ in range(200)]
    assert min(waits) < 0.2 and max(waits) <= 1.0


def test_retry_after_is_a_floor_within_its_cap() -> None:
    policy = RetryPolicy(base=0.01, cap=0.02, retry_after_cap=5.0)
    assert policy.delay(1, retry_after=1.0) >= 1.0
    assert policy.delay(1, retry_after=999.0) == 5.0
    assert policy.delay(1, retry_after=0.0) <= 0.02


def test_next_delay_gives_up() -> None:
    policy = RetryPolicy(retries=2, base=0.1, cap=0.1)
    busy = HTTPError("busy", 503, retry_after=3.0)
    wait = policy.next_delay(busy, 1)
    assert wait is not None and wait >= 3.0
    assert policy.next_delay(busy, 3) is None
    assert policy.next_delay(HTTPError("gone", 404), 1) is None


def test_call_retries_transient_and_sleeps_per_policy() -> None:
    waits: list[float] = []
    answers: list[Exception | str] = [HTTPError("busy", 503, retry_after=1.0),
                                      _net(pycurl.E_RECV_ERROR), "ok"]

    def fn() -> str:
        item = answers.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    policy = RetryPolicy(retries=3, base=0.01, cap=0.01)
    assert policy.call(fn, sleep=waits.append) == "ok"
    assert len(waits) == 2 and waits[0] >= 1.0 and waits[1] <= 0.01


def test_call_does_not_retry_a_4xx_and_stops_after_retries() -> None:
    calls = 0

    def refused() -> None:
        nonlocal calls
        calls += 1
        raise HTTPError("bad", 400)

    with pytest.raises(HTTPError):
        RetryPolicy().call(refused, sleep=lambda _s: None)
    assert calls == 1

    def busy() -> None:
        nonlocal calls
        calls += 1
        raise HTTPError("busy", 503)

    calls = 0
    with pytest.raises(HTTPError):
        RetryPolicy(retries=2).call(busy, sleep=lambda _s: None)
    assert calls == 3


def test_call_retry_if_and_on_retry() -> None:
    seen: list[float] = []
    tries = iter([HTTPError("expired", 403), "ok"])

    def fn() -> str:
        item = next(tries)
        if isinstance(item, Exception):
            raise item
        return item

    policy = RetryPolicy(base=0.01, cap=0.01)
    result = policy.call(fn, retry_if=lambda e: isinstance(e, HTTPError) and e.status == 403,
                         sleep=lambda _s: None, on_retry=lambda _e, s: seen.append(s))
    assert result == "ok" and len(seen) == 1


def test_an_http_answer_carries_its_retry_after_into_the_policy() -> None:
    from drivepipe.transport.curl import Response, http_failure  # noqa: PLC0415

    err = http_failure(Response(503, {"retry-after": "2"}, b"", "https://h.example/x"), "x")
    assert err.retry_after == 2.0 and err.transient
    wait = RetryPolicy(base=0.01, cap=0.01).next_delay(err, 1)
    assert wait is not None and wait >= 2.0

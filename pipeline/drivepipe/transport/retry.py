"""The one retry policy: which failures are transient, and how long to wait before trying again.

Every retry loop in drivepipe (the JSON API, the direct upload, the chunks of a chunked
upload, the ranges of a download, a remote source) asks this module two questions:

- *May this failure be retried?*  :func:`is_transient` answers from one set of curl codes
  (:data:`TRANSIENT_CURL`: cannot connect, timed out, reset while sending or receiving,
  cut short, nothing answered) and one set of HTTP statuses (:data:`TRANSIENT_STATUS`:
  408, 429, 500, 502, 503, 504).  A request that is not idempotent (a POST that creates
  something) is only repeated when the server surely did not act on it
  (:data:`NOT_PROCESSED_STATUS`, or no connection was made).
- *How long to wait?*  :meth:`RetryPolicy.delay`: exponential backoff from ``base``
  doubling per retry up to ``cap``, with jitter, and never less than the server's
  ``Retry-After`` (seconds or an HTTP date, at most ``retry_after_cap``).

Loops that block use :meth:`RetryPolicy.call`; loops that schedule retries themselves
(a curl multi handle) use :meth:`RetryPolicy.next_delay` and keep a due time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import pycurl

from drivepipe._errors import HTTPError, NetworkError, TransferError

T = TypeVar("T")

#: curl errors after which the same request may succeed: the network, not the request
TRANSIENT_CURL: frozenset[int] = frozenset({
    pycurl.E_COULDNT_CONNECT,      # 7: refused or unreachable (a restarting server)
    pycurl.E_PARTIAL_FILE,         # 18: the body ended before its Content-Length
    pycurl.E_OPERATION_TIMEDOUT,   # 28: connect, stall or overall timeout
    pycurl.E_GOT_NOTHING,          # 52: closed without a byte of answer
    pycurl.E_SEND_ERROR,           # 55: reset while sending
    pycurl.E_RECV_ERROR,           # 56: reset while receiving
})
#: HTTP answers meaning "not now": request timeout, too many requests, server trouble
TRANSIENT_STATUS: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})
#: answers after which the server surely did nothing: a POST may be sent again
NOT_PROCESSED_STATUS: frozenset[int] = frozenset({408, 429, 503})
#: curl errors before any byte of the request left: a POST may be sent again
NOT_SENT_CURL: frozenset[int] = frozenset({pycurl.E_COULDNT_CONNECT})


def transient_status(status: int) -> bool:
    """True when an HTTP answer with ``status`` may go away if the request is repeated."""
    return status in TRANSIENT_STATUS


def transient_curl(code: int) -> bool:
    """True when a transfer that failed with curl error ``code`` may succeed when repeated."""
    return code in TRANSIENT_CURL


def is_transient(exc: BaseException, *, idempotent: bool = True) -> bool:
    """Whether the request that raised ``exc`` may be repeated.

    ``idempotent=False`` (a POST that creates a drive) narrows this to failures after
    which the server cannot have acted: :data:`NOT_PROCESSED_STATUS` answers, or no
    connection at all.
    """
    if isinstance(exc, HTTPError):
        return exc.status in (TRANSIENT_STATUS if idempotent else NOT_PROCESSED_STATUS)
    if isinstance(exc, NetworkError) and exc.curl_code is not None:
        return exc.curl_code in (TRANSIENT_CURL if idempotent else NOT_SENT_CURL)
    if isinstance(exc, TransferError):
        # a failure the transport classified itself (an answer cut off in its headers)
        return exc.transient and idempotent
    return False


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header value asks for (delta seconds or an HTTP date)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    import email.utils  # noqa: PLC0415 - 20 ms of imports, only for an HTTP date

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` of an answer's headers (keys in lower case), in seconds."""
    return parse_retry_after(headers.get("retry-after"))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is repeated.

    ``retries`` is the number of attempts after the first one (0: never retry).  The
    wait before retry ``n`` (1-based) is ``min(cap, base * 2**(n-1))`` with jitter
    (``"half"``: uniformly in its upper half; ``"full"``: anywhere from 0), and at least
    the server's ``Retry-After`` up to ``retry_after_cap``.
    """

    retries: int = 8
    base: float = 0.25
    cap: float = 30.0
    jitter: Literal["half", "full"] = "half"
    #: a ``Retry-After`` longer than this is cut to it (a hung server should not park us)
    retry_after_cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def backoff(self, attempt: int) -> float:
        """The capped, jittered exponential part of the wait before retry ``attempt``."""
        ceiling = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        if self.jitter == "full":
            return self.rng.uniform(0.0, ceiling)
        return self.rng.uniform(ceiling / 2, ceiling)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...), honouring ``retry_after``."""
        wait = self.backoff(attempt)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(retry_after, self.retry_after_cap))
        return wait

    def next_delay(
        self, exc: BaseException, attempt: int, *, idempotent: bool = True
    ) -> float | None:
        """The wait before retry ``attempt`` after ``exc``, or None: give up and raise it.

        None when ``exc`` is not transient or ``attempt`` is past :attr:`retries`.
        """
        if attempt > self.retries or not is_transient(exc, idempotent=idempotent):
            return None
        return self.delay(attempt, getattr(exc, "retry_after", None))

    def call(
        self,
        fn: Callable[[], T],
        *,
        idempotent: bool = True,
        retry_if: Callable[[BaseException], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[BaseException, float], None] | None = None,
    ) -> T:
        """``fn()``, repeated after transient :class:`TransferError` failures.

        ``retry_if`` replaces :func:`is_transient` (for a caller that knows more, e.g.
        that a link expired); ``on_retry(exc, seconds)`` hears of each retry before
        the wait.
        """
        attempt = 0
        while True:
            try:
                return fn()
            except TransferError as exc:
                attempt += 1
                if retry_if is not None:
                    wait = (self.delay(attempt, exc.retry_after)
                            if attempt <= self.retries and retry_if(exc) else None)
                else:
                    wait = self.next_delay(exc, attempt, idempotent=idempotent)
                if wait is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, wait)
                sleep(wait)


#: the JSON API: a few quick retries (it documents 503 as "retry later")
API_POLICY = RetryPolicy(retries=4, base=0.25, cap=8.0)
#: one chunk, one range, one direct upload: patient, a long transfer is worth it
TRANSFER_POLICY = RetryPolicy(retries=8, base=0.5, cap=30.0)

__all__ = [
    "API_POLICY",
    "NOT_PROCESSED_STATUS",
    "TRANSFER_POLICY",
    "TRANSIENT_CURL",
    "TRANSIENT_STATUS",
    "RetryPolicy",
    "is_transient",
    "parse_retry_after",
    "retry_after_of",
    "transient_curl",
    "transient_status",
]

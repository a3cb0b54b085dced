"""One rooted exception hierarchy.

Every error a user can cause ends as one line on stderr and a non-zero exit
code (``exit_code``); anything outside this tree is a bug and keeps its
traceback.  Foreign exceptions (OSError, pycurl.error, zlib.error, ...) are
translated once, where they cross into drivepipe, with ``raise X(...) from exc``.

    DrivepipeError                  exit 1
    ├── UsageError                  exit 2   bad option or argument
    ├── ImageError                  exit 3   the input image
    │   ├── UnsupportedFormat                 a format we do not decode, or a refused feature
    │   └── CorruptImage                      truncated, corrupt or lying input
    ├── SizeMismatch                exit 4   a stream produced more or fewer bytes than announced
    ├── OutputError                 exit 5   target exists, disk full, cannot write
    │   └── DiskFull                          no space left (or over quota) on the output's disk
    ├── TransferError               exit 6   the network side
    │   ├── NetworkError                      connection refused, reset, timeout, TLS
    │   ├── SourceChanged                     a download's source changed (size, ETag) under it
    │   └── HTTPError                         an HTTP error answer
    │       └── AuthError                     401/403
    ├── VerifyError                 exit 7   checksum mismatch
    ├── ConfigError                 exit 2   endpoint/credentials missing or unsafe
    └── Cancelled                   exit 130 Ctrl-C
"""

from __future__ import annotations


class DrivepipeError(Exception):
    """Root of every error drivepipe raises on purpose."""

    exit_code = 1

    def one_line(self) -> str:
        """The message for stderr: one line, no traceback."""
        text = " ".join(str(self).split())
        return text or type(self).__name__


class UsageError(DrivepipeError):
    exit_code = 2


class ConfigError(DrivepipeError):
    exit_code = 2


class ImageError(DrivepipeError):
    exit_code = 3


class UnsupportedFormat(ImageError):
    pass


class CorruptImage(ImageError):
    pass


class SizeMismatch(DrivepipeError):
    exit_code = 4


class OutputError(DrivepipeError):
    exit_code = 5


class DiskFull(OutputError):
    pass


class TransferError(DrivepipeError):
    exit_code = 6

    #: True when repeating the same request may succeed (see drivepipe.transport.retry).
    transient: bool = False
    #: seconds the server asked us to wait (``Retry-After``), when it said so
    retry_after: float | None = None


class NetworkError(TransferError):
    transient = True
    #: libcurl's error code, when the error came from curl
    curl_code: int | None = None


class HTTPError(TransferError):
    def __init__(
        self, message: str, status: int, request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        # the one transient set lives with the retry policy (which imports this module)
        from drivepipe.transport.retry import transient_status  # noqa: PLC0415

        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        self.transient = transient_status(status)


class AuthError(HTTPError):
    pass


class SourceChanged(TransferError):
    """The bytes being read changed under a transfer (a new size or ETag): never mixed;
    a download starts over, an upload from a URL fails."""


class ResumeRefused(UsageError):
    """A kept transfer (a journal) cannot be continued with what was asked for now."""


class VerifyError(DrivepipeError):
    exit_code = 7


class Cancelled(DrivepipeError):
    exit_code = 130

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)

"""API errors: what the store answers when it refuses a request.

An :class:`ApiError` becomes the documented CloudSigma error body, a JSON list
of one ``{"error_type", "error_message", "error_point"}`` object, with its HTTP
status.  ``error_type`` is one of the documented kinds (validation, notexist,
backend, permission, database, concurrency, billing, payment).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal with an HTTP status, an error type and a message for the client."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        point: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.error_type = error_type
        self.message = message
        self.point = point

    def body(self) -> list[dict[str, Any]]:
        return [
            {
                "error_type": self.error_type,
                "error_message": self.message,
                "error_point": self.point,
            }
        ]


def validation(message: str, point: str | None = None) -> ApiError:
    return ApiError(400, "validation", message, point)


def notexist(message: str, point: str | None = None) -> ApiError:
    return ApiError(404, "notexist", message, point)


def permission(message: str, status: int = 403) -> ApiError:
    return ApiError(status, "permission", message)


def already_uploaded(message: str) -> ApiError:
    # 416 is what pycloudsigma's uploader takes as "this chunk is already there".
    return ApiError(416, "validation", message)


def busy(message: str) -> ApiError:
    # The documented answer to a concurrent update: 503, retry later.
    return ApiError(503, "concurrency", message)


def backend(message: str, status: int = 503) -> ApiError:
    return ApiError(status, "backend", message)


"""The service's refusals and error answers: ``Refused`` raised anywhere in a request, and the
JSON ``{"detail": ...}`` answer with its status's headers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from densenet.data.images import ImageError, Reason

RETRY_AFTER_S = 1

_HEADERS = {
    503: {"Retry-After": str(RETRY_AFTER_S)},
    408: {"Connection": "close"},  # the rest of a body that came too slowly is not awaited
}


class UploadTooLarge(Exception):
    """The request body grew past the upload limit while it was read."""


class Refused(Exception):
    """A request the service answers with ``status`` and a JSON ``detail`` (``headers``: default
    the status's own, as ``error_response`` adds them)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer ``{"detail": detail}`` with the status's headers unless ``headers``."""
    headers = _HEADERS.get(status) if headers is None else headers
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def too_large(limit: int) -> JSONResponse:
    """The 413 answer to a body over ``limit`` bytes."""
    return error_response(413, f"request body is over the limit of {limit / 1024 / 1024:g} MiB")


def status_of(error: ImageError) -> int:
    """415 for data that is no image format at all, 400 for a broken or refused image."""
    return 415 if error.reason is Reason.NOT_AN_IMAGE else 400

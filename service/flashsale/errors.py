"""The contract's error codes, each with its one HTTP status, and the JSON error response."""

from __future__ import annotations

import logging
from datetime import datetime

from starlette.responses import Response

from .schemas import Error, ErrorBody, encoder

STATUS: dict[str, int] = {
    "invalid_request": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "not_admitted": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "sold_out": 409,
    "limit_exceeded": 409,
    "sale_not_started": 409,
    "sale_paused": 409,
    "sale_ended": 409,
    "already_exists": 409,
    "invalid_state": 409,
    "hold_expired": 410,
    "extension_limit": 409,
    "idempotency_conflict": 422,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}

MESSAGES: dict[str, str] = {
    "sold_out": "not enough stock left for the quantity asked",
    "not_admitted": "this sale has a waiting room: join it, and send the Admission-Token it gives when admitted",
    "limit_exceeded": "this would take the user past the item's per-user limit",
    "sale_not_started": "the sale has not started yet",
    "sale_paused": "the sale is paused; try again later",
    "sale_ended": "the sale has ended",
    "already_exists": "a sale with this id already exists",
    "hold_expired": "the hold on this reservation ran out; reserve again",
    "extension_limit": "this hold was extended as often or as long as the sale allows",
    "idempotency_conflict": "this Idempotency-Key was used with a different body",
    "rate_limited": "too many attempts; slow down and retry after the given seconds",
    "unavailable": "the service is busy or its store is unreachable; retry after the given seconds",
}


log = logging.getLogger("flashsale.api")


class ApiError(Exception):
    """Raised anywhere below the routes; becomes one JSON error response."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        available: int | None = None,
        starts_at: datetime | None = None,
        fields: list[str] | None = None,
    ) -> None:
        self.code = code
        self.message = message or MESSAGES.get(code, code.replace("_", " "))
        self.status = status or STATUS[code]
        self.retry_after = retry_after
        self.available = available
        self.starts_at = starts_at
        self.fields = fields or []
        super().__init__(self.message)

    def answer(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Status, JSON body and the headers besides Content-Type and Content-Length."""
        body = ErrorBody(
            code=self.code,
            message=self.message,
            retry_after=self.retry_after,
            available=self.available,
            starts_at=self.starts_at,
            fields=self.fields,
        )
        extra = [] if self.retry_after is None else [(b"retry-after", str(self.retry_after).encode())]
        return self.status, encoder.encode(Error(body)), extra

    def response(self) -> Response:
        status, body, extra = self.answer()
        response = Response(body, status, media_type="application/json")
        response.raw_headers += extra
        return response


def store_unavailable(exc: Exception) -> ApiError:
    """The answer to a call Redis could not take (down, failing over, a lost connection): 503
    with Retry-After, the cause in the log."""
    log.warning("redis unavailable: %r", exc)
    return ApiError("unavailable", retry_after=1)

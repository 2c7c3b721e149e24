"""Every request: its X-Request-ID, one JSON log line, and its Prometheus count and latency.

The id a client sends in ``X-Request-ID`` is kept (only ``[A-Za-z0-9._:@/+=-]``, at most 128
characters), else one is made; either way it is on the response. The line has the request id,
method, route template (never the path, so never a query string), status and duration, at
INFO on the ``flashsale.access`` logger; headers, bodies and keys are never logged.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import ApiError

log = logging.getLogger("flashsale.access")
crash = logging.getLogger("flashsale.api")

UNSAFE = re.compile(r"[^A-Za-z0-9._:@/+=-]")
MAX_ID = 128


def request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            kept = UNSAFE.sub("", value.decode("latin-1"))[:MAX_ID]
            if kept:
                return kept
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The template of the route that answered (``/v1/sales/{sale_id}``); "unmatched" for none,
    so that unknown paths cannot grow the metrics without bound."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status:  # the response has begun: nothing better to do than let the server see it
                raise
            # Answered here rather than by the app's last-resort handler, which is outside every
            # middleware: so that this response, too, carries its X-Request-ID.
            crash.exception("unhandled error", extra={"request_id": rid})
            await ApiError("internal", "internal error; it has been logged").response()(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = route_of(scope)
            metrics.request(scope["method"], route, status or 500, seconds)
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "route": route,
                        "status": status or 500,
                        "duration_ms": round(seconds * 1000, 2),
                    },
                )

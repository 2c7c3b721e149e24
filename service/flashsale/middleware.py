"""The edge of every request, in one ASGI middleware: load shedding, the X-Request-ID, one JSON
log line, and the Prometheus count and latency.

- Past ``max_in_flight`` requests at once, 503 with Retry-After at once, before any work, instead
  of queueing them until everything times out.
- The id a client sends in ``X-Request-ID`` is kept (only ``[A-Za-z0-9._:@/+=-]``, at most 128
  characters), else one is made; either way it is on the response.
- The line has the request id, method, route template (never the path, so never a query string),
  status and duration, at INFO on the ``flashsale.access`` logger; headers, bodies and keys are
  never logged. ``FLASHSALE_ACCESS_LOG_SAMPLE=N`` keeps one line in N of the 2xx and 409 answers
  (every other answer is always logged); 1, the default, logs every request.

It also calls the routes a crowd sends by the thousand (``hot.ROUTES``: reserve and GET sale)
itself: it matches them and calls their plain ASGI endpoints, which answer their own errors,
without the router's and the exception middleware's wrappers around each request. Reached
through the router they behave the same. One middleware rather than two, and the line written
the cheap way (``logs.access``): on a sold-out crowd these layers cost more than the answer
itself (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Sequence

from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs, metrics
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
    return secrets.token_hex(16)  # 128 random bits, as uuid4().hex, without building a UUID


def route_of(scope: Scope) -> str:
    """The template of the route that answered (``/v1/sales/{sale_id}``); "unmatched" for none,
    so that unknown paths cannot grow the metrics without bound."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


def sampled(status: int) -> bool:
    """Answers a crowd gets by the thousand; every other one is always logged."""
    return status < 300 or status == 409


class Edge:
    def __init__(self, app: ASGIApp, max_in_flight: int, log_sample: int = 1, hot: Sequence[Route] = ()) -> None:
        self.app, self.limit, self.sample, self.hot = app, max_in_flight, max(1, log_sample), hot
        self.in_flight = 0
        self._answered = 0

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        for route in self.hot:
            if route.methods and scope["method"] not in route.methods:
                continue
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                scope["route"] = route
                await route.app(scope, receive, send)  # a hot.Endpoint: answers its own errors
                return
        await self.app(scope, receive, send)

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
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if self.in_flight >= self.limit:
                shed = ApiError("unavailable", "the service is at capacity", retry_after=1).response()
                await shed(scope, receive, send_with_id)
                return
            self.in_flight += 1
            try:
                await self._route(scope, receive, send_with_id)
            finally:
                self.in_flight -= 1
        except Exception:
            if status:  # the response has begun: nothing better to do than let the server see it
                raise
            # Answered here rather than by the app's last-resort handler, which is outside every
            # middleware: so that this response, too, carries its X-Request-ID.
            crash.exception("unhandled error", extra={"request_id": rid})
            await ApiError("internal", "internal error; it has been logged").response()(scope, receive, send_with_id)
        finally:
            # No status: the app sent nothing, because the client went away first (499, as nginx).
            self._finish(scope, rid, status or 499, time.perf_counter() - started)

    def _finish(self, scope: Scope, rid: str, status: int, seconds: float) -> None:
        route = route_of(scope)
        metrics.request(scope["method"], route, status, seconds)
        if not log.isEnabledFor(logging.INFO):
            return
        if self.sample > 1 and sampled(status):
            self._answered += 1
            if self._answered % self.sample:
                return
        fields = {
            "request_id": rid,
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
        }
        logs.access(log, fields)

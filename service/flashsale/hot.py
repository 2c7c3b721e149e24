"""Reserve and GET sale, the two routes a crowd sends by the thousand, as plain ASGI apps.

Starlette's Request (its headers object, its body stream) and its Response cost more per request
than a sold-out answer from memory (BENCHMARKS.md). These read the few headers they need from the
scope in one pass and the body straight from ``receive``, and answer with two ASGI messages of
bytes. The checks and the JSON errors are those of every other route (``web.py`` holds the rules
they share). They are ordinary Starlette routes (``ROUTES``); the edge middleware calls them
straight, past the router and the exception middleware.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import clients, connection, metrics
from .errors import ApiError, store_unavailable
from .schemas import QueueIn, ReserveIn, encoder
from .waiting import TICKET
from .web import Disconnected, Services, decode, read, valid_idempotency_key, valid_slug, valid_user_id

JSON = (b"content-type", b"application/json")

Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, bytes, Headers]  # status, JSON body, headers besides Content-Type/-Length


def headers(scope: Scope, *names: bytes) -> list[str | None]:
    """The first value of each of ``names`` (lower case), in one pass over the request's headers."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in names and name not in found:
            found[name] = value.decode("latin-1")
    return [found.get(name) for name in names]


class Endpoint:
    """An ASGI app around ``handler``: its answer, or the JSON error of what it raised."""

    def __init__(self, handler: Callable[[Scope, Receive], Awaitable[Answer]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, body, extra = await self.handler(scope, receive)
        except ApiError as exc:
            status, body, extra = exc.answer()
        except connection.ERRORS as exc:
            status, body, extra = store_unavailable(exc).answer()
        except Disconnected:
            return
        start = [JSON, (b"content-length", b"%d" % len(body)), *extra]
        await send({"type": "http.response.start", "status": status, "headers": start})
        await send({"type": "http.response.body", "body": body})


def _services(scope: Scope) -> Services:
    svc: Services = scope["app"].state.services
    return svc


async def reserve(scope: Scope, receive: Receive) -> Answer:
    svc = _services(scope)
    authorization, key, length, token = headers(
        scope, b"authorization", b"idempotency-key", b"content-length", b"admission-token"
    )
    svc.keyring.require(authorization, "storefront")
    sale_id = valid_slug(scope["path_params"]["sale_id"], "sale_id")
    valid_idempotency_key(key)
    ask = decode(await read(receive, length or ""), ReserveIn)
    client = clients.keys_of(ask.client)
    outcome = await svc.reservations.reserve(sale_id, ask.user_id, ask.sku, ask.quantity, key, token, client)
    if isinstance(outcome, ApiError):  # a refusal is an answer, not an exception: no raise on the hot path
        metrics.reserved(outcome.code)
        return outcome.answer()
    reservation, created = outcome
    metrics.reserved("created" if created else "replayed")
    return 201 if created else 200, encoder.encode(reservation), []


async def get_sale(scope: Scope, receive: Receive) -> Answer:
    svc = _services(scope)
    (authorization,) = headers(scope, b"authorization")
    svc.keyring.require(authorization, "storefront")
    return 200, await svc.sales.view_json(valid_slug(scope["path_params"]["sale_id"], "sale_id")), []


async def join_queue(scope: Scope, receive: Receive) -> Answer:
    svc = _services(scope)
    authorization, length = headers(scope, b"authorization", b"content-length")
    svc.keyring.require(authorization, "storefront")
    sale_id = valid_slug(scope["path_params"]["sale_id"], "sale_id")
    ask = decode(await read(receive, length or ""), QueueIn)
    clients.keys_of(ask.client)  # checked as on reserve: a malformed address is a clear 422
    ticket, created = await svc.room.join(sale_id, ask.user_id)
    return 201 if created else 200, encoder.encode(ticket), []


async def poll_queue(scope: Scope, receive: Receive) -> Answer:
    """A waiting ticket's poll, the crowd's most frequent call while it waits: mostly from memory (polls.py)."""
    svc = _services(scope)
    (authorization,) = headers(scope, b"authorization")
    svc.keyring.require(authorization, "storefront")
    sale_id = valid_slug(scope["path_params"]["sale_id"], "sale_id")
    ticket = scope["path_params"]["ticket"]
    user = valid_user_id(parse_qs(scope["query_string"].decode("latin-1")).get("user_id", [""])[0])
    if not TICKET.match(ticket):
        raise ApiError("not_found", "no such ticket for this user")
    return 200, encoder.encode(await svc.polls.poll(sale_id, ticket, user)), []


ROUTES = [
    Route("/v1/sales/{sale_id}/reservations", Endpoint(reserve), methods=["POST"]),
    Route("/v1/sales/{sale_id}", Endpoint(get_sale), methods=["GET"]),
    Route("/v1/sales/{sale_id}/queue", Endpoint(join_queue), methods=["POST"]),
    Route("/v1/sales/{sale_id}/queue/{ticket}", Endpoint(poll_queue), methods=["GET"]),
]

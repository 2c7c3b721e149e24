"""The webhook endpoints ops register: registration, the list with their deliveries not yet
done, deletion, secret rotation, a webhook's deliveries and sending a dead letter again.
``dispatch.py`` sends the deliveries, signed as ``signing.py`` says."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .errors import ApiError
from .schemas import (
    EVENT_ID_PATTERN,
    WEBHOOK_ID_PATTERN,
    Delivery,
    DeliveryList,
    RotateIn,
    Webhook,
    WebhookCounts,
    WebhookIn,
    WebhookList,
)
from .signing import new_secret
from .web import authorize, body, decode, json, limit, read

DELIVERIES_LIMIT = 100


COUNTS = """
SELECT webhook_id, count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'dead') AS dead
FROM webhook_deliveries WHERE status <> 'delivered' GROUP BY webhook_id
"""


def _out(row: asyncpg.Record) -> Webhook:
    return Webhook(id=row["id"], url=row["url"], events=list(row["events"]), created_at=row["created_at"])


WEBHOOK_ID = re.compile(WEBHOOK_ID_PATTERN)
EVENT_ID = re.compile(EVENT_ID_PATTERN)


def _webhook_id(request: Request) -> str:
    wid: str = request.path_params["webhook_id"]
    if not WEBHOOK_ID.fullmatch(wid):
        raise ApiError("not_found", f"no webhook {wid!r}")
    return wid


def _event_id(request: Request, wid: str) -> str:
    eid: str = request.path_params["event_id"]
    if not EVENT_ID.fullmatch(eid):
        raise ApiError("not_found", f"no delivery {eid!r} of webhook {wid!r}")
    return eid


async def register(request: Request) -> Response:
    pool = authorize(request, "ops").pool
    ask = await body(request, WebhookIn)
    try:
        httpx.URL(ask.url)
    except (httpx.InvalidURL, ValueError) as exc:  # what the pattern lets through and no client can send to
        raise ApiError("invalid_request", f"url: {exc}", fields=["url"]) from None
    events = sorted(set(ask.events))
    wid, secret = "wh_" + secrets.token_urlsafe(16), new_secret()
    row = await pool.fetchrow(
        "INSERT INTO webhooks (id, url, events, secret) VALUES ($1, $2, $3, $4) RETURNING *",
        wid,
        ask.url,
        events,
        secret,
    )
    assert row is not None
    out = _out(row)
    out.secret = secret
    return json(out, 201)


async def list_webhooks(request: Request) -> Response:
    pool = authorize(request, "ops").pool
    rows = await pool.fetch("SELECT * FROM webhooks ORDER BY created_at DESC, id")
    counts = {r["webhook_id"]: WebhookCounts(pending=r["pending"], dead=r["dead"]) for r in await pool.fetch(COUNTS)}
    listed = [_out(r) for r in rows]
    for w in listed:
        w.deliveries = counts.get(w.id, WebhookCounts(0, 0))
    return json(WebhookList(webhooks=listed))


async def delete_webhook(request: Request) -> Response:
    pool = authorize(request, "ops").pool
    wid = _webhook_id(request)
    if await pool.fetchval("DELETE FROM webhooks WHERE id = $1 RETURNING id", wid) is None:
        raise ApiError("not_found", f"no webhook {wid!r}")
    return Response(status_code=204)


async def rotate(request: Request) -> Response:
    """A new secret; the previous one goes on signing for ``previous_valid_s`` (one day unless asked)."""
    pool = authorize(request, "ops").pool
    wid = _webhook_id(request)
    raw = await read(request.receive, request.headers.get("content-length", ""))
    ask = decode(raw, RotateIn) if raw.strip() else RotateIn()  # no body: the defaults
    secret = new_secret()
    until = datetime.now(UTC) + timedelta(seconds=ask.previous_valid_s)
    row = await pool.fetchrow(
        "UPDATE webhooks SET previous_secret = secret, previous_until = $2, secret = $3 WHERE id = $1 RETURNING *",
        wid,
        until,
        secret,
    )
    if row is None:
        raise ApiError("not_found", f"no webhook {wid!r}")
    out = _out(row)
    out.secret, out.previous_secret_until = secret, until
    return json(out)


async def deliveries(request: Request) -> Response:
    """A webhook's deliveries, newest first: ``status=dead`` for its dead letters."""
    pool = authorize(request, "ops").pool
    wid = _webhook_id(request)
    status = request.query_params.get("status")
    if status not in (None, "pending", "delivered", "dead"):
        raise ApiError("invalid_request", "status is one of pending, delivered, dead", fields=["status"])
    if await pool.fetchval("SELECT 1 FROM webhooks WHERE id = $1", wid) is None:
        raise ApiError("not_found", f"no webhook {wid!r}")
    rows = await pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2)"
        " ORDER BY occurred_at DESC, event_id LIMIT $3",
        wid,
        status,
        limit(request, 20, DELIVERIES_LIMIT),
    )
    return json(DeliveryList(deliveries=[_delivery(r) for r in rows]))


async def redeliver(request: Request) -> Response:
    """A dead letter sent again, with its retries anew (once the endpoint is fixed)."""
    pool = authorize(request, "ops").pool
    wid = _webhook_id(request)
    eid = _event_id(request, wid)
    row = await pool.fetchrow(
        "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_at = now()"
        " WHERE webhook_id = $1 AND event_id = $2 AND status = 'dead' RETURNING *",
        wid,
        eid,
    )
    if row is None:
        found = await pool.fetchval(
            "SELECT status FROM webhook_deliveries WHERE webhook_id = $1 AND event_id = $2", wid, eid
        )
        if found is None:
            raise ApiError("not_found", f"no delivery {eid!r} of webhook {wid!r}")
        raise ApiError("invalid_state", f"the delivery is {found}: only a dead one is sent again")
    return json(_delivery(row))


def _delivery(r: asyncpg.Record) -> Delivery:
    return Delivery(
        event_id=r["event_id"],
        type=r["type"],
        sale_id=r["sale_id"],
        status=r["status"],
        attempts=r["attempts"],
        occurred_at=r["occurred_at"],
        next_at=r["next_at"] if r["status"] == "pending" else None,
        last_error=r["last_error"],
        payload=r["payload"],
    )


ROUTES: list[BaseRoute] = [
    Route("/v1/webhooks", register, methods=["POST"]),
    Route("/v1/webhooks", list_webhooks, methods=["GET"]),
    Route("/v1/webhooks/{webhook_id}", delete_webhook, methods=["DELETE"]),
    Route("/v1/webhooks/{webhook_id}/rotate", rotate, methods=["POST"]),
    Route("/v1/webhooks/{webhook_id}/deliveries", deliveries, methods=["GET"]),
    Route("/v1/webhooks/{webhook_id}/deliveries/{event_id}/redeliver", redeliver, methods=["POST"]),
]

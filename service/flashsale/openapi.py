"""The OpenAPI 3.1 document, its schemas generated from the same structs the API decodes and
encodes with, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from .schemas import (
    EVENT_ID_PATTERN,
    WEBHOOK_ID_PATTERN,
    CancelIn,
    Cart,
    CartIn,
    ConfirmIn,
    Delivery,
    DeliveryList,
    Error,
    ExtendIn,
    Health,
    ItemOut,
    QueueIn,
    QueuePatch,
    QueueProgress,
    Reservation,
    ReservationList,
    ReserveIn,
    RestockIn,
    RotateIn,
    SaleIn,
    SaleOut,
    SalePage,
    SalePatch,
    Ticket,
    Webhook,
    WebhookIn,
    WebhookList,
)

REF = "#/components/schemas/{name}"


def _ref(t: type) -> dict[str, Any]:
    return {"$ref": REF.format(name=t.__name__)}


def _content(t: type) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(t)}}}


def _op(
    summary: str,
    *,
    ok: dict[int, type],
    role: str | None = "storefront",
    body: type | None = None,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(code): {"description": t.__name__, **_content(t)} for code, t in ok.items()},
    }
    op["responses"]["default"] = {
        "description": "an error; its codes are in the API reference (GET /docs)",
        **_content(Error),
    }
    if role:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Needs a{'n ops' if role == 'ops' else ' storefront or ops'} key."
    if body:
        op["requestBody"] = {"required": True, **_content(body)}
    if params:
        op["parameters"] = params
    return op


def _path(name: str, pattern: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": pattern}}


SALE_ID = _path("sale_id", "^[A-Za-z0-9_-]{1,64}$")
CART_ID = _path("cart_id", "^[A-Za-z0-9_-]{1,64}\\.c[A-Za-z0-9_-]{22}$")
RID = _path("rid", "^[A-Za-z0-9_-]{1,64}(~[0-9a-f]{1,8})?\\.[A-Za-z0-9_-]{22}$")
USER_QUERY = {
    "name": "user_id",
    "in": "query",
    "required": True,
    "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"},
}


def _limit(description: str, default: int, maximum: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}
    return {"name": "limit", "in": "query", "required": False, "description": description, "schema": schema}


LIMIT = _limit("at most this many, newest first", 20, 100)
IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retries with the same key and body return the same reservation. "
    "Scoped to (sale, user_id, key); kept as long as the sale's data.",
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"},
}


ADMISSION = {
    "name": "Admission-Token",
    "in": "header",
    "required": False,
    "description": "For a sale with a waiting room (required there: 403 not_admitted without a valid one): "
    "the token an admitted ticket's poll gave this user for this sale",
    "schema": {"type": "string", "maxLength": 200},
}


def _admin_paths() -> dict[str, Any]:
    """Paths of admin.ROUTES."""
    sku = _path("sku", "^[A-Za-z0-9_-]{1,64}$")
    limit = _limit("sales per page", 50, 200)
    cursor = {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "the next_cursor of the page before; leave out for the first page",
        "schema": {"type": "string"},
    }

    def control(summary: str) -> dict[str, Any]:
        return {"post": _op(summary, ok={200: SaleOut}, role="ops", params=[SALE_ID])}

    return {
        "/v1/sales": {
            "get": _op(
                "Every sale, newest first, a page at a time", ok={200: SalePage}, role="ops", params=[limit, cursor]
            )
        },
        "/v1/sales/{sale_id}": {
            "patch": _op(
                "Change the window, name, hold length or items of a sale that has not started "
                "(409 invalid_state once it has); fields left out keep their value, items replaces the list",
                ok={200: SaleOut},
                role="ops",
                body=SalePatch,
                params=[SALE_ID],
            )
        },
        "/v1/sales/{sale_id}/pause": control("Pause: no new holds until resumed (409 invalid_state once ended)"),
        "/v1/sales/{sale_id}/resume": control("Resume a paused sale (409 invalid_state once ended)"),
        "/v1/sales/{sale_id}/end": control("End the sale for good; ending an ended sale changes nothing"),
        "/v1/sales/{sale_id}/queue": {
            "patch": _op(
                "Change the waiting room's admissions a second, live",
                ok={200: QueueProgress},
                role="ops",
                body=QueuePatch,
                params=[SALE_ID],
            ),
            "delete": _op(
                "Close the waiting room for good: every waiting ticket is told closed (closed_by_ops)",
                ok={200: QueueProgress},
                role="ops",
                params=[SALE_ID],
            ),
        },
        "/v1/sales/{sale_id}/items/{sku}/restock": {
            "post": _op(
                "Add units to an item's stock_total and available at once (409 invalid_state once ended)",
                ok={200: ItemOut},
                role="ops",
                body=RestockIn,
                params=[SALE_ID, sku],
            )
        },
    }


def _webhook_paths() -> dict[str, Any]:
    """Paths of webhooks.ROUTES."""
    webhook = _path("webhook_id", WEBHOOK_ID_PATTERN)
    event = _path("event_id", EVENT_ID_PATTERN)
    status = {
        "name": "status",
        "in": "query",
        "required": False,
        "description": "only deliveries in this status (dead: the dead letters)",
        "schema": {"type": "string", "enum": ["pending", "delivered", "dead"]},
    }
    rotate = _op(
        "A new signing secret; the previous one signs too for previous_valid_s (no body: one day)",
        ok={200: Webhook},
        role="ops",
        body=RotateIn,
        params=[webhook],
    )
    rotate["requestBody"]["required"] = False
    deleted = _op(
        "Stop sending to the endpoint; its deliveries not yet sent are dropped", ok={}, role="ops", params=[webhook]
    )
    deleted["responses"]["204"] = {"description": "deleted"}  # no body: none of _op's
    return {
        "/v1/webhooks": {
            "post": _op(
                "Register an endpoint for some events; the answer holds its signing secret, shown only here",
                ok={201: Webhook},
                role="ops",
                body=WebhookIn,
            ),
            "get": _op(
                "Every endpoint, newest first, with its deliveries waiting for a try and dead-lettered",
                ok={200: WebhookList},
                role="ops",
            ),
        },
        "/v1/webhooks/{webhook_id}": {"delete": deleted},
        "/v1/webhooks/{webhook_id}/rotate": {"post": rotate},
        "/v1/webhooks/{webhook_id}/deliveries": {
            "get": _op(
                "The endpoint's deliveries, newest first",
                ok={200: DeliveryList},
                role="ops",
                params=[webhook, status, _limit("at most this many", 20, 100)],
            )
        },
        "/v1/webhooks/{webhook_id}/deliveries/{event_id}/redeliver": {
            "post": _op(
                "Send a dead letter again, its retries anew (409 invalid_state unless it is dead)",
                ok={200: Delivery},
                role="ops",
                params=[webhook, event],
            )
        },
    }


def _monitor_paths() -> dict[str, Any]:
    """Paths of monitor.ROUTES. The progress schema is written out in full where it is used."""
    from .schemas import SaleProgress

    (top,), parts = msgspec.json.schema_components([SaleProgress], ref_template="{name}")

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            return inline(parts[node["$ref"]]) if "$ref" in node else {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    progress = inline(top)
    (failure,), failure_parts = msgspec.json.schema_components([Error], ref_template="{name}")
    parts.update(failure_parts)
    event = {  # one server-sent event, as OpenAPI before 3.2 reads a text/event-stream schema
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": ["progress", "error"]},
            "id": {"type": "string", "description": "counts up by one a tick"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [progress, inline(failure)]},
            },
        },
    }
    ops = "Needs an ops key."
    error = {"description": "an error; its codes are in the API reference (GET /docs)", **_content(Error)}
    stream = (
        "Server-sent events, at least one a second: `event: progress` with the same JSON document "
        "as GET .../progress in `data`, or `event: error` with an error body while it cannot be read "
        "(the stream goes on). Streams of one sale share one computation a second. " + ops
    )
    return {
        "/v1/sales/{sale_id}/progress": {
            "get": {
                "summary": "A sale's live numbers: per item stock, holds, attempts, rejections; persistence lag; rates",
                "description": "Rates are per second over the last 1, 10 and 60 s, measured from snapshots this "
                "process keeps once a second while the sale is watched; `window_s` is the span "
                "actually measured. " + ops,
                "security": [{"bearer": []}],
                "parameters": [SALE_ID],
                "responses": {
                    "200": {"description": "SaleProgress", "content": {"application/json": {"schema": progress}}},
                    "default": error,
                },
            }
        },
        "/v1/sales/{sale_id}/progress/stream": {
            "get": {
                "summary": "The progress document as a text/event-stream",
                "description": stream,
                "security": [{"bearer": []}],
                "parameters": [SALE_ID],
                "responses": {
                    "200": {
                        "description": "an endless event stream; the schema is that of each event",
                        "content": {"text/event-stream": {"schema": event}},
                    },
                    "default": error,
                },
            }
        },
        "/dashboard": {
            "get": {
                "summary": "The live dashboard: one HTML page; it asks for the ops key itself",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, text format 0.0.4",
                "description": "Request counts and latency by route template and status, reserve outcomes, "
                "persister batches and lag, and per sale and item the numbers kept in Redis. " + ops,
                "security": [{"bearer": []}],
                "responses": {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "default": error,
                },
            }
        },
    }


def _operation(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def _link(paths: dict[str, Any]) -> None:
    """OpenAPI links from what an operation creates to what can be done with it (a sale to its
    reservations and carts, a reservation to its confirm, cancel and extend, a cart to its own):
    a client generator, and a fuzzer's stateful phase, can follow them."""
    user = "$response.body#/user_id"
    sale = {"sale_id": "$response.body#/id"}
    rid = {"rid": "$response.body#/reservation_id"}
    cart = {"cart_id": "$response.body#/cart_id"}
    hook = {"webhook_id": "$response.body#/id"}
    first_sku = "$response.body#/items/0/sku"
    Link = tuple[str, str, dict[str, str], dict[str, Any] | None]  # to path, method, parameters, body
    buy: dict[str, Link] = {
        "Reserve": ("/v1/sales/{sale_id}/reservations", "post", sale, {"user_id": "shopper", "sku": first_sku}),
        "CreateCart": (
            "/v1/sales/{sale_id}/carts",
            "post",
            sale,
            {"user_id": "shopper", "lines": [{"sku": first_sku, "quantity": 1}]},
        ),
    }
    made: dict[tuple[str, str, str], dict[str, Link]] = {
        ("/v1/sales", "post", "201"): {"GetSale": ("/v1/sales/{sale_id}", "get", sale, None), **buy},
        ("/v1/sales/{sale_id}", "get", "200"): buy,  # a live sale read: what a shopper does next
        ("/v1/webhooks", "post", "201"): {
            "Rotate": ("/v1/webhooks/{webhook_id}/rotate", "post", hook, {"previous_valid_s": 60}),
            "Deliveries": ("/v1/webhooks/{webhook_id}/deliveries", "get", hook, None),
            "Delete": ("/v1/webhooks/{webhook_id}", "delete", hook, None),
        },
        ("/v1/sales/{sale_id}/reservations", "post", "201"): {
            "GetReservation": ("/v1/reservations/{rid}", "get", rid | {"user_id": user}, None),
            "Confirm": ("/v1/reservations/{rid}/confirm", "post", rid, {"user_id": user, "payment_ref": "psp-1"}),
            "Cancel": ("/v1/reservations/{rid}/cancel", "post", rid, {"user_id": user}),
            "Extend": ("/v1/reservations/{rid}/extend", "post", rid, {"user_id": user, "seconds": 60}),
        },
        ("/v1/sales/{sale_id}/carts", "post", "201"): {
            "GetCart": ("/v1/carts/{cart_id}", "get", cart | {"user_id": user}, None),
            "ConfirmCart": ("/v1/carts/{cart_id}/confirm", "post", cart, {"user_id": user, "payment_ref": "psp-1"}),
            "CancelCart": ("/v1/carts/{cart_id}/cancel", "post", cart, {"user_id": user}),
        },
    }
    for (path, method, status), links in made.items():
        response = paths[path][method]["responses"][status]
        response["links"] = {}
        for name, (to, to_method, parameters, request_body) in links.items():
            link: dict[str, Any] = {"operationRef": _operation(to, to_method), "parameters": parameters}
            if request_body is not None:
                link["requestBody"] = request_body
            response["links"][name] = link


RULES_422 = {  # what JSON Schema cannot say, answered 422 invalid_request
    ("/v1/sales", "post"): "ends_at not after starts_at, or one sku twice",
    ("/v1/sales", "get"): "a cursor this API did not give out",
    ("/v1/sales/{sale_id}", "patch"): "ends_at not after starts_at, or one sku twice",
    ("/v1/sales/{sale_id}/carts", "post"): "one sku twice, or a line of a sharded item",
}


def _declare_rules(paths: dict[str, Any]) -> None:
    """Every operation that takes a body or a query declares its 422; where rules beyond the
    schema give one, the description says which."""
    for path, operations in paths.items():
        for method, op in operations.items():
            if "requestBody" in op or any(p.get("in") == "query" for p in op.get("parameters", [])):
                why = RULES_422.get((path, method), "the request breaks the schema")
                op["responses"]["422"] = {"description": f"invalid_request: {why}", **_content(Error)}


def document() -> bytes:
    types = [
        SaleIn,
        SaleOut,
        ReserveIn,
        ConfirmIn,
        CancelIn,
        ExtendIn,
        CartIn,
        Cart,
        Reservation,
        ReservationList,
        Error,
        Health,
        SalePatch,
        RestockIn,
        SalePage,
        ItemOut,
        QueueIn,
        QueuePatch,
        QueueProgress,
        Ticket,
        WebhookIn,
        Webhook,
        WebhookList,
        RotateIn,
        Delivery,
        DeliveryList,
    ]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("The process is up", ok={200: Health}, role=None)},
        "/readyz": {"get": _op("Redis and Postgres are reachable", ok={200: Health, 503: Health}, role=None)},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        "/docs": {
            "get": {
                "summary": "The API reference as one HTML page, nothing loaded from elsewhere",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/v1/sales": {
            "post": _op(
                "Create a sale; its stock is in Redis before the 201", ok={201: SaleOut}, role="ops", body=SaleIn
            )
        },
        "/v1/sales/{sale_id}": {"get": _op("A sale with its live numbers", ok={200: SaleOut}, params=[SALE_ID])},
        "/v1/sales/{sale_id}/reservations": {
            "post": _op(
                "Reserve units: 201 a new hold, 200 the same hold again for a retried Idempotency-Key",
                ok={201: Reservation, 200: Reservation},
                body=ReserveIn,
                params=[SALE_ID, IDEMPOTENCY],
            )
        },
        "/v1/reservations/{rid}": {
            "get": _op("A reservation of this user", ok={200: Reservation}, params=[RID, USER_QUERY])
        },
        "/v1/reservations/{rid}/confirm": {
            "post": _op(
                "Confirm on payment (410 once the hold ran out)", ok={200: Reservation}, body=ConfirmIn, params=[RID]
            )
        },
        "/v1/reservations/{rid}/cancel": {
            "post": _op("Release the units back to stock", ok={200: Reservation}, body=CancelIn, params=[RID])
        },
        "/v1/sales/{sale_id}/carts": {
            "post": _op(
                "Hold every line of a cart, or none: 201 the cart, 200 the same cart for a retried Idempotency-Key;"
                " a refusal names the first line that failed in fields",
                ok={201: Cart, 200: Cart},
                body=CartIn,
                params=[SALE_ID, IDEMPOTENCY, ADMISSION],
            )
        },
        "/v1/carts/{cart_id}": {
            "get": _op("A cart of this user, its lines as they are now", ok={200: Cart}, params=[CART_ID, USER_QUERY])
        },
        "/v1/carts/{cart_id}/confirm": {
            "post": _op(
                "Confirm every line on payment, or none (410 once a line ran out)",
                ok={200: Cart},
                body=ConfirmIn,
                params=[CART_ID],
            )
        },
        "/v1/carts/{cart_id}/cancel": {
            "post": _op("Release every held line back to stock", ok={200: Cart}, body=CancelIn, params=[CART_ID])
        },
        "/v1/reservations/{rid}/extend": {
            "post": _op(
                "Extend a live hold (409 extension_limit past the sale's max_extensions or max_extension_seconds,"
                " 410 once it ran out)",
                ok={200: Reservation},
                body=ExtendIn,
                params=[RID],
            )
        },
    }
    ticket = _path("ticket", "^[A-Za-z0-9_-]{22}$")
    paths["/v1/sales/{sale_id}/queue"] = {
        "post": _op(
            "Join the sale's waiting room: 201 a new ticket, 200 the user's ticket again",
            ok={201: Ticket, 200: Ticket},
            body=QueueIn,
            params=[SALE_ID],
        )
    }
    paths["/v1/sales/{sale_id}/queue/{ticket}"] = {
        "get": _op(
            "Where the ticket stands; polling keeps its place. Admitted: the Admission-Token to reserve with",
            ok={200: Ticket},
            params=[SALE_ID, ticket, USER_QUERY],
        )
    }
    paths["/v1/sales/{sale_id}/reservations"]["post"]["parameters"].append(ADMISSION)
    paths["/v1/sales/{sale_id}/reservations"]["get"] = _op(
        "A user's reservations in the sale, newest first (every status)",
        ok={200: ReservationList},
        params=[SALE_ID, USER_QUERY, LIMIT],
    )
    for extra in (_admin_paths(), _monitor_paths(), _webhook_paths()):  # merged per path: GET /v1/sales joins its POST
        for path, operations in extra.items():
            paths.setdefault(path, {}).update(operations)
    _link(paths)
    _declare_rules(paths)
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "flashsale",
            "version": __version__,
            "description": "Flash-sale checkout and reservations. "
            "The reference, with the error codes and the invariants, is at /docs (docs/api.md).",
        },
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return msgspec.json.encode(doc)

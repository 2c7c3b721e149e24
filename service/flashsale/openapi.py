"""The OpenAPI 3.1 document, its schemas generated from the same structs the API decodes and
encodes with, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__
from .schemas import CancelIn, ConfirmIn, Error, Health, Reservation, ReserveIn, SaleIn, SaleOut

REF = "#/components/schemas/{name}"


def _ref(t: type) -> dict[str, Any]:
    return {"$ref": REF.format(name=t.__name__)}


def _content(t: type) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(t)}}}


def _op(summary: str, *, ok: dict[int, type], role: str | None = "storefront", body: type | None = None,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {str(code): {"description": t.__name__, **_content(t)} for code, t in ok.items()},
    }
    op["responses"]["default"] = {"description": "an error; see the contract's table of codes", **_content(Error)}
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
RID = _path("rid", "^[A-Za-z0-9_-]{1,64}\\.[A-Za-z0-9_-]{22}$")
USER_QUERY = {"name": "user_id", "in": "query", "required": True,
              "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\x00-\\x1f\\x7f]+$"}}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "required": False,
               "description": "Retries with the same key and body return the same reservation. "
                              "Scoped to (sale, user_id, key); kept as long as the sale's data.",
               "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"}}


def _admin_paths() -> dict[str, Any]:
    """Paths of admin.ROUTES."""
    return {}


def _monitor_paths() -> dict[str, Any]:
    """Paths of monitor.ROUTES."""
    return {}


def document() -> bytes:
    types = [SaleIn, SaleOut, ReserveIn, ConfirmIn, CancelIn, Reservation, Error, Health]
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    paths: dict[str, Any] = {
        "/healthz": {"get": _op("The process is up", ok={200: Health}, role=None)},
        "/readyz": {"get": _op("Redis and Postgres are reachable", ok={200: Health, 503: Health}, role=None)},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        "/v1/sales": {"post": _op("Create a sale; its stock is in Redis before the 201", ok={201: SaleOut},
                                  role="ops", body=SaleIn)},
        "/v1/sales/{sale_id}": {"get": _op("A sale with its live numbers", ok={200: SaleOut}, params=[SALE_ID])},
        "/v1/sales/{sale_id}/reservations": {"post": _op(
            "Reserve units: 201 a new hold, 200 the same hold again for a retried Idempotency-Key",
            ok={201: Reservation, 200: Reservation}, body=ReserveIn, params=[SALE_ID, IDEMPOTENCY])},
        "/v1/reservations/{rid}": {"get": _op("A reservation of this user", ok={200: Reservation},
                                              params=[RID, USER_QUERY])},
        "/v1/reservations/{rid}/confirm": {"post": _op("Confirm on payment (410 once the hold ran out)",
                                                       ok={200: Reservation}, body=ConfirmIn, params=[RID])},
        "/v1/reservations/{rid}/cancel": {"post": _op("Release the units back to stock",
                                                      ok={200: Reservation}, body=CancelIn, params=[RID])},
        **_admin_paths(),
        **_monitor_paths(),
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "flashsale", "version": __version__,
                 "description": "Flash-sale checkout and reservations. See CONTRACT.md for the invariants."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return msgspec.json.encode(doc)

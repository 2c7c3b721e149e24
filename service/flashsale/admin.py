"""Ops endpoints that run a sale: list, change before start, pause, resume, end, restock, and its
waiting room's admissions a second or its close."""

from __future__ import annotations

from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .sales import Sales
from .schemas import QueuePatch, RestockIn, SalePatch
from .web import authorize, body, json, limit, slug

DEFAULT_LIMIT = 50
MAX_LIMIT = 200


def _sales(request: Request) -> Sales:
    """The sales service, once the caller has shown an ops key."""
    return authorize(request, "ops").sales


async def list_sales(request: Request) -> Response:
    sales = _sales(request)
    return json(await sales.page(limit(request, DEFAULT_LIMIT, MAX_LIMIT), request.query_params.get("cursor") or None))


async def update_sale(request: Request) -> Response:
    sales = _sales(request)
    sale_id = slug(request, "sale_id")
    return json(await sales.update(sale_id, await body(request, SalePatch)))


def _control(action: Literal["pause", "resume", "end"]) -> Route:
    async def handle(request: Request) -> Response:
        sales = _sales(request)
        sale_id = slug(request, "sale_id")
        step = {"pause": sales.pause, "resume": sales.resume, "end": sales.end}[action]
        return json(await step(sale_id))

    handle.__name__ = f"{action}_sale"
    return Route(f"/v1/sales/{{sale_id}}/{action}", handle, methods=["POST"])


async def restock(request: Request) -> Response:
    sales = _sales(request)
    sale_id, sku = slug(request, "sale_id"), slug(request, "sku")
    ask = await body(request, RestockIn)
    return json(await sales.restock(sale_id, sku, ask.quantity))


async def update_queue(request: Request) -> Response:
    room = authorize(request, "ops").room
    ask = await body(request, QueuePatch)
    return json(await room.set_rate(slug(request, "sale_id"), ask.admit_per_s))


async def close_queue(request: Request) -> Response:
    room = authorize(request, "ops").room
    return json(await room.close(slug(request, "sale_id")))


ROUTES: list[BaseRoute] = [
    Route("/v1/sales", list_sales, methods=["GET"]),
    Route("/v1/sales/{sale_id}", update_sale, methods=["PATCH"]),
    _control("pause"),
    _control("resume"),
    _control("end"),
    Route("/v1/sales/{sale_id}/items/{sku}/restock", restock, methods=["POST"]),
    Route("/v1/sales/{sale_id}/queue", update_queue, methods=["PATCH"]),
    Route("/v1/sales/{sale_id}/queue", close_queue, methods=["DELETE"]),
]

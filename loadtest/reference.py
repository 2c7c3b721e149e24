"""Reference apps the benchmark compares the service with, run under the same uvicorn settings.

``ceiling``: the cheapest Starlette JSON route there is; nothing on this stack answers faster.
Its POST route reads and parses a JSON body and answers a fixed 409: what the same stack pays
for a sold-out answer with no decision at all.

``pg_stock``: the common design for a sale: stock as a Postgres row, decremented with a
conditional UPDATE, and the order INSERTed in the same transaction:

    UPDATE refbench_stock SET n = n - $q WHERE sku = $s AND n >= $q RETURNING n
    INSERT INTO refbench_orders ...

Correct (no oversell), but every buyer of one item queues on that row's lock.

    uvicorn loadtest.reference:ceiling          uvicorn loadtest.reference:pg_stock  (DATABASE_URL)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS refbench_stock (sku text PRIMARY KEY, n bigint NOT NULL CHECK (n >= 0));
CREATE TABLE IF NOT EXISTS refbench_orders (
    id bigserial PRIMARY KEY, sku text NOT NULL, user_id text NOT NULL, quantity integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


async def ping(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def refuse(request: Request) -> JSONResponse:
    json.loads(await request.body())
    return JSONResponse({"error": {"code": "sold_out", "message": "sold out", "available": 0}}, 409)


ceiling = Starlette(
    routes=[Route("/ping", ping, methods=["GET"]), Route("/v1/sales/{sale_id}/reservations", refuse, methods=["POST"])]
)


async def reserve(request: Request) -> JSONResponse:
    try:
        ask = json.loads(await request.body())
        user, sku, qty = str(ask["user_id"]), str(ask["sku"]), int(ask.get("quantity", 1))
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": {"code": "invalid_request"}}, 422)
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn, conn.transaction():
        left = await conn.fetchval(
            "UPDATE refbench_stock SET n = n - $2 WHERE sku = $1 AND n >= $2 RETURNING n", sku, qty
        )
        if left is None:
            return JSONResponse({"error": {"code": "sold_out"}}, 409)
        order = await conn.fetchval(
            "INSERT INTO refbench_orders (sku, user_id, quantity) VALUES ($1, $2, $3) RETURNING id", sku, user, qty
        )
    return JSONResponse({"order_id": order, "sku": sku, "user_id": user, "quantity": qty, "left": left}, 201)


@contextlib.asynccontextmanager
async def _pool(app: Starlette) -> AsyncIterator[None]:
    pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=1, max_size=int(os.environ.get("REFBENCH_DB_POOL", "16"))
    )
    assert pool is not None
    async with pool.acquire() as conn:
        await conn.execute(SCHEMA)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


pg_stock = Starlette(
    routes=[Route("/reserve", reserve, methods=["POST"]), Route("/ping", ping, methods=["GET"])], lifespan=_pool
)

"""The HTTP API: routes, the services they share, and the app's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from redis.exceptions import RedisClusterException, RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from . import (
    admin,
    clients,
    connection,
    db,
    docs,
    hot,
    invalidation,
    metrics,
    monitor,
    openapi,
    sweeper,
    waiting,
    webhooks,
)
from .auth import KeyRing
from .budgets import Budgets
from .carts import Carts
from .coalesce import Coalescer
from .errors import ApiError, store_unavailable
from .keys import Keys
from .middleware import Edge
from .polls import Polls
from .polls import run as polls_loop
from .reservations import Reservations
from .sales import Sales
from .schemas import CancelIn, CartIn, ConfirmIn, ExtendIn, Health, ReservationList, SaleIn
from .scripts import Scripts
from .settings import Settings
from .shards import Mover, Routes
from .tally import Tally
from .verdicts import Verdicts
from .waiting import Room, Tokens
from .web import Services, authorize, body, json, limit, services, slug, user_id, valid_idempotency_key

log = logging.getLogger("flashsale.api")


async def create_sale(request: Request) -> Response:
    svc = authorize(request, "ops")
    sale = await svc.sales.create(await body(request, SaleIn))
    return json(sale, 201)


async def user_reservations(request: Request) -> Response:
    svc = authorize(request, "storefront")
    sale_id, user = slug(request, "sale_id"), user_id(request)
    found = await svc.reservations.of_user(sale_id, user, limit(request, 20, 100))
    return json(ReservationList(reservations=found))


async def get_reservation(request: Request) -> Response:
    svc = authorize(request, "storefront")
    return json(await svc.reservations.get(request.path_params["rid"], user_id(request)))


async def confirm(request: Request) -> Response:
    svc = authorize(request, "storefront")
    ask = await body(request, ConfirmIn)
    return json(await svc.reservations.settle(request.path_params["rid"], ask.user_id, "confirm", ask.payment_ref))


async def cancel(request: Request) -> Response:
    svc = authorize(request, "storefront")
    ask = await body(request, CancelIn)
    return json(await svc.reservations.settle(request.path_params["rid"], ask.user_id, "cancel"))


async def extend(request: Request) -> Response:
    svc = authorize(request, "storefront")
    ask = await body(request, ExtendIn)
    return json(await svc.reservations.extend(request.path_params["rid"], ask.user_id, ask.seconds))


async def create_cart(request: Request) -> Response:
    svc = authorize(request, "storefront")
    sale_id = slug(request, "sale_id")
    key = valid_idempotency_key(request.headers.get("idempotency-key"))
    ask = await body(request, CartIn)
    client = clients.keys_of(ask.client)
    cart, created = await svc.carts.create(sale_id, ask, key, request.headers.get("admission-token"), client)
    return json(cart, 201 if created else 200)


async def get_cart(request: Request) -> Response:
    svc = authorize(request, "storefront")
    return json(await svc.carts.get(request.path_params["cart_id"], user_id(request)))


async def confirm_cart(request: Request) -> Response:
    svc = authorize(request, "storefront")
    ask = await body(request, ConfirmIn)
    return json(await svc.carts.settle(request.path_params["cart_id"], ask.user_id, "confirm", ask.payment_ref))


async def cancel_cart(request: Request) -> Response:
    svc = authorize(request, "storefront")
    ask = await body(request, CancelIn)
    return json(await svc.carts.settle(request.path_params["cart_id"], ask.user_id, "cancel"))


async def healthz(request: Request) -> Response:
    return json(Health(status="ok"))


async def readyz(request: Request) -> Response:
    svc = services(request)
    checks: dict[str, str] = {}

    async def check(name: str, probe: Callable[[], Awaitable[object]]) -> None:
        try:
            await asyncio.wait_for(probe(), 1.0)
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready", and says why
            checks[name] = f"unreachable: {type(exc).__name__}"

    await asyncio.gather(check("redis", svc.redis.ping), check("postgres", lambda: svc.pool.fetchval("SELECT 1")))
    ok = all(v == "ok" for v in checks.values())
    return json(Health(status="ok" if ok else "unavailable", checks=checks), 200 if ok else 503)


async def openapi_json(request: Request) -> Response:
    return Response(request.app.state.openapi, media_type="application/json")


ROUTES: list[BaseRoute] = [
    *hot.ROUTES,  # what a crowd sends by the thousand, answered by the edge middleware itself
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/v1/sales", create_sale, methods=["POST"]),
    Route("/v1/sales/{sale_id}/reservations", user_reservations, methods=["GET"]),
    Route("/v1/reservations/{rid}", get_reservation, methods=["GET"]),
    Route("/v1/reservations/{rid}/confirm", confirm, methods=["POST"]),
    Route("/v1/reservations/{rid}/cancel", cancel, methods=["POST"]),
    Route("/v1/reservations/{rid}/extend", extend, methods=["POST"]),
    Route("/v1/sales/{sale_id}/carts", create_cart, methods=["POST"]),
    Route("/v1/carts/{cart_id}", get_cart, methods=["GET"]),
    Route("/v1/carts/{cart_id}/confirm", confirm_cart, methods=["POST"]),
    Route("/v1/carts/{cart_id}/cancel", cancel_cart, methods=["POST"]),
    *admin.ROUTES,
    *webhooks.ROUTES,
    *monitor.ROUTES,
    *docs.ROUTES,
]


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


def allowed(request: Request) -> str:
    """Every method of every route on this path. Starlette's 405 names only the first route's,
    and some paths have routes in two modules (POST /v1/sales here, GET in admin)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        response = ApiError("method_not_allowed", f"{request.method} is not allowed here").response()
        response.headers.update(exc.headers or {})  # keeps Allow, as RFC 9110 asks
        response.headers["Allow"] = allowed(request) or response.headers.get("Allow", "")
        return response
    return ApiError("not_found", f"no endpoint {request.url.path}").response()


async def on_redis_error(request: Request, exc: Exception) -> Response:
    return store_unavailable(exc).response()


# Postgres unreachable, starting, shutting down, out of connections, or a query cut off: 503.
POSTGRES_DOWN: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.QueryCanceledError,
    ConnectionError,
    TimeoutError,
)


async def on_postgres_error(request: Request, exc: Exception) -> Response:
    """Postgres down or its connection lost under an endpoint that reads it (webhooks): 503."""
    log.warning("postgres unavailable: %r", exc)
    return ApiError(
        "unavailable", "the database is unreachable; retry after the given seconds", retry_after=1
    ).response()


async def on_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return ApiError("internal", "internal error; it has been logged").response()


def create_app(settings: Settings) -> Starlette:
    settings.require_servers()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = await connection.connect(settings.redis_url, settings.redis_pool_size)
        # Its own connection, named so that ops (and the tests) can find it in CLIENT LIST.
        listener = await connection.connect(settings.redis_url, client_name=f"flashsale-changes:{settings.key_prefix}")
        pool = await db.create_pool(settings.database_url, settings.db_pool_size)
        keys = Keys(settings.key_prefix)
        scripts = Scripts.load(redis, settings.lua_dir, Coalescer(redis))
        verdicts = Verdicts(settings.verdict_ttl_ms / 1000)
        tally = Tally(keys, scripts)
        tokens = Tokens(settings.signing_secret)
        sales = Sales(redis, keys, scripts)
        room = Room(redis, keys, scripts, tokens)
        polls = Polls(room, redis, keys)
        routes = Routes(redis, keys)
        app.state.services = Services(
            settings=settings,
            redis=redis,
            pool=pool,
            keyring=KeyRing.build(settings.ops_keys, settings.storefront_keys),
            sales=sales,
            reservations=Reservations(
                redis,
                keys,
                scripts,
                settings,
                verdicts,
                tally,
                routes,
                Mover(redis, keys, scripts),
                tokens,
                Budgets(redis, keys, scripts),
            ),
            room=room,
            polls=polls,
            carts=Carts(redis, keys, scripts, settings, routes, tokens),
        )
        app.state.openapi = openapi.document()
        app.state.monitor = monitor.Monitor(redis, pool, keys, scripts, tally)
        stop = asyncio.Event()
        background = [
            asyncio.create_task(sweeper.run(redis, keys, scripts, settings, stop), name="sweeper"),
            asyncio.create_task(invalidation.listen(listener, keys.changes, verdicts, stop), name="invalidation"),
            asyncio.create_task(tally.run(settings.tally_interval_ms / 1000, stop), name="tally"),
            asyncio.create_task(waiting.run(room, sales, stop), name="waiting-room"),
            asyncio.create_task(polls_loop(polls, stop), name="polls"),
        ]
        try:
            yield
        finally:
            stop.set()
            # Every loop's end awaited, and the clients closed below whatever one of them raised.
            for task, outcome in zip(
                background, await asyncio.gather(*background, return_exceptions=True), strict=True
            ):
                if isinstance(outcome, BaseException):
                    log.error("background task %s ended with %r", task.get_name(), outcome)
            await tally.flush()  # counts of the last requests, after the loops stopped taking more
            metrics.flush()
            await scripts.calls.close()
            await app.state.monitor.close()
            await pool.close()
            await listener.aclose()
            await redis.aclose()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={
            ApiError: on_api_error,
            RedisError: on_redis_error,
            RedisClusterException: on_redis_error,
            **dict.fromkeys(POSTGRES_DOWN, on_postgres_error),
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    app.add_middleware(
        Edge, max_in_flight=settings.max_in_flight, log_sample=settings.access_log_sample, hot=hot.ROUTES
    )
    return app


def app_from_env() -> Starlette:
    """The uvicorn factory: every worker process reads the same environment once."""
    from .logs import setup_logging

    settings = Settings.from_env()
    setup_logging(settings.log_level)
    return create_app(settings)

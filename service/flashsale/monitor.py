"""Ops endpoints that watch sales: progress, its live stream, the dashboard and /metrics.

A progress document is a few Redis reads (one script reading the sale and its item hashes
atomically, the backlogs of the persister and the webhooks), two COUNTs in Postgres (rows, webhook
deliveries not done) and a cached count of persister heartbeats. Rates come from a ring per
sale of the counters as they were about once a second, kept in this process; the counters live
in Redis, so every API process computes the same rates.

Streams of one sale share one ticker: it computes the document once a second, encodes it
once, and every stream of that sale sends those same bytes. The ticker starts with the first
stream and stops when the last one closes. A slow client skips to the newest document.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from base64 import b64encode
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

import asyncpg
import msgspec
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from . import connection, metrics, shards, waiting
from .audit import conservation, drift
from .connection import Client
from .errors import ApiError
from .keys import GROUP, WEBHOOKS, WORKER_TTL_MS, Keys
from .queue import backlogs
from .sales import instant, now_ms, sale_status
from .schemas import (
    Error,
    ErrorBody,
    ItemOut,
    ItemProgress,
    Rates,
    RateWindows,
    SaleDoc,
    SaleProgress,
    SaleStatus,
    WebhookCounts,
    encoder,
)
from .scripts import Scripts
from .tally import Tally
from .web import authorize, slug

log = logging.getLogger("flashsale.monitor")

TICK_S = 1.0
WINDOWS_S = (1, 10, 60)
RING = 72  # snapshots kept per sale, about one a second: a little over the longest window
MIN_GAP_MS = 900  # a snapshot closer than this to the last one kept is used, not kept
FORGET_S = 300.0  # the ring of a sale nobody asked about for this long is dropped
SNAPSHOT_TRIES = 5
PERSISTED_TIMEOUT_S = 1.0
METRICS_SALES = 100  # /metrics reports the newest this many sales that have not ended
COUNT_PERSISTED = "SELECT count(*) FROM reservations WHERE sale_id = $1"
COUNT_WEBHOOKS = (
    "SELECT count(*) FILTER (WHERE status = 'pending') AS pending, count(*) FILTER (WHERE status = 'dead') AS dead"
    " FROM webhook_deliveries WHERE sale_id = $1 AND status <> 'delivered'"
)
STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Counters:
    at_ms: int
    reservations: int
    attempts: int
    rejected: dict[str, int]
    queue: dict[str, int] = field(default_factory=dict)  # the waiting room's counts (QUEUE_RATES)


QUEUE_RATES = ("joined", "admitted", "expired", "closed_told")


def _rates(older: list[Counters], now: Counters, window_s: int) -> Rates:
    if not older:
        return Rates(window_s=0.0, reservations=0.0, attempts=0.0, rejected=dict.fromkeys(now.rejected, 0.0))
    base = min(older, key=lambda c: abs(now.at_ms - c.at_ms - window_s * 1000))
    span = (now.at_ms - base.at_ms) / 1000

    def per_s(new: int, old: int) -> float:
        return round(max(0, new - old) / span, 3)  # max: the counters of a re-created sale start over

    return Rates(
        window_s=round(span, 3),
        reservations=per_s(now.reservations, base.reservations),
        attempts=per_s(now.attempts, base.attempts),
        rejected={code: per_s(n, base.rejected.get(code, 0)) for code, n in now.rejected.items()},
        queue={name: per_s(n, base.queue.get(name, 0)) for name, n in now.queue.items()},
    )


def _item(sale_id: str, sku: str, name: str, h: Mapping[str, Any]) -> ItemProgress:
    def n(field: str) -> int:
        return int(h.get(field) or 0)

    return ItemProgress(
        sku=sku,
        name=name,
        stock_total=n("stock_total"),
        available=n("available"),
        held=n("held"),
        confirmed=n("confirmed"),
        released=n("cancelled") + n("expired"),
        cancelled=n("cancelled"),
        expired=n("expired"),
        reservations=n("reservations"),
        attempts=n("attempts"),
        rejected={f[4:]: int(v) for f, v in sorted(h.items()) if f.startswith("rej:")},
        # A sharded item's comes summed over its shards (shards.combine).
        drift=n("drift") if "drift" in h else drift(n("stock_total"), n("available"), n("held"), n("confirmed")),
    )


def _event(kind: str, body: msgspec.Struct, version: int) -> bytes:
    return ServerSentEvent(data=encoder.encode(body).decode(), event=kind, id=str(version), sep="\n").encode()


class Watch:
    """One sale and the streams watching it; the ticker publishes, each stream takes the newest."""

    def __init__(self, sale_id: str) -> None:
        self.sale_id = sale_id
        self.subscribers = 0
        self.version = 0
        self.event = b""
        self.stop = asyncio.Event()
        self._changed = asyncio.Condition()

    async def publish(self, event: bytes) -> None:
        async with self._changed:
            self.event, self.version = event, self.version + 1
            self._changed.notify_all()

    async def next(self, seen: int) -> tuple[bytes, int]:
        """The newest event after version ``seen``, waiting for it if need be."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version > seen)
            return self.event, self.version


class Monitor:
    def __init__(
        self, redis: Client, pool: asyncpg.Pool, keys: Keys, scripts: Scripts, tally: Tally | None = None
    ) -> None:
        self.redis, self.pool, self.keys, self.scripts = redis, pool, keys, scripts
        self.tally = tally  # this process's answers from memory, added to the counters before a read
        self.computed = 0  # progress documents computed by this process
        self._rings: dict[str, deque[Counters]] = {}
        self._asked: dict[str, float] = {}
        self._watches: dict[str, Watch] = {}
        self._tickers: set[asyncio.Task[None]] = set()
        self._postgres_ok = True

    async def progress(self, sale_id: str) -> SaleProgress:
        if self.tally is not None:
            await self.tally.flush()
        at, status, items, audited, slots = await self._snapshot(sale_id)
        (queue, untaken), persisted, hooks, workers, room = await asyncio.gather(
            backlogs(self.redis, self.keys, sale_id, slots, (GROUP, WEBHOOKS)),
            self._persisted(sale_id),
            self._webhooks(sale_id),
            self.workers_alive(),
            waiting.stats(self.scripts, self.keys, sale_id),
        )
        rejected: dict[str, int] = {}
        for i in items:
            for code, n in i.rejected.items():
                rejected[code] = rejected.get(code, 0) + n
        counters = Counters(
            at_ms=at,
            reservations=sum(i.reservations for i in items),
            attempts=sum(i.attempts for i in items),
            rejected=rejected,
            queue={} if room is None else {f: getattr(room, f) for f in QUEUE_RATES},
        )
        self.computed += 1
        return SaleProgress(
            sale_id=sale_id,
            status=status,
            at=instant(at),
            items=items,
            persisted=persisted,
            queue_backlog=queue.events,
            oldest_unpersisted_age_s=round(queue.oldest_age_s, 3),
            dead_lettered=queue.dead_lettered,
            workers_alive=workers,
            rates=self._remember(sale_id, counters),
            drift=[
                *(
                    d
                    for i in items
                    if (d := conservation(i.sku, i.stock_total, i.available, i.held, i.confirmed, i.drift))
                ),
                *(d for d in audited if d.startswith("postgres: ")),
            ],
            queue=room,
            webhooks=hooks,
            webhooks_backlog=untaken.events,
        )

    async def _snapshot(self, sale_id: str) -> tuple[int, SaleStatus, list[ItemProgress], list[str], list[str]]:
        """The sale and all its items in one atomic read (``lua/progress_read.lua``), so the
        numbers agree with each other. The items to read come from the document read just
        before: if an update changed it in between, read again."""
        k = self.keys
        for _ in range(SNAPSHOT_TRIES):
            raw = cast(str | None, await self.redis.hget(k.sale(sale_id), "doc"))
            if raw is None:
                raise ApiError("not_found", f"no sale {sale_id!r}")
            doc = msgspec.json.decode(raw, type=SaleDoc)
            now, (state, starts, ends, current, audited), *flat = await self.scripts.progress_read(
                keys=[k.sale(sale_id), *(k.item(sale_id, i.sku) for i in doc.items)], args=[]
            )
            if current != raw:
                continue
            hashes = [dict(zip(f[::2], f[1::2], strict=True)) for f in flat]
            whole = await shards.whole_items(
                self.redis, k, doc, {i.sku: h for i, h in zip(doc.items, hashes, strict=True)}
            )
            items = [_item(sale_id, i.sku, i.name, whole[i.sku]) for i in doc.items]
            shown = [
                ItemOut(
                    sku=i.sku,
                    name=i.name,
                    price_cents=0,
                    stock_total=i.stock_total,
                    available=i.available,
                    held=i.held,
                    per_user_limit=1,
                )
                for i in items
            ]
            audit = msgspec.json.decode(audited or "[]", type=list[str])
            return now, sale_status(state, int(starts), int(ends), now, shown), items, audit, doc.slots
        raise ApiError("unavailable", "the sale kept changing while it was read", retry_after=1)

    async def _persisted(self, sale_id: str) -> int | None:
        try:
            n: int = await asyncio.wait_for(self.pool.fetchval(COUNT_PERSISTED, sale_id), PERSISTED_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._postgres_ok:
                log.warning("progress: postgres did not answer, persisted is null: %r", exc)
            self._postgres_ok = False
            return None
        self._postgres_ok = True
        return n

    async def _webhooks(self, sale_id: str) -> WebhookCounts | None:
        try:
            row = await asyncio.wait_for(self.pool.fetchrow(COUNT_WEBHOOKS, sale_id), PERSISTED_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return None  # _persisted logs it
        assert row is not None
        return WebhookCounts(pending=row["pending"], dead=row["dead"])

    async def workers_alive(self) -> int:
        """Persisters whose heartbeat is fresh, from one sorted set (clocks kept within seconds)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(self.keys.workers, "-inf", f"({int(time.time() * 1000) - WORKER_TTL_MS}")
        pipe.zcard(self.keys.workers)
        _, alive = await pipe.execute()
        return int(alive)

    def _remember(self, sale_id: str, now: Counters) -> RateWindows:
        """Rates against the snapshots kept so far; keeps this one if a second has passed."""
        ring = self._rings.setdefault(sale_id, deque(maxlen=RING))
        self._asked[sale_id] = time.monotonic()
        older = [c for c in ring if c.at_ms < now.at_ms]
        rates = RateWindows(*(_rates(older, now, w) for w in WINDOWS_S))
        if not ring or now.at_ms - ring[-1].at_ms >= MIN_GAP_MS:
            ring.append(now)
        for stale in [s for s, t in self._asked.items() if time.monotonic() - t > FORGET_S]:
            del self._asked[stale], self._rings[stale]
        return rates

    @contextlib.asynccontextmanager
    async def watch(self, sale_id: str) -> AsyncIterator[Watch]:
        """Joins the sale's watch, starting its ticker if this is the first subscriber."""
        watch = self._watches.get(sale_id)
        if watch is None:
            watch = self._watches[sale_id] = Watch(sale_id)
            ticker = asyncio.create_task(self._tick(watch), name=f"progress-ticker:{sale_id}")
            self._tickers.add(ticker)
            ticker.add_done_callback(self._tickers.discard)
        watch.subscribers += 1
        try:
            yield watch
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0:
                watch.stop.set()
                if self._watches.get(sale_id) is watch:
                    del self._watches[sale_id]

    async def events(self, sale_id: str) -> AsyncGenerator[bytes, None]:
        async with self.watch(sale_id) as watch:
            seen = 0
            while True:
                event, seen = await watch.next(seen)
                yield event

    async def _tick(self, watch: Watch) -> None:
        """Stopped by ``watch.stop``, not by cancellation: a cancel landing inside a Redis call
        could be swallowed there."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not watch.stop.is_set():
            version = watch.version + 1
            try:
                event = _event("progress", await self.progress(watch.sale_id), version)
            except ApiError as exc:
                event = _event("error", Error(ErrorBody(code=exc.code, message=exc.message)), version)
            except Exception as exc:  # Redis down, or a bug: say so and keep ticking
                if not isinstance(exc, RedisError | OSError):
                    log.exception("progress ticker failed", extra={"sale_id": watch.sale_id})
                body = ErrorBody(code="unavailable", message=f"progress could not be read: {type(exc).__name__}")
                event = _event("error", Error(body), version)
            await watch.publish(event)
            due = max(due + TICK_S, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.stop.wait(), due - loop.time())

    def watching(self) -> dict[str, int]:
        """Sale id -> open streams, for this process."""
        return {s: w.subscribers for s, w in self._watches.items()}

    async def live_sales(self, limit: int = METRICS_SALES) -> list[str]:
        """The newest ``limit`` sales that have not ended."""
        sale_ids = cast(list[str], await self.redis.zrevrange(self.keys.sales, 0, limit - 1))
        pipe = self.redis.pipeline(transaction=False)
        for s in sale_ids:
            pipe.hmget(self.keys.sale(s), "state", "ends_ms")
        now = now_ms()
        return [
            s
            for s, (state, ends) in zip(sale_ids, await pipe.execute(), strict=True)
            if state is not None and state != "ended" and now < int(ends or 0)
        ]

    async def close(self) -> None:
        for watch in self._watches.values():
            watch.stop.set()
        if self._tickers:
            _, late = await asyncio.wait(self._tickers, timeout=5)
            for ticker in late:
                ticker.cancel()


def _monitor(request: Request) -> Monitor:
    authorize(request, "ops")
    monitor: Monitor = request.app.state.monitor
    return monitor


async def progress(request: Request) -> Response:
    monitor = _monitor(request)
    doc = await monitor.progress(slug(request, "sale_id"))
    return Response(encoder.encode(doc), media_type="application/json")


async def progress_stream(request: Request) -> Response:
    monitor = _monitor(request)
    sale_id = slug(request, "sale_id")
    if not await monitor.redis.exists(monitor.keys.sale(sale_id)):
        raise ApiError("not_found", f"no sale {sale_id!r}")
    return EventSourceResponse(monitor.events(sale_id), sep="\n", ping=15, send_timeout=30)


async def prometheus(request: Request) -> Response:
    monitor = _monitor(request)
    sales: list[SaleProgress] = []
    workers: int | None = None
    try:
        for sale_id in await monitor.live_sales():
            with contextlib.suppress(ApiError):  # ended or removed since it was listed
                sales.append(await monitor.progress(sale_id))
        workers = await monitor.workers_alive()
    except connection.ERRORS as exc:  # still answer with this process's numbers, and redis_up 0
        log.warning("metrics: redis unavailable: %r", exc)
        sales = []
    metrics.flush()  # on the loop, where requests are counted
    body = await asyncio.to_thread(metrics.exposition, sales, workers)
    return Response(body, media_type=metrics.CONTENT_TYPE)


@cache
def _dashboard() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets it run its own inline script and
    style and talk to this origin only."""
    page = (STATIC / "dashboard.html").read_bytes()

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", page, re.S)
        return " ".join(f"'sha256-{b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)

    csp = (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, csp


async def dashboard(request: Request) -> Response:
    page, csp = _dashboard()
    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


ROUTES: list[BaseRoute] = [
    Route("/v1/sales/{sale_id}/progress", progress, methods=["GET"]),
    Route("/v1/sales/{sale_id}/progress/stream", progress_stream, methods=["GET"]),
    Route("/dashboard", dashboard, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
]

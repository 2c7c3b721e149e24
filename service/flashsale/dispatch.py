"""Sends the webhooks: the events of every sale's stream, read by a consumer group of their own
(``webhooks``, beside the persister's), become one delivery row per subscribed endpoint in
Postgres, and are then sent from there until answered 2xx.

The rows are an outbox. An entry is XACKed only once its rows are committed, and a row is marked
delivered only once its endpoint said 2xx: every event is delivered at least once, through any
crash (a row being sent has a lease; if its sender dies, the lease runs out and another sends it).
A failed try is tried again after ``webhook_retry_s`` (with jitter), then dead-lettered. An endpoint
that is slow or down holds up only its own rows: it has at most ``webhook_concurrency`` in flight per worker,
and the reading never waits for a send, so neither persistence nor another endpoint slows down.

``sale.started``, ``sale.sold_out`` and ``sale.ended`` have no entry of their own: they are seen in
the sale's status, read once a second, and have one id per sale, so a process that restarts, or
two that both see it, deliver them once. ``reservation.expired`` comes from the entry the expiry
script writes in the same step as it puts the units back: it is sent when they are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import asyncpg
import httpx
import msgspec

from . import connection
from .connection import Client
from .errors import ApiError
from .keys import WEBHOOKS, Keys
from .queue import Entry, active_streams, claim_idle, read_new
from .sales import Sales, instant, now_ms
from .scripts import Scripts
from .settings import Settings
from .signing import headers, signing_secrets

log = logging.getLogger("flashsale.webhooks")

RESERVATION_EVENTS = {
    "reserve": "reservation.created",
    "confirmed": "reservation.confirmed",
    "released": "reservation.released",
    "expired": "reservation.expired",
}
POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)  # the data itself: retrying won't help
SKIPPED: tuple[type[Exception], ...] = (ApiError, *connection.ERRORS)  # a sale the watch passes over this time
PG_ERRORS: tuple[type[Exception], ...] = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
LEASE_S = 30.0  # past the send's timeout: a row this long "being sent" lost its sender
IDLE_S = 0.1
ERROR_CHARS = 500
SHUTDOWN_GRACE_S = 2.0

# Each event becomes a row for every endpoint subscribed to its type that was registered before
# it happened; a row that is there already (an entry read twice) is left as it is.
ENQUEUE = """
INSERT INTO webhook_deliveries (webhook_id, event_id, sale_id, type, payload, occurred_at)
SELECT w.id, e.event_id, e.sale_id, e.type, e.payload, to_timestamp(e.at_ms / 1000.0)
FROM json_to_recordset($1::json) AS e(event_id text, sale_id text, type text, payload text, at_ms bigint)
JOIN webhooks w ON e.type = ANY (w.events) AND w.created_at <= to_timestamp(e.at_ms / 1000.0)
ON CONFLICT DO NOTHING
"""

# Due rows, leased to this sender (attempts counted as the try begins: the attempt number is the
# lease), at most as many of each endpoint as it has room for here: $1 the endpoints, $2 their room.
CLAIM = """
WITH picked AS MATERIALIZED (
    SELECT due.webhook_id, due.event_id
    FROM unnest($1::text[], $2::int[]) AS room (webhook_id, n)
    CROSS JOIN LATERAL (SELECT x.webhook_id, x.event_id FROM webhook_deliveries x
                        WHERE x.webhook_id = room.webhook_id AND x.status = 'pending' AND x.next_at <= now()
                        ORDER BY x.next_at LIMIT room.n FOR UPDATE SKIP LOCKED) due
)
UPDATE webhook_deliveries d SET next_at = now() + make_interval(secs => $3), attempts = d.attempts + 1
FROM picked, webhooks w
WHERE d.webhook_id = picked.webhook_id AND d.event_id = picked.event_id AND w.id = d.webhook_id
RETURNING d.webhook_id, d.event_id, d.payload, d.attempts, w.url, w.secret, w.previous_secret, w.previous_until
"""

# Delivered rows are kept a week (what was sent, for ops to look at), then dropped; dead ones stay.
PRUNE = """
DELETE FROM webhook_deliveries WHERE status = 'delivered' AND delivered_at < now() - interval '7 days'
"""
PRUNE_EVERY_S = 60.0

# An update from an older try (one that ran past its lease while another took the row) changes nothing.
DELIVERED = """
UPDATE webhook_deliveries SET status = 'delivered', delivered_at = now(), last_error = NULL
WHERE webhook_id = $1 AND event_id = $2 AND status = 'pending' AND attempts = $3
"""

FAILED = """
UPDATE webhook_deliveries
SET status = CASE WHEN $3 THEN 'dead' ELSE 'pending' END, next_at = now() + make_interval(secs => $4), last_error = $5
WHERE webhook_id = $1 AND event_id = $2 AND status = 'pending' AND attempts = $6
"""


class Event(msgspec.Struct):
    type: str
    timestamp: datetime
    data: dict[str, object]


def reservation_event(sale_id: str, fields: dict[str, str]) -> tuple[str, str] | None:
    """(type, body) of the webhook event an entry of the stream is, or None (a sale's document, an
    extension: not events of the contract)."""
    kind = RESERVATION_EVENTS.get(fields.get("type", ""))
    if kind is None:
        return None
    data: dict[str, object] = {
        "reservation_id": fields["rid"],
        "sale_id": sale_id,
        "sku": fields["sku"],
        "user_id": fields["user"],
        "quantity": int(fields["qty"]),
        "status": fields["status"],
        "created_at": instant(fields["created_ms"]),
        "expires_at": instant(fields["expires_ms"]),
    }
    if fields.get("payment_ref"):
        data["payment_ref"] = fields["payment_ref"]
    return kind, msgspec.json.encode(Event(kind, instant(fields["at_ms"]), data)).decode()


def sale_event(kind: str, sale_id: str, status: str, at_ms: int) -> str:
    return msgspec.json.encode(Event(kind, instant(at_ms), {"sale_id": sale_id, "status": status})).decode()


def retry_wait(settings: Settings, attempts: int) -> tuple[bool, float]:
    """(dead, seconds to wait) after the ``attempts``-th try failed."""
    schedule = settings.webhook_retry_s
    if attempts > len(schedule):
        return True, 0.0
    return False, schedule[attempts - 1] * random.uniform(0.8, 1.2)


@dataclass
class Dispatcher:
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    scripts: Scripts
    settings: Settings
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    enqueued: int = 0  # entries this process turned into rows
    sent: int = 0  # deliveries answered 2xx
    _streams: dict[str, str] = field(default_factory=dict)
    _streams_at: float = 0.0
    _claimed_at: float = 0.0
    _seen: set[tuple[str, str]] = field(default_factory=set)  # (sale, sale event) this process enqueued
    _in_flight: dict[str, int] = field(default_factory=dict)  # webhook id -> its deliveries being sent
    _hooks: list[str] = field(default_factory=list)  # the registered webhooks' ids, read once a second
    _hooks_at: float = 0.0
    _pruned_at: float = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        log.info("webhook dispatcher started", extra={"consumer": self.name})
        # No cap on connections: each endpoint has its own (webhook_concurrency), so a slow one
        # never holds a connection another needs.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, limits=limits) as http:
            loops = [self._intake(stop), self._watch_sales(stop), self._send(http, stop)]
            await asyncio.gather(*loops)
        log.info("webhook dispatcher stopped", extra={"consumer": self.name, "sent": self.sent})

    # -- from the streams to rows

    async def _intake(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                await self.intake_step(stop)
                backoff = 0.1
            except Exception as exc:  # Redis, Postgres, or a bug: never the persister's business
                log.warning("webhook intake failed, retrying in %.1fs: %r", backoff, exc)
                self._streams = {}  # found again, their groups made again where missing (NOGROUP)
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 2.0)

    async def intake_step(self, stop: asyncio.Event) -> None:
        if time.monotonic() - self._streams_at > 1.0:
            found = await active_streams(self.redis, self.keys)
            for stream in found.sale_of.keys() - self._streams.keys():
                with contextlib.suppress(*connection.ERRORS):  # BUSYGROUP: made with the stream
                    await self.redis.xgroup_create(stream, WEBHOOKS, id="0")
            self._streams, self._streams_at = found.sale_of, time.monotonic()
        if not self._streams:
            await _wait(stop, self.settings.persist_block_ms / 1000)
            return
        if time.monotonic() - self._claimed_at > self.settings.claim_idle_ms / 2000:
            self._claimed_at = time.monotonic()
            for stream, sale_id in self._streams.items():
                batches = claim_idle(
                    self.redis, stream, WEBHOOKS, self.name, self.settings.claim_idle_ms, self.settings.persist_batch
                )
                async for entries, deleted in batches:
                    if deleted:
                        log.error("entries gone before their webhooks were made", extra={"ids": deleted})
                        await self.redis.xack(stream, WEBHOOKS, *deleted)
                    await self.take(stream, sale_id, entries)
        got = await read_new(
            self.redis,
            WEBHOOKS,
            self.name,
            list(self._streams),
            self.settings.persist_batch,
            self.settings.persist_block_ms,
        )
        for stream, entries in got:
            await self.take(stream, self._streams[stream], entries)

    async def take(self, stream: str, sale_id: str, entries: list[Entry]) -> None:
        """Rows for the entries' events, committed, then the entries acknowledged."""
        if not entries:
            return
        slot = stream.split("{", 1)[1].split("}", 1)[0]  # the sale id, or an extra slot of it
        events: list[dict[str, str | int]] = []
        for entry_id, fields in entries:
            try:
                made = reservation_event(sale_id, fields)
                at = int(fields["at_ms"])
            except (KeyError, ValueError, OverflowError, OSError) as exc:  # the persister dead-letters it
                log.error("entry with no webhook event", extra={"entry_id": entry_id, "error": repr(exc)})
                continue
            if made is not None:
                kind, body = made
                event_id = f"evt_{slot}_{entry_id}"
                events.append({"event_id": event_id, "sale_id": sale_id, "type": kind, "payload": body, "at_ms": at})
        await self.enqueue(events)
        await self.redis.xack(stream, WEBHOOKS, *(e[0] for e in entries))
        self.enqueued += len(events)

    async def enqueue(self, events: list[dict[str, str | int]]) -> None:
        """The events' rows in one statement; if Postgres refuses the data, one by one, and an event
        it still refuses is logged and left out (retrying cannot help, and it would hold up the rest)."""
        if not events:
            return
        try:
            await self.pool.execute(ENQUEUE, msgspec.json.encode(events).decode())
            return
        except POISON:
            if len(events) == 1:
                log.error("webhook event refused by postgres, not sent", extra={"event_id": events[0]["event_id"]})
                return
        for event in events:
            await self.enqueue([event])

    # -- the sale events, from the sales' status

    async def _watch_sales(self, stop: asyncio.Event) -> None:
        sales = Sales(self.redis, self.keys, self.scripts)
        while not stop.is_set():
            try:
                await self.watch_step(sales)
            except Exception as exc:  # Redis, Postgres, or a bug: tried again in a second
                log.warning("webhook sale watch failed, trying again in a second: %r", exc)
            await _wait(stop, 1.0)

    async def watch_step(self, sales: Sales) -> None:
        now = now_ms()
        events: list[dict[str, str | int]] = []
        ended: list[str] = []  # sales whose sale.ended goes into the outbox in this pass
        active = set(cast(list[str], await self.redis.zrange(self.keys.active, 0, -1)))
        for sale_id in active:
            try:
                due, told = await self._sale_events(sales, sale_id, now)
            except SKIPPED as exc:  # gone, or its master down: the others go on
                log.debug("sale skipped by the webhook watch: %r", exc)
                continue
            for kind, at, status in due:
                if (sale_id, kind) in self._seen and (kind != "sale.ended" or told):
                    continue  # enqueued already (sale.ended again until the hash says so)
                event: dict[str, str | int] = {"event_id": f"evt_{sale_id}_{kind}", "sale_id": sale_id, "type": kind}
                event |= {"payload": sale_event(kind, sale_id, status, at), "at_ms": at}
                events.append(event)
                if kind == "sale.ended":
                    ended.append(sale_id)
        if events:
            await self.enqueue(events)
            for sale_id in ended:  # the persister retires a sale only once its end is in the outbox
                await self.redis.hset(self.keys.sale(sale_id), "ended_told", "1")
            self._seen.update((str(e["sale_id"]), str(e["type"])) for e in events)
        self._seen = {(s, k) for s, k in self._seen if s in active}

    async def _sale_events(self, sales: Sales, sale_id: str, now: int) -> tuple[list[tuple[str, int, str]], bool]:
        """The sale events that have happened to a sale, as (type, at ms, status), and whether its
        hash says sale.ended is in the outbox already. Started comes from the times (a dispatcher
        that was down for the whole window still sends it); sold out only once the sale is open."""
        sale = await sales.view(sale_id)
        made, changed, state, told = await self.redis.hmget(
            self.keys.sale(sale_id), "created_ms", "changed_ms", "state", "ended_told"
        )
        # Live from its start, or from its making if it was made with a start gone by; ended
        # when ops ended it (its last change), else at its end.
        starts = max(int(sale.starts_at.timestamp() * 1000), int(made or 0))
        ends = int(changed or now) if state == "ended" else int(sale.ends_at.timestamp() * 1000)
        due: list[tuple[str, int, str]] = []
        if now >= starts and (sale.status != "ended" or ends > starts):
            due.append(("sale.started", starts, sale.status))
        if sale.status == "sold_out" and now >= starts:
            due.append(("sale.sold_out", now, sale.status))
        if sale.status == "ended":
            due.append(("sale.ended", min(now, ends), sale.status))
        return due, bool(told)

    # -- from rows to endpoints

    async def _send(self, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        sending: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                try:
                    claimed = await self.claim()
                except Exception as exc:  # Postgres down, or a bug: tried again shortly
                    log.warning("webhook deliveries could not be read, trying again: %r", exc)
                    claimed = []
                for row in claimed:
                    task = asyncio.create_task(self.deliver(http, row))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
                if not claimed:
                    await _wait(stop, IDLE_S)
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    self._pruned_at = time.monotonic()
                    with contextlib.suppress(*PG_ERRORS):
                        await self.pool.execute(PRUNE)
        finally:  # a grace to finish; the rest are cancelled, and their leases run out
            if sending:
                _, late = await asyncio.wait(sending, timeout=SHUTDOWN_GRACE_S)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    async def claim(self) -> list[asyncpg.Record]:
        if time.monotonic() - self._hooks_at > 1.0:
            self._hooks = [r["id"] for r in await self.pool.fetch("SELECT id FROM webhooks")]
            self._hooks_at = time.monotonic()
        cap = self.settings.webhook_concurrency
        room = {w: cap - self._in_flight.get(w, 0) for w in self._hooks}
        room = {w: n for w, n in room.items() if n > 0}
        if not room:
            return []
        rows = await self.pool.fetch(CLAIM, list(room), list(room.values()), LEASE_S + self.settings.webhook_timeout_s)
        for row in rows:
            self._in_flight[row["webhook_id"]] = self._in_flight.get(row["webhook_id"], 0) + 1
        return rows

    async def deliver(self, http: httpx.AsyncClient, row: asyncpg.Record) -> None:
        wid, event_id, payload, attempt = row["webhook_id"], row["event_id"], row["payload"], row["attempts"]
        try:
            sent = headers(signing_secrets(row, datetime.now(UTC)), event_id, int(time.time()), payload)
            async with (
                asyncio.timeout(self.settings.webhook_timeout_s),  # the whole try, well within its lease
                http.stream("POST", row["url"], content=payload.encode(), headers=sent) as answer,
            ):
                ok = 200 <= answer.status_code < 300
                said = b"" if ok else await _start_of(answer)
            error = "" if ok else f"answered {answer.status_code}: {said.decode(errors='replace')}"
        except Exception as exc:  # no answer in time, a bad URL, anything: a failed try like any other
            ok, error = False, f"no answer: {exc!r}"
        finally:
            self._in_flight[wid] -= 1
            if not self._in_flight[wid]:
                del self._in_flight[wid]
        dead, wait = (False, 0.0) if ok else retry_wait(self.settings, int(attempt))
        error = error[:ERROR_CHARS].replace("\x00", "\ufffd")  # Postgres text holds no NUL
        try:
            if ok:
                await self.pool.execute(DELIVERED, wid, event_id, attempt)
                self.sent += 1
            else:
                await self.pool.execute(FAILED, wid, event_id, dead, wait, error, attempt)
        except PG_ERRORS as exc:  # not recorded: the lease runs out and it is sent again
            log.warning("a delivery's outcome could not be recorded: %r", exc)
            return
        if dead:
            log.error("webhook delivery dead-lettered", extra={"webhook_id": wid, "event_id": event_id})


async def _start_of(answer: httpx.Response, most: int = 200) -> bytes:
    """The first bytes of an answer's body, for the delivery's last_error: never the whole of it."""
    got = b""
    async for chunk in answer.aiter_bytes():
        got += chunk
        if len(got) >= most:
            break
    return got[:most]


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

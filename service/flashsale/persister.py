"""Drains each sale's event stream into Postgres, in batches, idempotently.

Every event carries the whole reservation, so any one of them can create the row; a final
status never goes back to ``held``; entries are XACKed only after their batch committed.
Entries left pending by a dead worker are claimed (XAUTOCLAIM) and finished; an entry whose
data Postgres keeps refusing goes to the sale's dead-letter stream (an outage never does: a
delivery is not a failure). When Postgres is down the batch is
retried with backoff and the backlog simply waits in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from . import connection, metrics
from .audit import Auditor
from .connection import Client
from .keys import GROUP, WEBHOOKS, Keys
from .queue import Entry, active_streams, backlogs, claim_idle, read_new
from .sales import now_ms
from .schemas import SaleDoc
from .scripts import Script, Scripts
from .settings import Settings

log = logging.getLogger("flashsale.persister")

FINAL = ("confirmed", "released", "expired")
# SQLSTATE classes 22 (data) and 23 (constraint): the entry itself is bad and retrying won't help.
POISON = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

# The batch goes to Postgres as one JSON text of its entries as they are, which json_to_recordset
# turns into rows: one C call encodes it (ten arrays for unnest cost the persister about three times
# the CPU per row: bench/persister_write.py), and Postgres parses every field, so a value no column
# holds is refused like any other bad data (SQLSTATE class 22).
UPSERT_RESERVATIONS = """
INSERT INTO reservations (id, sale_id, sku, user_id, quantity, status, idempotency_key, payment_ref,
                          created_at, expires_at, confirmed_at, released_at, expired_at, client_ip, client_device,
                          extensions, extended_s)
SELECT r.rid, $1, r.sku, r."user", r.qty, r.status, coalesce(r.idem, ''), nullif(r.payment_ref, ''),
       to_timestamp(r.created_ms / 1000.0), to_timestamp(r.expires_ms / 1000.0),
       CASE WHEN r.status = 'confirmed' THEN to_timestamp(r.at_ms / 1000.0) END,
       CASE WHEN r.status = 'released' THEN to_timestamp(r.at_ms / 1000.0) END,
       CASE WHEN r.status = 'expired' THEN to_timestamp(r.at_ms / 1000.0) END,
       nullif(r.ip, ''), nullif(r.device, ''), coalesce(r.extensions, 0), coalesce(r.extended_s, 0)
FROM json_to_recordset($2::json) AS r(rid text, sku text, "user" text, qty integer, status text, idem text,
                                      payment_ref text, created_ms bigint, expires_ms bigint, at_ms bigint,
                                      ip text, device text, extensions integer, extended_s integer)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, payment_ref = EXCLUDED.payment_ref, confirmed_at = EXCLUDED.confirmed_at,
    released_at = EXCLUDED.released_at, expired_at = EXCLUDED.expired_at,
    expires_at = greatest(reservations.expires_at, EXCLUDED.expires_at),
    extensions = greatest(reservations.extensions, EXCLUDED.extensions),
    extended_s = greatest(reservations.extended_s, EXCLUDED.extended_s), persisted_at = now()
WHERE reservations.status = 'held'
  AND (EXCLUDED.status <> 'held' OR EXCLUDED.expires_at > reservations.expires_at)  -- final, or extended
"""

UPSERT_SALE = """
INSERT INTO sales (id, name, starts_at, ends_at, hold_seconds, state, changed_at, slots, waiting_room, ip_rate_per_s,
                   max_extensions, max_extension_seconds)
VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7 / 1000.0), $8, $9::jsonb, $10, $11, $12)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, starts_at = EXCLUDED.starts_at, ends_at = EXCLUDED.ends_at,
    hold_seconds = EXCLUDED.hold_seconds, state = EXCLUDED.state, changed_at = EXCLUDED.changed_at,
    slots = EXCLUDED.slots, waiting_room = EXCLUDED.waiting_room, ip_rate_per_s = EXCLUDED.ip_rate_per_s,
    max_extensions = EXCLUDED.max_extensions, max_extension_seconds = EXCLUDED.max_extension_seconds
WHERE sales.changed_at <= EXCLUDED.changed_at
"""

UPSERT_ITEMS = """
INSERT INTO items (sale_id, sku, name, price_cents, stock_total, per_user_limit, shards, per_ip_limit, per_device_limit)
SELECT $1, i.sku, i.name, i.price, i.stock, i.lim, i.shards, i.ip_lim, i.device_lim
FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::int[], $8::int[], $9::int[], $10::int[])
    AS i(sku, name, price, stock, lim, shards, ip_lim, device_lim)
WHERE (SELECT changed_at FROM sales WHERE id = $1) <= to_timestamp($7 / 1000.0)
ON CONFLICT (sale_id, sku) DO UPDATE SET
    name = EXCLUDED.name, price_cents = EXCLUDED.price_cents, stock_total = EXCLUDED.stock_total,
    per_user_limit = EXCLUDED.per_user_limit, shards = EXCLUDED.shards,
    per_ip_limit = EXCLUDED.per_ip_limit, per_device_limit = EXCLUDED.per_device_limit
"""


DELETE_DROPPED_ITEMS = """
DELETE FROM items
WHERE sale_id = $1 AND NOT (sku = ANY($2::text[]))
  AND (SELECT changed_at FROM sales WHERE id = $1) <= to_timestamp($3 / 1000.0)
"""


def merge(entries: Sequence[Entry]) -> tuple[dict[str, dict[str, str]], dict[str, str] | None]:
    """Collapses a batch to one row per reservation (its latest status) and the newest sale event,
    so that one statement never touches a row twice."""
    rows: dict[str, dict[str, str]] = {}
    sale: dict[str, str] | None = None
    for _, ev in entries:
        if ev["type"] == "sale":
            if sale is None or int(ev["at_ms"]) >= int(sale["at_ms"]):
                sale = ev
            continue
        prior = rows.get(ev["rid"])
        if prior is None or prior["status"] == "held":
            rows[ev["rid"]] = ev
    return rows, sale


def check(fields: dict[str, str]) -> None:
    """Raises ValueError for an entry the persister cannot write."""
    kind = fields.get("type")
    if kind == "sale":
        msgspec.json.decode(fields["doc"], type=SaleDoc)
        int(fields["at_ms"])
        return
    if kind not in ("reserve", "extended", *FINAL) or fields.get("status") not in ("held", *FINAL):
        raise ValueError(f"unknown event type {kind!r}")
    for name in ("qty", "created_ms", "expires_ms", "at_ms"):
        int(fields[name])
    for name in ("rid", "sku", "user"):
        if not fields.get(name):
            raise ValueError(f"missing {name}")


Conn = asyncpg.Connection | PoolConnectionProxy


async def write(conn: Conn, sale_id: str, entries: Sequence[Entry]) -> None:
    rows, sale = merge(entries)
    async with conn.transaction():
        if sale is not None:
            await write_sale(conn, sale_id, sale)
        if rows:
            await conn.execute(UPSERT_RESERVATIONS, sale_id, msgspec.json.encode(list(rows.values())).decode())


async def write_sale(conn: Conn, sale_id: str, sale: dict[str, str]) -> None:
    doc = msgspec.json.decode(sale["doc"], type=SaleDoc)
    at = int(sale["at_ms"])
    await conn.execute(
        UPSERT_SALE,
        sale_id,
        doc.name,
        doc.starts_at,
        doc.ends_at,
        doc.hold_seconds,
        sale["state"],
        at,
        doc.slots,
        None if doc.waiting_room is None else msgspec.json.encode(doc.waiting_room).decode(),
        doc.ip_rate_per_s,
        doc.max_extensions,
        doc.max_extension_seconds,
    )
    await conn.execute(
        UPSERT_ITEMS,
        sale_id,
        [i.sku for i in doc.items],
        [i.name for i in doc.items],
        [i.price_cents for i in doc.items],
        [i.stock for i in doc.items],
        [i.per_user_limit for i in doc.items],
        at,
        [i.shards for i in doc.items],
        [i.per_ip_limit for i in doc.items],
        [i.per_device_limit for i in doc.items],
    )
    await conn.execute(DELETE_DROPPED_ITEMS, sale_id, [i.sku for i in doc.items], at)


@dataclass
class Persister:
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    settings: Settings
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
    written: int = 0
    dead_lettered: int = 0
    _streams: dict[str, str] = field(default_factory=dict)
    _until: dict[str, float] = field(default_factory=dict)  # sale id -> its score in the active set
    _slots: dict[str, list[str]] = field(default_factory=dict)  # sale id -> its extra slots (shards.py)
    _streams_at: float = 0.0
    _retired_at: float = 0.0
    _retire: Script = field(init=False)
    auditor: Auditor = field(init=False)

    def __post_init__(self) -> None:
        self._retire = Scripts.load(self.redis, self.settings.lua_dir).retire
        self.auditor = Auditor(self.redis, self.pool, self.keys)

    _claimed_at: float = 0.0
    _trimmed_at: float = 0.0

    async def streams(self) -> dict[str, str]:
        """stream key -> sale id for every active sale (its own stream and those of its extra
        slots, shards.py), refreshed once a second."""
        if time.monotonic() - self._streams_at > 1.0:
            found = await active_streams(self.redis, self.keys)
            self._streams, self._until, self._slots = found.sale_of, found.until, found.extra
            self._streams_at = time.monotonic()
        return self._streams

    async def retire(self) -> None:
        """Takes out of the active set each sale whose time is over, with no hold left and every
        event in Postgres: from then on no tick of the sweeper or the persister spends on it."""
        now = now_ms()
        for sale_id, until in list(self._until.items()):
            if until > now:
                continue
            extra = self._slots.get(sale_id, [])
            pipe = self.redis.pipeline(transaction=False)
            for slot in (sale_id, *extra):
                pipe.hget(self.keys.sale(slot), "skus")
            places = list(zip((sale_id, *extra), await pipe.execute(), strict=True))
            pipe = self.redis.pipeline(transaction=False)
            for slot, skus in places:
                for sku in filter(None, (skus or "").split(",")):
                    pipe.zcard(self.keys.holds(slot, sku))
                if extra:
                    pipe.hlen(self.keys.moves(slot))  # a move a crash cut short: the sweeper must finish it
            if any(await pipe.execute()):
                continue
            state, told = await self.redis.hmget(self.keys.sale(sale_id), "state", "ended_told")
            if state is not None and not told:
                continue  # the webhooks' sale.ended is not in their outbox yet (dispatch.py)
            stream = self.keys.events(sale_id)  # made with its groups by sale_create
            if await self.redis.exists(stream) and any(
                b.events for b in await backlogs(self.redis, self.keys, sale_id, extra, (GROUP, WEBHOOKS))
            ):
                continue  # an event not yet in Postgres, or not yet taken for the webhooks
            if await self._retire(keys=[self.keys.active], args=[sale_id, int(until)]):
                log.info("sale retired from the active set", extra={"sale_id": sale_id})
                self._until.pop(sale_id, None)
                for slot in (sale_id, *extra):
                    self._streams.pop(self.keys.events(slot), None)

    async def audit(self, stop: asyncio.Event) -> None:
        """The live audit, beside the persisting and never in its way: a pass that fails (Redis or
        Postgres down, a bug) is logged and the next one comes a second later."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            try:
                await self.auditor.run_once(list(self._until), self.name)
            except Exception as exc:
                log.warning("audit pass failed, trying again in a second: %r", exc)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("persister started", extra={"consumer": self.name})
        auditing = asyncio.create_task(self.audit(stop), name="audit")
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    await self.step(stop)
                    backoff = 0.1
                except connection.ERRORS as exc:
                    log.warning("redis unreachable, retrying in %.1fs: %s", backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
        finally:
            if not stop.is_set():  # leaving on an error: the audit goes with it
                auditing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await auditing
        await self.redis.zrem(self.keys.workers, self.name)
        log.info("persister stopped", extra={"consumer": self.name, "written": self.written})

    async def step(self, stop: asyncio.Event) -> None:
        await self.redis.zadd(self.keys.workers, {self.name: int(time.time() * 1000)})
        streams = await self.streams()
        if time.monotonic() - self._retired_at > 1.0:
            self._retired_at = time.monotonic()
            await self.retire()
        if not streams:
            await asyncio.sleep(self.settings.persist_block_ms / 1000)
            return
        now = time.monotonic()
        if now - self._claimed_at > self.settings.claim_idle_ms / 2000:
            self._claimed_at = now
            for stream in streams:
                await self.claim(stream, streams[stream], stop)
        for stream, entries in await self.read(streams):
            await self.handle(stream, streams[stream], entries, stop)
        if now - self._trimmed_at > 5.0:
            self._trimmed_at = now
            for stream in streams:
                await self.trim(stream)

    async def read(self, streams: dict[str, str]) -> list[tuple[str, list[Entry]]]:
        return await read_new(
            self.redis, GROUP, self.name, list(streams), self.settings.persist_batch, self.settings.persist_block_ms
        )

    async def claim(self, stream: str, sale_id: str, stop: asyncio.Event) -> None:
        """Takes over entries another (likely dead) consumer left pending too long."""
        idle, batch = self.settings.claim_idle_ms, self.settings.persist_batch
        batches = claim_idle(self.redis, stream, GROUP, self.name, idle, batch)
        async for entries, deleted in batches:
            for entry_id in deleted:  # trimmed while pending: must not happen; never pass it by silently
                await self.dead_letter(stream, sale_id, entry_id, {}, "gone from the stream before it was persisted")
            if entries:
                log.info("claimed pending entries", extra={"stream": stream, "claimed": len(entries)})
                await self.handle(stream, sale_id, entries, stop)
            if stop.is_set():
                return

    async def handle(self, stream: str, sale_id: str, entries: list[Entry], stop: asyncio.Event) -> None:
        good: list[Entry] = []
        for entry_id, fields in entries:
            try:
                check(fields)
                good.append((entry_id, fields))
            except (KeyError, ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
                await self.dead_letter(stream, sale_id, entry_id, fields, f"malformed: {exc!r}")
        if not good:
            return
        outcome = await self.write(sale_id, good, stop)
        if outcome == "written":
            await self.done(stream, sale_id, good)
        elif outcome == "refused":
            # Something in the batch is poison: write them one by one. A refused entry stays pending
            # (claimed again later) until Postgres has refused it max_deliveries times.
            for entry in good:
                single = await self.write(sale_id, [entry], stop)
                if single == "written":
                    await self.done(stream, sale_id, [entry])
                elif single == "refused":
                    await self.refused(stream, sale_id, entry)
                else:
                    return

    async def done(self, stream: str, sale_id: str, entries: Sequence[Entry]) -> None:
        ids = [e[0] for e in entries]
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, GROUP, *ids)
        pipe.hdel(self.keys.refused(sale_id), *ids)
        await pipe.execute()
        self.written += len(entries)
        metrics.committed(ids)
        log.info("batch persisted", extra={"sale_id": sale_id, "entries": len(entries)})

    async def refused(self, stream: str, sale_id: str, entry: Entry) -> None:
        times = await self.redis.hincrby(self.keys.refused(sale_id), entry[0], 1)
        if times >= self.settings.max_deliveries:
            await self.dead_letter(stream, sale_id, entry[0], entry[1], f"refused by postgres {times} times")
            await self.redis.hdel(self.keys.refused(sale_id), entry[0])

    async def write(
        self, sale_id: str, entries: Sequence[Entry], stop: asyncio.Event
    ) -> Literal["written", "refused", "stopped"]:
        """Retries while Postgres is unreachable; "refused" only when Postgres rejects the data."""
        backoff = 0.1
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await write(conn, sale_id, entries)
                return "written"
            except POISON as exc:
                log.error("entries refused by postgres", extra={"sale_id": sale_id, "error": repr(exc)})
                return "refused"
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if stop.is_set():
                    return "stopped"
                log.warning("postgres unavailable, batch waits %.1fs: %r", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def dead_letter(self, stream: str, sale_id: str, entry_id: str, fields: dict[str, str], why: str) -> None:
        dead: dict[Any, Any] = {**fields, "entry_id": entry_id, "reason": why}
        await self.redis.xadd(self.keys.dead(sale_id), dead)
        await self.redis.xack(stream, GROUP, entry_id)
        self.dead_lettered += 1
        metrics.DEAD.inc()
        log.error("dead-lettered entry", extra={"sale_id": sale_id, "entry_id": entry_id, "reason": why})

    async def trim(self, stream: str) -> None:
        """Drops entries every consumer group is done with (the persister's and the webhooks'),
        so the stream does not grow for ever."""
        # Per group, last-delivered first, pending second: an entry delivered between the two
        # reads is pending at the second, so the floor never passes an entry not yet acknowledged.
        floors = []
        groups = await self.redis.xinfo_groups(stream)
        if not {GROUP, WEBHOOKS} <= {g["name"] for g in groups}:
            return  # a stream older than the webhooks, whose group the dispatcher has yet to make
        for group in groups:
            summary = await self.redis.xpending(stream, group["name"])
            floors.append(summary["min"] if summary and summary.get("pending") else group["last-delivered-id"])
        floor = min(floors, key=_entry_order, default=None)
        if floor and floor != "0-0":
            await self.redis.xtrim(stream, minid=floor, approximate=False)


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)

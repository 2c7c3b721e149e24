"""The live audit (contract, "Scale"): does every unit add up, and does Postgres agree with Redis?

Two checks, run by the persister about once a second over the sales still going (one persister
at a time, under a short lock, as the sweeper):

- **Conservation**, per item, in Redis: ``available + held + confirmed == stock_total``. Every
  script moves units between those counters and never makes or loses one, so any difference is
  a corrupted counter or a bad restore. Progress computes it from its own snapshot as well, so
  it shows there at once (``drift`` on each item).
- **Redis against Postgres**, once a sale's queue is empty: the same comparison as ``flashsale
  reconcile``, kept only if the sale's counters did not move while Postgres was read (a reserve
  landing in between is not a difference). Written to the sale hash (``audit``), where progress,
  the dashboard and the metrics of every API process read it.

Each difference found is logged once, with its numbers, when it appears (and once when it is gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec

from . import shards
from .connection import Client
from .keys import Keys
from .queue import backlog
from .reconcile import reconcile
from .schemas import SaleDoc

log = logging.getLogger("flashsale.audit")
UNITS = ("stock_total", "available", "held", "confirmed")
FIELDS = (*UNITS, "reservations", "cancelled", "expired", "in_flight", "per_user_limit")
POSTGRES_EVERY_S = 10.0  # a drained sale is compared with Postgres at most this often
LOCK_MS = 2000


def drift(total: int, available: int, held: int, confirmed: int) -> int:
    """Units made (+) or lost (-): every script moves units between the counters, none makes any."""
    return available + held + confirmed - total


def conservation(
    sku: str, total: int, available: int, held: int, confirmed: int, made: int | None = None
) -> str | None:
    """The difference in one item's units, said with its numbers, or None when they add up.
    ``made``: a sharded item's drift, summed over its shards (shards.combine)."""
    own = drift(total, available, held, confirmed)
    made = own if made is None else made
    if made == 0:
        return None
    if made != own:
        return f"{sku}: over its shards, available + held + confirmed + in flight is not stock_total (drift {made:+d})"
    return (
        f"{sku}: available {available} + held {held} + confirmed {confirmed} = {available + held + confirmed},"
        f" stock_total {total} (drift {made:+d})"
    )


@dataclass
class Auditor:
    redis: Client
    pool: asyncpg.Pool
    keys: Keys
    postgres_every_s: float = POSTGRES_EVERY_S
    _last_postgres: dict[str, tuple[float, list[list[str | None]]]] = field(default_factory=dict)
    _logged: dict[str, list[str]] = field(default_factory=dict)  # sale id -> what was last logged

    async def run_once(self, sale_ids: Sequence[str], owner: str) -> None:
        """One pass over ``sale_ids``, unless another persister holds the audit lock (it only
        spares duplicate work: two audits at once would find the same)."""
        lock = self.keys.audit_lock
        if not sale_ids:
            return
        if not await self.redis.set(lock, owner, nx=True, px=LOCK_MS):
            if await self.redis.get(lock) != owner:
                return
            await self.redis.pexpire(lock, LOCK_MS)
        for sale_id in sale_ids:
            await self.audit(sale_id)

    async def audit(self, sale_id: str) -> list[str]:
        k = self.keys
        raw, audited = await self.redis.hmget(k.sale(sale_id), ["doc", "audit"])
        if raw is None:
            return []
        doc = msgspec.json.decode(raw, type=SaleDoc)
        skus = [i.sku for i in doc.items]
        counters = await self._counters(doc)
        own = {sku: dict(zip(FIELDS, c, strict=True)) for sku, c in zip(skus, counters, strict=False)}
        whole = await shards.whole_items(self.redis, k, doc, own)
        made = {sku: int(h["drift"]) if "drift" in h else None for sku, h in whole.items()}
        units = {sku: [int(h.get(f) or 0) for f in UNITS] for sku, h in whole.items()}
        previous = msgspec.json.decode(audited or "[]", type=list[str])
        postgres = await self._against_postgres(doc, counters, previous)
        found = [d for sku, (t, a, h, c) in units.items() if (d := conservation(sku, t, a, h, c, made[sku]))] + postgres
        await self.redis.hset(k.sale(sale_id), mapping={"audit": msgspec.json.encode(found).decode()})
        # Logged again only when what is wrong changes, not when the live numbers around it move.
        drifts = {sku: drift(*u) if made[sku] is None else made[sku] for sku, u in units.items()}
        self._log(sale_id, found, [f"{sku} {d:+d}" for sku, d in drifts.items() if d] + postgres)
        return found

    async def _counters(self, doc: SaleDoc) -> list[list[str | None]]:
        """The items' counters in the sale's slot, then those of its extra slots (one HMGET each:
        every check is within one item, so no MULTI is needed, and redis-py's cluster MULTI runs
        each queued command on an event loop of its own, which breaks the client after a failover)."""
        pipe = self.redis.pipeline(transaction=False)
        for item in doc.items:
            pipe.hmget(self.keys.item(doc.id, item.sku), *FIELDS)
        own = list(await pipe.execute())
        extra = await shards.shard_hashes(self.redis, self.keys, doc, FIELDS)
        return own + [[h.get(f) for f in FIELDS] for hashes in extra.values() for h in hashes]

    async def _against_postgres(self, doc: SaleDoc, counters: list[list[str | None]], previous: list[str]) -> list[str]:
        sale_id = doc.id
        last_at, last_counters = self._last_postgres.get(sale_id, (0.0, []))
        kept = [d for d in previous if d.startswith("postgres: ")]
        if time.monotonic() - last_at < self.postgres_every_s:
            return kept  # too soon: the last answer stands
        if counters == last_counters and not kept:
            return kept  # agreed, and nothing moved in Redis since (a drift is looked at again: ops may fix it)
        if (await backlog(self.redis, self.keys, sale_id, doc.slots)).events:
            return kept  # Postgres trails Redis by design until the queue is empty
        async with self.pool.acquire() as conn:
            report = await reconcile(self.redis, conn, self.keys, sale_id)
        if await self._counters(doc) != counters:
            return kept  # the sale moved while Postgres was read: no verdict this time
        self._last_postgres[sale_id] = (time.monotonic(), counters)
        return [f"postgres: {d}" for d in report.differences]

    def _log(self, sale_id: str, found: list[str], what: list[str]) -> None:
        """``found`` said once, when ``what`` is wrong (the drifts and the Postgres lines) changes."""
        if what == self._logged.get(sale_id, []):
            return
        self._logged[sale_id] = what
        if found:
            log.warning("audit: %s", "; ".join(found), extra={"sale_id": sale_id, "drift": found})
        else:
            log.info("audit: the numbers add up again", extra={"sale_id": sale_id})

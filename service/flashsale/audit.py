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
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec

from .connection import Client
from .keys import Keys
from .queue import backlog
from .reconcile import reconcile
from .schemas import SaleIn

log = logging.getLogger("flashsale.audit")
UNITS = ("stock_total", "available", "held", "confirmed")
POSTGRES_EVERY_S = 10.0  # a drained sale is compared with Postgres at most this often
LOCK_MS = 2000


def conservation(sku: str, total: int, available: int, held: int, confirmed: int) -> str | None:
    """The difference in one item's units, said with its numbers, or None when they add up."""
    drift = available + held + confirmed - total
    if drift == 0:
        return None
    return (
        f"{sku}: available {available} + held {held} + confirmed {confirmed} = {available + held + confirmed},"
        f" stock_total {total} (drift {drift:+d})"
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
        raw = await self.redis.hget(k.sale(sale_id), "doc")
        if raw is None:
            return []
        skus = [i.sku for i in msgspec.json.decode(raw, type=SaleIn).items]
        counters = await self._counters(sale_id, skus)
        units = [[int(v or 0) for v in c[:4]] for c in counters]
        found = [d for sku, u in zip(skus, units, strict=True) if (d := conservation(sku, *u))]
        found += await self._against_postgres(sale_id, skus, counters)
        await self.redis.hset(k.sale(sale_id), mapping={"audit": msgspec.json.encode(found).decode()})
        self._log(sale_id, found)
        return found

    async def _counters(self, sale_id: str, skus: Sequence[str]) -> list[list[str | None]]:
        pipe = self.redis.pipeline(transaction=True)
        for sku in skus:
            pipe.hmget(self.keys.item(sale_id, sku), *UNITS, "reservations", "cancelled", "expired")
        return list(await pipe.execute())

    async def _against_postgres(self, sale_id: str, skus: Sequence[str], counters: list[list[str | None]]) -> list[str]:
        last_at, last_counters = self._last_postgres.get(sale_id, (0.0, []))
        previous = msgspec.json.decode(await self.redis.hget(self.keys.sale(sale_id), "audit") or "[]")
        kept = [d for d in previous if d.startswith("postgres: ")]
        if time.monotonic() - last_at < self.postgres_every_s:
            return kept  # too soon: the last answer stands
        if counters == last_counters and not kept:
            return kept  # agreed, and nothing moved in Redis since (a drift is looked at again: ops may fix it)
        if (await backlog(self.redis, self.keys, sale_id)).events:
            return kept  # Postgres trails Redis by design until the queue is empty
        async with self.pool.acquire() as conn:
            report = await reconcile(self.redis, conn, self.keys, sale_id)
        if await self._counters(sale_id, skus) != counters:
            return kept  # the sale moved while Postgres was read: no verdict this time
        self._last_postgres[sale_id] = (time.monotonic(), counters)
        return [f"postgres: {d}" for d in report.differences]

    def _log(self, sale_id: str, found: list[str]) -> None:
        # Said again only when what is wrong changes, not when the live numbers around it move.
        seen = [re.sub(r"^(\S+): available .*\(drift", r"\1 (drift", d) for d in found]
        if seen == self._logged.get(sale_id, []):
            return
        self._logged[sale_id] = seen
        if found:
            log.warning("audit: %s", "; ".join(found), extra={"sale_id": sale_id, "drift": found})
        else:
            log.info("audit: the numbers add up again", extra={"sale_id": sale_id})

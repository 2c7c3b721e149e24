"""Redis and Postgres side by side for one sale; any difference is a bug or an undrained queue."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from . import shards
from .connection import Client
from .keys import Keys
from .queue import backlog
from .schemas import SaleDoc

COLUMNS = ("reservations", "held", "confirmed", "released")


@dataclass
class Report:
    sale_id: str
    rows: dict[str, tuple[dict[str, int], dict[str, int]]] = field(default_factory=dict)
    backlog: int = 0
    differences: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = f"{'sku':<20}" + "".join(f"{c + ' r/pg':>24}" for c in COLUMNS)
        lines = [f"sale {self.sale_id}", head]
        for sku, (red, pg) in self.rows.items():
            lines.append(f"{sku:<20}" + "".join(f"{f'{red[c]} / {pg[c]}':>24}" for c in COLUMNS))
        lines.append(f"queue backlog: {self.backlog} events")
        lines += [f"DIFFERENCE: {d}" for d in self.differences] or ["no differences"]
        return "\n".join(lines)


async def reconcile(redis: Client, conn: asyncpg.Connection | PoolConnectionProxy, keys: Keys, sale_id: str) -> Report:
    report = Report(sale_id)
    raw = await redis.hget(keys.sale(sale_id), "doc")
    if raw is None:
        report.differences.append(f"no sale {sale_id!r} in Redis")
        return report
    doc = msgspec.json.decode(raw, type=SaleDoc)
    skus = [i.sku for i in doc.items]
    pipe = redis.pipeline(transaction=False)  # one HGETALL each: every comparison is within one item
    for sku in skus:
        pipe.hgetall(keys.item(sale_id, sku))
    whole = await shards.whole_items(redis, keys, doc, dict(zip(skus, await pipe.execute(), strict=True)))
    in_redis = {}
    for sku in skus:
        n, held, confirmed, cancelled, expired = (
            int(whole[sku].get(f) or 0) for f in ("reservations", "held", "confirmed", "cancelled", "expired")
        )
        in_redis[sku] = {"reservations": n, "held": held, "confirmed": confirmed, "released": cancelled + expired}
    in_pg = {sku: dict.fromkeys(COLUMNS, 0) for sku in skus}
    for row in await conn.fetch(
        "SELECT sku, status, count(*) AS n, sum(quantity) AS units FROM reservations"
        " WHERE sale_id = $1 GROUP BY sku, status",
        sale_id,
    ):
        counts = in_pg.setdefault(row["sku"], dict.fromkeys(COLUMNS, 0))
        counts["reservations"] += row["n"]
        counts["released" if row["status"] in ("released", "expired") else row["status"]] += row["units"]
    for sku in in_pg:
        red = in_redis.get(sku, dict.fromkeys(COLUMNS, 0))
        report.rows[sku] = (red, in_pg[sku])
        report.differences += [
            f"{sku} {c}: redis {red[c]}, postgres {in_pg[sku][c]}" for c in COLUMNS if red[c] != in_pg[sku][c]
        ]
    report.backlog = (await backlog(redis, keys, sale_id, doc.slots)).events
    if report.backlog:
        report.differences.append(f"{report.backlog} events not yet in Postgres (is a worker running?)")
    return report

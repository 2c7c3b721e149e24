"""The benchmark: the service's hot paths side by side with reference designs, on one machine, in
one run, under the same uvicorn settings (one worker process, uvloop + httptools, no access log).

    python -m loadtest.bench [--duration 10] [--connections 64] [--threads 1]      (make bench)

Rows, each with its ratio to (a):
  (a) the cheapest Starlette JSON route (loadtest/reference.py: ceiling): the ceiling
  (b) POST reserve while stock lasts (huge stock, high per-user limit, FLASHSALE_USER_RATE=0,
      a new user and Idempotency-Key on every request), with the persister running
  (c) POST reserve once sold out (409 sold_out)
  (d) GET the sale
  (e) the common design (loadtest/reference.py: pg_stock): stock as a Postgres row with a
      conditional UPDATE and the order INSERT in one transaction
Then: the persister's drain rate (events queued with the worker stopped, then drained), the
persistence lag (persisted_at - created_at) during (b), and Redis memory per held reservation.

The load comes from wrk (C, event-driven: a few microseconds of CPU per request, where Locust
spends a millisecond or more), so the generator is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.embedded import free_port
from loadtest.services import ROOT, Stack, interrupt_on_signals, stack, wait_ready

REPORTS = ROOT / "loadtest" / "reports"
RESERVE_LUA = ROOT / "loadtest" / "wrk" / "reserve.lua"
SKU = "item"  # the one item of every benchmark sale
UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class Result:
    label: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0


def _ms(value: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if found is None:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(found[1]) * UNIT[found[2]]


def parse_wrk(label: str, text: str) -> Result:
    r = Result(label)
    for line in text.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            r.rps = float(words[1])
        elif words[:1] == ["50%"]:
            r.p50_ms = _ms(words[1])
        elif words[:1] == ["99%"]:
            r.p99_ms = _ms(words[1])
        elif "requests in" in line:
            r.requests = int(words[0])
        elif line.strip().startswith("Non-2xx"):
            r.non_2xx = int(words[-1])
        elif line.strip().startswith("Socket errors"):
            r.socket_errors = sum(int(n) for n in re.findall(r"\d+", line))
    return r


def wrk(
    label: str,
    url: str,
    args: argparse.Namespace,
    seconds: float,
    headers: tuple[str, ...] = (),
    script: tuple[str, ...] = (),
) -> Result:
    """One wrk run; ``script`` is (lua file, its arguments...)."""
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s", "--latency", "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script[0], url, "--", *script[1:]]
    else:
        cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return parse_wrk(label, out)


def measure(
    label: str, url: str, args: argparse.Namespace, headers: tuple[str, ...] = (), script: tuple[str, ...] = ()
) -> Result:
    print(f"  {label} ...", end="", flush=True)
    wrk(label, url, args, args.warmup, headers, script)  # warm caches, pools, JITs; not counted
    r = wrk(label, url, args, args.duration, headers, script)
    print(f" {r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms", flush=True)
    return r


def sale_body(sale_id: str, stock: int, limit: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "id": sale_id,
        "name": f"bench {sale_id}",
        "hold_seconds": 3600,
        "starts_at": (now - timedelta(seconds=1)).isoformat(),
        "ends_at": (now + timedelta(hours=2)).isoformat(),
        "items": [{"sku": SKU, "name": "Item", "price_cents": 1000, "stock": stock, "per_user_limit": limit}],
    }


def create_sale(s: Stack, sale_id: str, stock: int, limit: int = 1_000_000) -> str:
    r = httpx.post(
        f"{s.base_url}/v1/sales",
        json=sale_body(sale_id, stock, limit),
        timeout=30,
        headers={"Authorization": f"Bearer {s.ops_key}"},
    )
    r.raise_for_status()
    return sale_id


async def _backlog(s: Stack, sale_id: str) -> int:
    from flashsale.keys import Keys
    from flashsale.queue import backlog

    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        return (await backlog(redis, Keys(s.key_prefix), sale_id)).events
    finally:
        await redis.aclose()


async def _used_memory(s: Stack) -> int:
    redis = Redis.from_url(s.redis_url, decode_responses=True)
    try:
        await redis.memory_purge()
        return int((await redis.info("memory"))["used_memory"])
    finally:
        await redis.aclose()


def wait_drained(s: Stack, sale_id: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while asyncio.run(_backlog(s, sale_id)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sale {sale_id}: the queue did not drain in {limit:.0f} s")
        time.sleep(0.1)


async def _lag(s: Stack, sale_id: str) -> tuple[int, float, float]:
    conn = await asyncpg.connect(s.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM persisted_at - created_at)) AS p50,"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM persisted_at - created_at)) AS p99"
            " FROM reservations WHERE sale_id = $1",
            sale_id,
        )
        assert row is not None
        return int(row["n"]), float(row["p50"] or 0) * 1000, float(row["p99"] or 0) * 1000
    finally:
        await conn.close()


async def _pg(s: Stack, sql: str) -> None:
    conn = await asyncpg.connect(s.database_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Drain:
    events: int = 0
    rows_per_s: float = 0.0
    first_batch_s: float = 0.0
    bytes_queued: float = 0.0  # Redis memory per hold while its event waits in the stream
    bytes_settled: float = 0.0  # ... once the event is persisted and trimmed


def drain_and_memory(s: Stack, args: argparse.Namespace) -> Drain:
    """Events queued with the worker stopped, then the time the worker takes to persist them;
    Redis memory before, with the holds and their queued events, and after the stream is trimmed."""
    d = Drain()
    s.stop_worker()
    sale_id = create_sale(s, f"bench-drain-{int(time.time())}", 10_000_000)
    before = asyncio.run(_used_memory(s))
    wrk(
        "drain",
        f"{s.base_url}/v1/sales/{sale_id}/reservations",
        args,
        args.drain_load,
        script=(str(RESERVE_LUA), f"/v1/sales/{sale_id}/reservations", SKU, s.store_key, "d"),
    )
    d.events = asyncio.run(_backlog(s, sale_id))
    d.bytes_queued = (asyncio.run(_used_memory(s)) - before) / max(1, d.events)
    print(f"  drain: {d.events:,} events queued with the worker stopped; starting it", flush=True)
    started = time.monotonic()
    s.start_worker()
    first_at, first_left = 0.0, d.events
    deadline = started + 300
    while True:
        left = asyncio.run(_backlog(s, sale_id))
        now = time.monotonic()
        if left < d.events and not first_at:
            first_at, first_left = now, left
            d.first_batch_s = now - started
        if left == 0 or now > deadline:
            break
        time.sleep(0.02)
    if first_at and now > first_at:
        d.rows_per_s = first_left / (now - first_at)
    print(
        f"  drain: {d.rows_per_s:,.0f} rows/s (first batch {d.first_batch_s:.2f} s after the worker started)",
        flush=True,
    )
    time.sleep(7)  # the persister trims acknowledged entries every 5 s
    d.bytes_settled = (asyncio.run(_used_memory(s)) - before) / max(1, d.events)
    return d


def table(rows: list[Result], lag: tuple[int, float, float], d: Drain, args: argparse.Namespace) -> str:
    ceiling = rows[0].rps or 1.0
    lines = [
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s (after a {args.warmup:g} s warm-up), "
        "one uvicorn worker each",
        "",
        "| row | requests/s | p50 ms | p99 ms | vs (a) | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.rps / ceiling:.2f} |"
            f" {r.non_2xx:,}{f' ({r.socket_errors} socket errors)' if r.socket_errors else ''} |"
        )
    lines += [
        "",
        "| persister and Redis | value |",
        "| --- | ---: |",
        f"| drain rate ({d.events:,} events queued with the worker stopped) | {d.rows_per_s:,.0f} rows/s |",
        f"| persistence lag during (b), p50 / p99 ({lag[0]:,} rows) | {lag[1]:.0f} ms / {lag[2]:.0f} ms |",
        f"| Redis memory per held reservation, event still queued | {d.bytes_queued:,.0f} bytes |",
        f"| Redis memory per held reservation, event persisted and trimmed | {d.bytes_settled:,.0f} bytes |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured row")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1 leaves the other core to the server)")
    parser.add_argument("--drain-load", type=float, default=5.0, help="seconds of reserves queued for the drain")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (make bench does it)")
        return 1
    interrupt_on_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPORTS / f"bench-{stamp}.md"
    try:
        with stack(REPORTS / f"bench-{stamp}.service.log") as s:
            s.start_worker()
            s.serve(1, {"FLASHSALE_USER_RATE": "0"})
            asyncio.run(_pg(s, "DROP TABLE IF EXISTS refbench_stock, refbench_orders"))
            uvicorn = [
                sys.executable,
                "-m",
                "uvicorn",
                "--host",
                "127.0.0.1",
                "--workers",
                "1",
                "--no-access-log",
                "--log-level",
                "warning",
            ]
            ceiling_port, pg_port = free_port(), free_port()
            wait_ready(
                f"http://127.0.0.1:{ceiling_port}/ping",
                s.spawn("ceiling", [*uvicorn, "--port", str(ceiling_port), "loadtest.reference:ceiling"]),
            )
            pg_app = s.spawn("pg_stock", [*uvicorn, "--port", str(pg_port), "loadtest.reference:pg_stock"])
            wait_ready(f"http://127.0.0.1:{pg_port}/ping", pg_app)  # its tables exist once it answers
            asyncio.run(_pg(s, "INSERT INTO refbench_stock VALUES ('item', 10000000)"))
            store = (f"Authorization: Bearer {s.store_key}",)
            big = create_sale(s, f"bench-stock-{stamp[-6:]}", 10_000_000)
            gone = create_sale(s, f"bench-gone-{stamp[-6:]}", 1)
            httpx.post(
                f"{s.base_url}/v1/sales/{gone}/reservations",
                headers={"Authorization": f"Bearer {s.store_key}"},
                json={"user_id": "first", "sku": SKU, "quantity": 1},
                timeout=10,
            ).raise_for_status()
            print(
                f"benchmarking on {s.base_url} (service), :{ceiling_port} (ceiling), :{pg_port} (pg_stock)", flush=True
            )
            rows = [
                measure("(a) Starlette JSON route (ceiling)", f"http://127.0.0.1:{ceiling_port}/ping", args),
                measure(
                    "(b) reserve while stock lasts",
                    f"{s.base_url}/v1/sales/{big}/reservations",
                    args,
                    script=(str(RESERVE_LUA), f"/v1/sales/{big}/reservations", SKU, s.store_key, "b"),
                ),
                measure(
                    "(c) reserve once sold out",
                    f"{s.base_url}/v1/sales/{gone}/reservations",
                    args,
                    script=(str(RESERVE_LUA), f"/v1/sales/{gone}/reservations", SKU, s.store_key, "c"),
                ),
                measure("(d) GET sale", f"{s.base_url}/v1/sales/{big}", args, headers=store),
                measure(
                    "(e) Postgres row, conditional UPDATE + INSERT",
                    f"http://127.0.0.1:{pg_port}/reserve",
                    args,
                    script=(str(RESERVE_LUA), "/reserve", SKU, s.store_key, "e"),
                ),
            ]
            wait_drained(s, big)
            lag = asyncio.run(_lag(s, big))
            drained = drain_and_memory(s, args)
            asyncio.run(_pg(s, "DROP TABLE IF EXISTS refbench_stock, refbench_orders"))
    except KeyboardInterrupt:
        print("\ninterrupted; everything started here is stopped")
        return 130
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}")
        return 1
    text = table(rows, lag, drained, args)
    out.write_text(text + "\n")
    print()
    print(text)
    print(f"\n(also in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do open progress streams slow reservations down? Reservations per second with 0 and with N
open ``/progress/stream`` connections, in one run, against one service.

    python -m loadtest.sse_impact                       # throwaway servers, `flashsale serve` + worker
    python -m loadtest.sse_impact --phases 0,200,0,200 --duration 10 --drivers 2 --concurrency 32
    FLASHSALE_URL=http://... OPS_KEY=... STORE_KEY=... python -m loadtest.sse_impact --url "$FLASHSALE_URL"

Each phase opens its streams (and waits until each has had an event), then reserves one unit
for a new user per request for ``--duration`` seconds, ``--drivers`` x ``--concurrency`` requests
in flight: from wrk (``loadtest/wrk/reserve.lua``; C, a few microseconds of CPU a request, so the
generator does not eat the server's core) when it is installed, else from httpx driver processes.
Streams are held by this process. Prints one row per phase; alternate phases (0,200,0,200) so
that drift on a shared machine shows up as spread rather than as an effect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench import RESERVE_LUA, SKU, Result, parse_wrk, sale_body

REPORTS = Path(__file__).resolve().parent / "reports"
AT = re.compile(r'"at":"([^"]+)"')


@dataclass
class Driven:
    ok: int
    failed: int
    latencies_ms: list[float]


def drive(
    url: str,
    store_key: str,
    sale_id: str,
    tag: str,
    seconds: float,
    concurrency: int,
    out: multiprocessing.Queue[Driven],
) -> None:
    """One driver process: reserve one unit for a new user, ``concurrency`` at a time, until time is up."""

    async def run() -> Driven:
        done = Driven(0, 0, [])
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(
            base_url=url, limits=limits, timeout=30, headers={"Authorization": f"Bearer {store_key}"}
        ) as c:
            deadline = time.monotonic() + seconds

            async def loop(n: int) -> None:
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    started = time.perf_counter()
                    try:
                        r = await c.post(
                            f"/v1/sales/{sale_id}/reservations",
                            json={"user_id": f"{tag}-{n}-{i}", "sku": SKU, "quantity": 1},
                        )
                        good = r.status_code == 201
                    except httpx.HTTPError:
                        good = False
                    done.latencies_ms.append((time.perf_counter() - started) * 1000)
                    if good:
                        done.ok += 1
                    else:
                        done.failed += 1

            await asyncio.gather(*(loop(n) for n in range(concurrency)))
        return done

    out.put(asyncio.run(run()))


async def hold_streams(
    url: str, ops_key: str, sale_id: str, n: int, ready: asyncio.Event, stop: asyncio.Event, ats: list[list[float]]
) -> None:
    """Holds ``n`` streams and notes the server's ``at`` of every event each one gets. A client
    short of CPU reads late, so events are counted by when the server made them, not by arrival;
    after ``stop`` every stream reads on until it has an event made after the stop (or 5 s)."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    timeout = httpx.Timeout(30, read=None)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, headers={"Authorization": f"Bearer {ops_key}"}
    ) as c:
        first = asyncio.Barrier(n + 1) if n else None
        stopped_at = [0.0]

        async def one(k: int) -> None:
            async with c.stream("GET", f"/v1/sales/{sale_id}/progress/stream") as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    found = AT.search(line) if line.startswith("data:") else None
                    if found is None:
                        continue
                    ats[k].append(datetime.fromisoformat(found[1]).timestamp())
                    if len(ats[k]) == 1 and first is not None:
                        await first.wait()
                    if stop.is_set() and ats[k][-1] > stopped_at[0]:
                        return

        tasks = [asyncio.create_task(one(k)) for k in range(n)]
        if first is not None:
            await first.wait()
        ready.set()
        await stop.wait()
        stopped_at[0] = time.time()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def made_per_s(ats: list[list[float]], start: float, end: float) -> float:
    """Events per stream per second that the server made between ``start`` and ``end``."""
    if not ats or end <= start:
        return 0.0
    return sum(start <= at <= end for one in ats for at in one) / len(ats) / (end - start)


async def phase(
    args: argparse.Namespace, url: str, keys: tuple[str, str], sale_id: str, streams: int, number: int
) -> dict[str, Any]:
    ops_key, store_key = keys
    ready, stop = asyncio.Event(), asyncio.Event()
    ats: list[list[float]] = [[] for _ in range(streams)]
    holder = asyncio.create_task(hold_streams(url, ops_key, sale_id, streams, ready, stop, ats))
    await asyncio.wait_for(ready.wait(), 60)
    wall = time.time()
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[Driven] = ctx.Queue()
    drivers = [
        ctx.Process(
            target=drive, args=(url, store_key, sale_id, f"p{number}d{d}", args.duration, args.concurrency, out)
        )
        for d in range(args.drivers if args.driver == "httpx" else 0)
    ]
    if args.driver == "wrk":
        result = await asyncio.to_thread(wrk_drive, args, url, store_key, sale_id, f"p{number}")
        wall_end = time.time()
        stop.set()
        await holder
        return {
            "streams": streams,
            "seconds": round(args.duration, 1),
            "reserved": result.requests - result.non_2xx,
            "failed": result.non_2xx + result.socket_errors,
            "per_s": result.rps * (1 - result.non_2xx / max(1, result.requests)),
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "events_per_stream_s": made_per_s(ats, wall + 1, wall_end - 1),
        }
    for p in drivers:
        p.start()
    results = [await asyncio.to_thread(out.get) for _ in drivers]
    wall_end = time.time()
    for p in drivers:
        await asyncio.to_thread(p.join)
    stop.set()
    await holder
    lat = sorted(x for r in results for x in r.latencies_ms)
    ok = sum(r.ok for r in results)
    return {
        "streams": streams,
        "seconds": round(args.duration, 1),
        "reserved": ok,
        "failed": sum(r.failed for r in results),
        "per_s": ok / args.duration,
        "p50_ms": statistics.median(lat) if lat else 0.0,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
        "events_per_stream_s": made_per_s(ats, wall + 1, wall_end - 1),
    }


def wrk_drive(args: argparse.Namespace, url: str, store_key: str, sale_id: str, tag: str) -> Result:
    """The same load from wrk: one C thread, so the generator takes little of the server's CPU."""
    path = f"/v1/sales/{sale_id}/reservations"
    cmd = ["wrk", "-t1", f"-c{args.drivers * args.concurrency}", f"-d{args.duration:g}s", "--latency"]
    cmd += ["--timeout", "10s", "-s", str(RESERVE_LUA), f"{url}{path}", "--", path, SKU, store_key, tag]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60, check=True).stdout
    return parse_wrk(tag, out)


def create_sale(url: str, ops_key: str) -> str:
    """The benchmark's one-item sale, with a stock no phase can sell out and a new user per request."""
    sale_id = f"sse-impact-{secrets.token_hex(3)}"
    r = httpx.post(
        f"{url}/v1/sales",
        headers={"Authorization": f"Bearer {ops_key}"},
        timeout=10,
        json=sale_body(sale_id, stock=10**9, limit=1),
    )
    r.raise_for_status()
    return sale_id


def table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["per_s"] or 1
    lines = ["streams  seconds  reserved  failed  reservations/s  vs first  p50 ms  p99 ms  events/stream/s"]
    for r in rows:
        lines.append(
            f"{r['streams']:>7}  {r['seconds']:>7}  {r['reserved']:>8}  {r['failed']:>6}  "
            f"{r['per_s']:>14.0f}  {100 * (r['per_s'] / base - 1):>+7.1f}%  {r['p50_ms']:>6.1f}  "
            f"{r['p99_ms']:>6.1f}  {r['events_per_stream_s']:>16.2f}"
        )
    means = {
        n: statistics.mean(r["per_s"] for r in rows if r["streams"] == n)
        for n in dict.fromkeys(r["streams"] for r in rows)
    }
    lines.append("mean reservations/s: " + ", ".join(f"{v:.0f} with {n} streams" for n, v in means.items()))
    return "\n".join(lines)


async def measure(args: argparse.Namespace, url: str, ops_key: str, store_key: str) -> str:
    sale_id = create_sale(url, ops_key)
    rows = []
    for n, streams in enumerate(args.phases):
        print(f"phase {n + 1}/{len(args.phases)}: {streams} open streams, {args.duration:.0f} s...", flush=True)
        rows.append(await phase(args, url, (ops_key, store_key), sale_id, streams, n))
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sse_impact", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--phases",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 200, 0, 200],
        help="open streams in each phase, in order (default 0,200,0,200)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of reservations per phase")
    parser.add_argument(
        "--driver",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="what makes the reservations: wrk (default when installed) or httpx driver processes",
    )
    parser.add_argument(
        "--drivers", type=int, default=2, help="driver processes (httpx); wrk opens drivers x concurrency connections"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight per driver")
    parser.add_argument("--workers", type=int, default=1, help="`flashsale serve --workers` (own service only)")
    parser.add_argument("--url", help="a running service (OPS_KEY and STORE_KEY in the environment)")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} CPUs; every process of the run shares them", flush=True)
    if args.url:
        result = asyncio.run(measure(args, args.url, os.environ["OPS_KEY"], os.environ["STORE_KEY"]))
    else:
        from loadtest.services import interrupt_on_sigterm, stack

        interrupt_on_sigterm()
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        with stack(REPORTS / f"sse_impact-{stamp}.service.log") as s:
            s.serve(workers=args.workers)
            s.start_worker()
            result = asyncio.run(measure(args, s.base_url, s.ops_key, s.store_key))
    print(result)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

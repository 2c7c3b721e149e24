"""The benchmark: the service's hot paths side by side with reference designs, on one machine, in
one run, under the same uvicorn settings (one worker process, uvloop + httptools, no access log).

    python -m loadtest.bench [--duration 10] [--connections 64] [--threads 1]      (make bench)

Rows, each with its ratio to (a):
  (a) the cheapest Starlette JSON route (loadtest/reference.py: ceiling): the ceiling
  (a') the cheapest Starlette POST route reading a JSON body, a fixed 409: the ceiling for POSTs
  (b) POST reserve while stock lasts (huge stock, high per-user limit, FLASHSALE_USER_RATE=0,
      a new user and Idempotency-Key on every request), with the persister running
  (c) POST reserve once sold out (409 sold_out)
  (d) GET the sale
  (g) GET a waiting-room ticket (the poll of one shopper waiting in line, before the start)
  (e) the common design (loadtest/reference.py: pg_stock): stock as a Postgres row with a
      conditional UPDATE and the order INSERT in one transaction
  (f) 1000 connections on the sold-out item, wrk's timeout at 2 s; (f') the same under granian
Then: the persister's drain rate (events queued with the worker stopped, then drained), the
persistence lag (persisted_at - created_at) during (b), and Redis memory per held reservation.

The load comes from wrk (C, event-driven: a few microseconds of CPU per request, where Locust
spends a millisecond or more), so the generator is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.embedded import free_port
from loadtest.services import ROOT, Stack, interrupt_on_signals, stack, stop_process, wait_ready

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
    timeouts: int = 0  # requests wrk gave up on (its --timeout)


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
            timeouts = re.search(r"timeout (\d+)", line)
            r.timeouts = int(timeouts[1]) if timeouts else 0
    return r


def wrk(
    label: str,
    url: str,
    args: argparse.Namespace,
    seconds: float,
    headers: tuple[str, ...] = (),
    script: tuple[str, ...] = (),
    connections: int = 0,
    timeout_s: float = 10.0,
) -> Result:
    """One wrk run; ``script`` is (lua file, its arguments...)."""
    cmd = ["wrk", f"-t{args.threads}", f"-c{connections or args.connections}", f"-d{seconds:g}s", "--latency"]
    cmd += ["--timeout", f"{timeout_s:g}s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script[0], url, "--", *script[1:]]
    else:
        cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return parse_wrk(label, out)


def measure(
    label: str,
    url: str,
    args: argparse.Namespace,
    headers: tuple[str, ...] = (),
    script: tuple[str, ...] = (),
    connections: int = 0,
    timeout_s: float = 10.0,
) -> Result:
    print(f"  {label} ...", end="", flush=True)
    wrk(label, url, args, args.warmup, headers, script, connections, timeout_s)  # warm caches and pools; not counted
    r = wrk(label, url, args, args.duration, headers, script, connections, timeout_s)
    timeouts = f", {r.timeouts} timeouts" if r.timeouts else ""
    print(f" {r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms{timeouts}", flush=True)
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


def create_sale(s: Stack, sale_id: str, stock: int, limit: int = 1_000_000, url: str = "") -> str:
    r = httpx.post(
        f"{url or s.base_url}/v1/sales",
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
    cpu_us_per_row: float = 0.0  # the worker process's CPU (user + system) over the same rows as rows_per_s
    bytes_queued: float = 0.0  # Redis memory per hold while its event waits in the stream
    bytes_settled: float = 0.0  # ... once the event is persisted and trimmed


def drain_and_memory(s: Stack, args: argparse.Namespace) -> Drain:
    """Events queued with the worker stopped, then the time the worker takes to persist them;
    Redis memory before, with the holds and their queued events, and after the stream is trimmed."""
    import psutil

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
    worker = psutil.Process(s.children["worker"].pid)  # `flashsale worker`: one process, no children

    def cpu_s() -> float:
        t = worker.cpu_times()
        return float(t.user + t.system)

    first_at, first_left, first_cpu = 0.0, d.events, 0.0
    deadline = started + 300
    while True:
        left = asyncio.run(_backlog(s, sale_id))
        now = time.monotonic()
        if left < d.events and not first_at:  # from here on, start-up (imports, connections) is behind us
            first_at, first_left, first_cpu = now, left, cpu_s()
            d.first_batch_s = now - started
        if left == 0 or now > deadline:
            break
        time.sleep(0.02)
    if first_at and now > first_at:
        d.rows_per_s = first_left / (now - first_at)
        d.cpu_us_per_row = (cpu_s() - first_cpu) / max(1, first_left) * 1e6
    print(
        f"  drain: {d.rows_per_s:,.0f} rows/s, worker CPU {d.cpu_us_per_row:.1f} us/row"
        f" (first batch {d.first_batch_s:.2f} s after the worker started)",
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
            f" {r.non_2xx:,}{f' ({r.socket_errors} socket errors, {r.timeouts} timeouts)' if r.socket_errors else ''} |"
        )
    lines += [
        "",
        "| persister and Redis | value |",
        "| --- | ---: |",
        f"| drain rate ({d.events:,} events queued with the worker stopped), worker CPU per row |"
        f" {d.rows_per_s:,.0f} rows/s, {d.cpu_us_per_row:.1f} us/row |",
        f"| persistence lag during (b), p50 / p99 ({lag[0]:,} rows) | {lag[1]:.0f} ms / {lag[2]:.0f} ms |",
        f"| Redis memory per held reservation, event still queued | {d.bytes_queued:,.0f} bytes |",
        f"| Redis memory per held reservation, event persisted and trimmed | {d.bytes_settled:,.0f} bytes |",
    ]
    return "\n".join(lines)


# The service as production runs it (INFO: one JSON access line per request), minus the per-user
# rate limit, which a generator sending from one address would hit.
SERVICE_ENV = {"FLASHSALE_USER_RATE": "0", "LOG_LEVEL": "INFO"}
ROWS = ("b", "c", "c'", "d", "g")
# Settings that switch a lever off, each measured against the service as it runs by default.
LEVERS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "refusals from memory (FLASHSALE_VERDICT_TTL_MS=0 vs 200)": ({"FLASHSALE_VERDICT_TTL_MS": "0"}, ("c", "c'")),
    "access log line (LOG_LEVEL=INFO vs WARNING)": ({"LOG_LEVEL": "WARNING"}, ("b",)),
}


@dataclass
class Pair:
    lever: str
    before: Result
    after: Result


def sold_out_sale(s: Stack, sale_id: str, url: str) -> str:
    create_sale(s, sale_id, 1, url=url)
    httpx.post(
        f"{url}/v1/sales/{sale_id}/reservations",
        headers={"Authorization": f"Bearer {s.store_key}"},
        json={"user_id": "first", "sku": SKU, "quantity": 1},
        timeout=10,
    ).raise_for_status()
    return sale_id


def waiting_ticket(s: Stack, sale_id: str, url: str) -> str | None:
    """A sale with a waiting room that starts in an hour, and one shopper in its line: their poll
    path (None from a revision before waiting rooms, under --compare)."""
    body = sale_body(sale_id, 1000, 1)
    body["starts_at"] = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    body["waiting_room"] = {"admit_per_s": 100, "abandon_after_s": 3600}
    ops, store = ({"Authorization": f"Bearer {key}"} for key in (s.ops_key, s.store_key))
    if httpx.post(f"{url}/v1/sales", json=body, headers=ops, timeout=30).status_code == 422:
        return None
    joined = httpx.post(f"{url}/v1/sales/{sale_id}/queue", json={"user_id": "waiter"}, headers=store, timeout=10)
    joined.raise_for_status()
    return f"/v1/sales/{sale_id}/queue/{joined.json()['ticket']}?user_id=waiter"


class Sales:
    """The benchmark's sales on one service: one with stock for ever, one sold out, one with a
    shopper waiting in its line."""

    def __init__(self, s: Stack, url: str, tag: str) -> None:
        self.s, self.url = s, url
        self.big = create_sale(s, f"bench-stock-{tag}", 10_000_000, url=url)
        self.gone = sold_out_sale(s, f"bench-gone-{tag}", url)
        self.poll = waiting_ticket(s, f"bench-room-{tag}", url)

    def row(self, name: str, args: argparse.Namespace, label: str = "", connections: int = 0) -> Result:
        s, url = self.s, self.url
        reserve = f"/v1/sales/{self.big}/reservations"
        gone = f"/v1/sales/{self.gone}/reservations"
        users = f"{name[0]}{secrets.token_hex(3)}-"  # new users on every run
        script: tuple[str, ...]
        if name == "b":
            script = (str(RESERVE_LUA), reserve, SKU, s.store_key, users)
            return measure(label or "(b) reserve while stock lasts", url + reserve, args, script=script)
        if name in ("c", "c'", "f"):
            script = (str(RESERVE_LUA), gone, SKU, s.store_key, users)
            script += ("nokey",) if name == "c'" else ()
            default = {
                "c": "(c) reserve once sold out",
                "c'": "(c') reserve once sold out, no Idempotency-Key",
                "f": f"(f) {connections} connections on a sold-out item, wrk timeout 2 s",
            }[name]
            return measure(
                label or default,
                url + gone,
                args,
                script=script,
                connections=connections,
                timeout_s=2 if name == "f" else 10,
            )
        if name == "d":
            store = (f"Authorization: Bearer {s.store_key}",)
            return measure(label or "(d) GET sale", f"{url}/v1/sales/{self.big}", args, headers=store)
        if name == "g":
            if self.poll is None:
                return Result(f"{label or '(g)'}: no waiting rooms at this revision")
            store = (f"Authorization: Bearer {s.store_key}",)
            return measure(label or "(g) GET a waiting-room ticket (poll)", url + self.poll, args, headers=store)
        raise ValueError(f"no row {name!r}")


def lever_pairs(s: Stack, mine: Sales, args: argparse.Namespace) -> list[Pair]:
    """Each lever off (a second service beside the first, same servers) against it on, row by row."""
    pairs: list[Pair] = []
    for n, (lever, (off, rows)) in enumerate(LEVERS.items()):
        print(f"  lever: {lever}", flush=True)
        url = s.serve(1, {**SERVICE_ENV, **off}, name=f"lever{n}", port=free_port())
        theirs = Sales(s, url, f"lever{n}-{int(time.time())}")
        for row in rows:
            before = theirs.row(row, args, f"{row}, lever off")
            after = mine.row(row, args, f"{row}, lever on")
            pairs.append(Pair(f"{lever}: ({row})", before, after))
        stop_process(s.children.pop(f"lever{n}"))
    return pairs


@contextlib.contextmanager
def at_revision(s: Stack, rev: str) -> Iterator[tuple[str, Sales]]:
    """The service and its persister as they were at git revision ``rev`` (a worktree), beside
    the others on the same servers, under a key prefix of their own."""
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"flashsale-bench-{short}-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), short], cwd=ROOT, check=True, capture_output=True)
    names = (f"serve-{short}", f"worker-{short}")
    try:
        env = {
            **SERVICE_ENV,
            "PYTHONPATH": f"{tree / 'service'}:{ROOT}",
            "FLASHSALE_KEY_PREFIX": f"{s.key_prefix}:{short}",
        }
        s.spawn(names[1], s.flashsale("worker"), env)
        url = s.serve(1, env, name=names[0], port=free_port())
        yield short, Sales(s, url, f"{short}-{int(time.time())}")
    finally:
        for name in names:
            if name in s.children:
                stop_process(s.children.pop(name))
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False, capture_output=True)


def compare_pairs(s: Stack, mine: Sales, args: argparse.Namespace) -> list[Pair]:
    """``--compare A`` (A against this tree) or ``--compare A..B`` (A against B), row by row."""
    before_rev, _, after_rev = args.compare.partition("..")
    with contextlib.ExitStack() as revisions:
        before_name, before = revisions.enter_context(at_revision(s, before_rev))
        after_name, after = revisions.enter_context(at_revision(s, after_rev)) if after_rev else ("now", mine)
        pairs = []
        for row in args.compare_rows.split(","):
            old = before.row(row, args, f"{row}, at {before_name}")
            new = after.row(row, args, f"{row}, at {after_name}")
            pairs.append(Pair(f"{before_name} -> {after_name}: ({row})", old, new))
        return pairs


def pair_table(pairs: list[Pair], ceiling: float) -> str:
    lines = [
        "| lever: (row) | before req/s | after req/s | after / before | before vs (a) | after vs (a) "
        "| p99 ms before / after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in pairs:
        lines.append(
            f"| {p.lever} | {p.before.rps:,.0f} | {p.after.rps:,.0f} | {p.after.rps / (p.before.rps or 1):.2f}x |"
            f" {p.before.rps / ceiling:.2f} | {p.after.rps / ceiling:.2f} |"
            f" {p.before.p99_ms:.1f} / {p.after.p99_ms:.1f} |"
        )
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
    parser.add_argument("--crowd", type=int, default=1000, help="connections of row (f)")
    parser.add_argument("--levers", action="store_true", help="also each lever of LEVERS off vs on, side by side")
    parser.add_argument(
        "--compare",
        metavar="A[..B]",
        action="append",
        default=[],
        help="also the service at git revision A against this tree (or against revision B); repeatable",
    )
    parser.add_argument("--compare-rows", default="b,c,d", help="rows for --compare (of b, c, c', d)")
    parser.add_argument("--only", action="store_true", help="with --levers / --compare: skip the main table")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (make bench does it)")
        return 1
    interrupt_on_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPORTS / f"bench-{stamp}.md"
    pairs: list[Pair] = []
    rows: list[Result] = []
    try:
        with stack(REPORTS / f"bench-{stamp}.service.log") as s:
            s.start_worker()
            s.serve(1, SERVICE_ENV)
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
            mine = Sales(s, s.base_url, stamp[-6:])
            print(
                f"benchmarking on {s.base_url} (service), :{ceiling_port} (ceiling), :{pg_port} (pg_stock)", flush=True
            )
            ceiling_url = f"http://127.0.0.1:{ceiling_port}"
            rows.append(measure("(a) Starlette JSON route (ceiling)", f"{ceiling_url}/ping", args))
            script = (str(RESERVE_LUA), "/v1/sales/x/reservations", SKU, s.store_key, "a", "nokey")
            post = "(a') Starlette POST route, JSON body read, fixed 409"
            rows.append(measure(post, ceiling_url, args, script=script))
            if not args.only:
                rows += [mine.row(r, args) for r in ROWS]
                rows.append(
                    measure(
                        "(e) Postgres row, conditional UPDATE + INSERT",
                        f"http://127.0.0.1:{pg_port}/reserve",
                        args,
                        script=(str(RESERVE_LUA), "/reserve", SKU, s.store_key, "e"),
                    )
                )
                rows.append(mine.row("f", args, connections=args.crowd))
                granian = s.serve(1, SERVICE_ENV, name="granian", port=free_port(), server="granian")
                label = "(f') the same under `flashsale serve --server granian`"
                rows.append(Sales(s, granian, f"granian-{stamp[-6:]}").row("f", args, label, connections=args.crowd))
                stop_process(s.children.pop("granian"))
            if args.levers:
                pairs += lever_pairs(s, mine, args)
            for compare in args.compare:
                pairs += compare_pairs(s, mine, argparse.Namespace(**{**vars(args), "compare": compare}))
            if not args.only:
                wait_drained(s, mine.big)
                lag = asyncio.run(_lag(s, mine.big))
                drained = drain_and_memory(s, args)
            asyncio.run(_pg(s, "DROP TABLE IF EXISTS refbench_stock, refbench_orders"))
    except KeyboardInterrupt:
        print("\ninterrupted; everything started here is stopped")
        return 130
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError, httpx.HTTPError) as exc:
        print(f"bench failed: {exc}")
        return 1
    text = table(rows, lag, drained, args) if not args.only else f"(a) ceiling: {rows[0].rps:,.0f} req/s"
    if pairs:
        text += "\n\nLevers, each measured off then on in the same run:\n\n" + pair_table(pairs, rows[0].rps or 1.0)
    out.write_text(text + "\n")
    print()
    print(text)
    print(f"\n(also in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

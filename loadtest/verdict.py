"""The verdict of a load-test run: waits for the queue to drain, then checks the contract's
invariants three ways (the clients' own records, ``/progress``, Postgres itself) and with
``flashsale reconcile``; writes ``PREFIX.json`` and ``PREFIX.txt`` whose last line is ``PASS``
or ``FAIL: <reasons>``, and exits 1 on any breach.

    python -m loadtest.verdict PREFIX.records.json --out PREFIX

Environment: DATABASE_URL, REDIS_URL, FLASHSALE_KEY_PREFIX (as the service has them), OPS_KEY;
LOADTEST_DRAIN_TIMEOUT (s, default 60), LOADTEST_RECONCILE_WAIT (s, default 15).
Run in a plain process (not under locust's gevent), which the locustfile does at test stop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from loadtest import queue_verdict
from loadtest.records import FOREVER, Records, peak

EXPECTED = {  # the client's last view -> the statuses Postgres may have for it
    "confirmed": {"confirmed"},
    "released": {"released"},
    "expired": {"expired"},
    "held": {"held", "expired"},
    "unknown": {"held", "confirmed", "released", "expired"},
}
SWEEP_GRACE_MS = 3000  # a hold is released within 2 s of expires_at (contract), plus a margin


@dataclass
class Verdict:
    scenario: str
    sale_id: str
    users: int
    duration_s: float
    sale_items: list[dict[str, Any]] = field(default_factory=list)
    attempts: int = 0
    acknowledged: int = 0
    winners: int = 0
    units_won: int = 0
    units_sold: int = 0
    oversold: int = 0
    lost: int = 0
    duplicates: int = 0
    stale_holds: int = 0
    most_per_user: int = 0  # the most units one user held or bought of one item at one instant (Postgres)
    server_errors: int = 0
    error_rate: float = 0.0
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    answers: dict[str, int] = field(default_factory=dict)
    postgres: dict[str, int] = field(default_factory=dict)  # status -> rows
    progress: dict[str, Any] | None = None
    drain_s: float = 0.0
    reconcile: str = ""
    details: list[str] = field(default_factory=list)
    breaches: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    queue: dict[str, Any] | None = None  # a waiting room's numbers (queue_verdict.py)

    @property
    def passed(self) -> bool:
        return not self.breaches

    def last_line(self) -> str:
        return "PASS" if self.passed else "FAIL: " + "; ".join(self.breaches)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pass": self.passed, "last_line": self.last_line()}


def _ms(at: datetime | None) -> int:
    return FOREVER if at is None else round(at.timestamp() * 1000)


def _items(progress: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-item part of a /progress document, by sku (a list of items or a mapping)."""
    raw = progress.get("items", [])
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items() if isinstance(v, dict)}
    return {str(i.get("sku")): i for i in raw if isinstance(i, dict)}


async def _progress(http: httpx.AsyncClient, sale_id: str) -> dict[str, Any] | None:
    r = await http.get(f"/v1/sales/{sale_id}/progress")
    if r.status_code in (404, 405):
        return None
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


async def _redis_backlog(sale_id: str) -> int:
    """The queue backlog read from Redis directly, for a service without /progress yet."""
    from redis.asyncio import Redis

    from flashsale.keys import Keys
    from flashsale.queue import backlog

    redis = Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    try:
        return (await backlog(redis, Keys(os.environ.get("FLASHSALE_KEY_PREFIX") or "fs"), sale_id)).events
    finally:
        await redis.aclose()


async def drain(v: Verdict, http: httpx.AsyncClient, patience: float) -> tuple[bool, dict[str, Any] | None]:
    """Waits until every event of the sale is in Postgres; returns (drained, last /progress)."""
    begun = time.monotonic()
    progress = await _progress(http, v.sale_id)
    if progress is None:
        v.notes.append("GET /progress is not there yet: its checks are skipped; the backlog was read from Redis")
    while True:
        if progress is not None:
            left = int(progress.get("queue_backlog", 0))
        else:
            left = await _redis_backlog(v.sale_id)
        if left == 0:
            v.drain_s = round(time.monotonic() - begun, 2)
            return True, progress
        if time.monotonic() - begun > patience:
            v.breaches.append(f"the queue did not drain in {patience:.0f} s ({left} events left)")
            return False, progress
        await asyncio.sleep(0.25)
        if progress is not None:
            progress = await _progress(http, v.sale_id)


def check_progress(v: Verdict, rec: Records, progress: dict[str, Any], pg_rows: int) -> None:
    """Invariant 1 from the service's own numbers, and /progress agreeing with Postgres."""
    items = _items(progress)
    for it in rec.sale["items"]:
        got = items.get(it["sku"])
        if got is None:
            v.breaches.append(f"/progress has no item {it['sku']}")
            continue
        total, avail, held, conf = (int(got.get(k, 0)) for k in ("stock_total", "available", "held", "confirmed"))
        v.oversold = max(v.oversold, held + conf - total)
        if avail + held + conf != total:
            v.breaches.append(f"{it['sku']}: available {avail} + held {held} + confirmed {conf} != stock {total}")
    persisted = progress.get("persisted")
    if isinstance(persisted, int) and persisted != pg_rows:
        v.breaches.append(f"/progress says {persisted} reservations persisted, Postgres has {pg_rows}")
    v.progress = progress


def check_client(v: Verdict, rec: Records) -> tuple[int, int]:
    """Oversell and per-user limit from what the clients saw; returns (duplicate keys, users over)."""
    stock = {i["sku"]: int(i["stock"]) for i in rec.sale["items"]}
    limit = {i["sku"]: int(i["per_user_limit"]) for i in rec.sale["items"]}
    per_sku: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    per_user: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    for a in rec.acked.values():
        span = a.interval()
        if span is not None:
            per_sku[a.sku].append((*span, a.qty))
            per_user[(a.user, a.sku)].append((*span, a.qty))
    for sku, spans in per_sku.items():
        over = peak(spans) - stock.get(sku, 0)
        if over > 0:
            v.details.append(f"clients held {over} units of {sku} over its stock at once")
        v.oversold = max(v.oversold, over)
    over_users = [u for (u, sku), spans in per_user.items() if peak(spans) > limit.get(sku, 0)]
    dup_keys = [k for k, rids in rec.by_key.items() if len(rids) > 1]
    for k in dup_keys[:5]:
        v.details.append(f"idempotency key {k!r} answered with {len(rec.by_key[k])} reservations")
    for u in over_users[:5]:
        v.details.append(f"user {u} held more than the per-user limit at once (client records)")
    return len(dup_keys), len(over_users)


async def check_postgres(v: Verdict, rec: Records, conn: asyncpg.Connection, drained_at_ms: int) -> tuple[int, int]:
    """Nothing lost, no oversell, no duplicate, holds expired, all from the rows themselves;
    returns (duplicate keys, users over the limit)."""
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id, sku, user_id, quantity, status, idempotency_key, created_at, expires_at, confirmed_at,"
            " released_at, expired_at FROM reservations WHERE sale_id = $1",
            v.sale_id,
        )
    }
    v.postgres = dict(Counter(r["status"] for r in rows.values()))
    v.units_sold = sum(r["quantity"] for r in rows.values() if r["status"] == "confirmed")
    missing, wrong = [], []
    for a in rec.acked.values():
        row = rows.get(a.rid)
        if row is None:
            missing.append(a)
            continue
        allowed = EXPECTED.get(a.status, set())
        if a.status == "held" and drained_at_ms > a.expires_ms + SWEEP_GRACE_MS:
            allowed = {"expired"}
        if row["status"] not in allowed or (row["user_id"], row["sku"], row["quantity"]) != (a.user, a.sku, a.qty):
            wrong.append((a, row["status"]))
    v.lost = len(missing) + len(wrong)
    for a in missing[:5]:
        v.details.append(f"lost: {a.rid} ({a.status} for {a.user}) is not in Postgres")
    for a, status in wrong[:5]:
        v.details.append(f"lost: {a.rid} is {status} in Postgres, the client saw {a.status}")
    if missing or wrong:
        v.details.append(f"lost: {len(missing)} acknowledged reservations missing, {len(wrong)} with a wrong status")

    stock = {i["sku"]: int(i["stock"]) for i in rec.sale["items"]}
    limit = {i["sku"]: int(i["per_user_limit"]) for i in rec.sale["items"]}
    per_sku: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    per_user: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    for r in rows.values():
        end = {"released": r["released_at"], "expired": r["expired_at"]}.get(r["status"])
        span = (_ms(r["created_at"]), _ms(end), int(r["quantity"]))
        per_sku[r["sku"]].append(span)
        per_user[(r["user_id"], r["sku"])].append(span)
        if r["status"] == "held" and _ms(r["expires_at"]) < drained_at_ms - SWEEP_GRACE_MS:
            v.stale_holds += 1
    for sku, spans in per_sku.items():
        over = peak(spans) - stock.get(sku, 0)
        if over > 0:
            v.details.append(f"postgres: {over} units of {sku} held or sold over its stock at one instant")
        v.oversold = max(v.oversold, over)
    peaks = {key: peak(spans) for key, spans in per_user.items()}
    v.most_per_user = max(peaks.values(), default=0)
    over_users = [u for (u, sku), most in peaks.items() if most > limit.get(sku, 0)]
    for u in over_users[:5]:
        v.details.append(f"user {u} held more than the per-user limit at once (postgres)")
    dup = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM reservations WHERE sale_id = $1 AND idempotency_key <> ''"
        " GROUP BY user_id, idempotency_key HAVING count(*) > 1) d",
        v.sale_id,
    )
    return int(dup), len(over_users)


async def reconcile(v: Verdict, wait: float) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flashsale",
        "reconcile",
        v.sale_id,
        "--wait",
        str(wait),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), wait + 60)
    v.reconcile = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        v.breaches.append(f"flashsale reconcile found differences (exit {proc.returncode})")


async def judge(rec: Records) -> Verdict:
    v = Verdict(rec.scenario, rec.sale["id"], rec.users, rec.duration_s, rec.sale["items"])
    v.attempts = rec.attempts
    v.acknowledged = len(rec.acked)
    v.winners = len({a.user for a in rec.acked.values()})
    v.units_won = sum(a.qty for a in rec.acked.values())
    v.server_errors = rec.server_errors
    v.error_rate = rec.error_rate
    v.latency = rec.latency
    v.answers = dict(sorted(rec.answers.items()))
    v.notes += rec.notes
    headers = {"Authorization": f"Bearer {os.environ.get('OPS_KEY', '')}"}
    async with httpx.AsyncClient(base_url=rec.base_url, headers=headers, timeout=10) as http:
        drained, progress = await drain(v, http, float(os.environ.get("LOADTEST_DRAIN_TIMEOUT", "60")))
        drained_at_ms = round(time.time() * 1000)
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        try:
            pg_keys, pg_users = await check_postgres(v, rec, conn, drained_at_ms)
            if rec.sale.get("waiting_room"):
                rows = await conn.fetch(
                    "SELECT user_id, quantity, status, created_at, confirmed_at, released_at, expired_at"
                    " FROM reservations WHERE sale_id = $1",
                    v.sale_id,
                )
                v.queue, found = queue_verdict.judge(rec, [dict(r) for r in rows])
                v.breaches += found
        finally:
            await conn.close()
        if progress is not None:
            check_progress(v, rec, await _progress(http, v.sale_id) or progress, sum(v.postgres.values()))
    client_keys, client_users = check_client(v, rec)
    v.duplicates = max(pg_keys, client_keys) + max(pg_users, client_users)
    if drained:
        await reconcile(v, float(os.environ.get("LOADTEST_RECONCILE_WAIT", "15")))
    v.oversold = max(0, v.oversold)
    for name, value in (
        ("oversold", v.oversold),
        ("lost", v.lost),
        ("duplicates", v.duplicates),
        ("holds not expired", v.stale_holds),
        ("server errors", v.server_errors),
    ):
        if value:
            v.breaches.insert(0, f"{name} {value}")
    if not rec.acked:
        v.breaches.append("no reservation was acknowledged: the run tested nothing")
    v.breaches += [f"answer the contract does not allow: {a}" for a in rec.anomalies[:5]]
    v.breaches += [f"scenario: {e}" for e in rec.expectations]
    return v


def _rows(pairs: Iterable[tuple[str, object, str]]) -> list[str]:
    return [f"  {name:<40}{value!s:>12}   {must}".rstrip() for name, value, must in pairs]


def table(v: Verdict) -> str:
    lines = [f"== {v.scenario}: sale {v.sale_id}, {v.users} users, {v.duration_s:.0f} s =="]
    lines += _rows(
        (
            ("reservation attempts", v.attempts, ""),
            ("reservations acknowledged", v.acknowledged, ""),
            ("winners (users)", v.winners, ""),
            ("units won (acknowledged)", v.units_won, ""),
            ("units sold (confirmed in Postgres)", v.units_sold, ""),
            (
                "most units one user had at once",
                v.most_per_user,
                "limit " + "/".join(str(i["per_user_limit"]) for i in v.sale_items),
            ),
            ("oversold", v.oversold, "must be 0"),
            ("lost", v.lost, "must be 0"),
            ("duplicates", v.duplicates, "must be 0"),
            ("holds not expired", v.stale_holds, "must be 0"),
            ("server errors (5xx but 503)", v.server_errors, "must be 0"),
            ("error rate", f"{v.error_rate:.2%}", ""),
        )
    )
    lines += ["", f"  {'endpoint':<30}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>10}"]
    for name, s in v.latency.items():
        lines.append(
            f"  {name:<30}{int(s['n']):>10}{s['p50']:>10.1f}{s['p95']:>10.1f}{s['p99']:>10.1f}{int(s['errors']):>10}"
        )
    lines += ["", "  answers: " + ", ".join(f"{k}: {n}" for k, n in v.answers.items())]
    lines.append("  postgres: " + (", ".join(f"{k} {n}" for k, n in sorted(v.postgres.items())) or "no rows"))
    if v.progress is not None:
        for sku, it in _items(v.progress).items():
            lines.append(
                f"  progress {sku}: "
                + ", ".join(f"{k} {it.get(k)}" for k in ("stock_total", "available", "held", "confirmed", "released"))
            )
        lines.append(
            f"  progress: persisted {v.progress.get('persisted')}, queue_backlog {v.progress.get('queue_backlog')}"
        )
    if v.queue is not None:
        lines += ["", *_rows((name, value, "") for name, value in v.queue.items()), ""]
    lines.append(f"  queue drained in {v.drain_s} s")
    lines += ["  " + line for line in v.reconcile.splitlines()]
    lines += [f"  detail: {d}" for d in v.details[:30]]
    lines += [f"  note: {n}" for n in v.notes]
    lines.append(v.last_line())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.verdict", description=__doc__)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.txt")
    args = parser.parse_args(argv)
    rec = Records.load(args.records)
    try:
        v = asyncio.run(judge(rec))
    except (OSError, asyncpg.PostgresError, httpx.HTTPError, KeyError, TimeoutError) as exc:
        v = Verdict(rec.scenario, rec.sale["id"], rec.users, rec.duration_s)
        v.breaches.append(f"the invariants could not be checked: {exc!r}")
    text = table(v)
    args.out.with_suffix(".json").write_text(json.dumps(v.to_json(), indent=1, default=str))
    args.out.with_suffix(".txt").write_text(text + "\n")
    return 0 if v.passed else 1


if __name__ == "__main__":
    sys.exit(main())

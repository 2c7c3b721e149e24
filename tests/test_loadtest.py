"""The load tests themselves: small smoke runs of the scenarios must PASS, and a service that
loses reservations on their way to Postgres must make the verdict FAIL.

Locust runs as a subprocess (`python -m loadtest.run`) so that gevent's monkey-patching stays
out of this process; the runs use this suite's servers, a fresh database and a key prefix of
their own, which the fixtures drop afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from loadtest import queue_verdict
from loadtest.bench import parse_wrk
from loadtest.records import FOREVER, Acked, Part, Records, merge, peak
from loadtest.verdict import Verdict, check_client, drain
from redis.asyncio import Redis

from flashsale.persister import Persister
from flashsale.settings import ROOT, Settings

from .conftest import create_sale

# Heavy (many processes, thousands of requests): these run one after another on one xdist
# worker (make test uses --dist loadgroup), never two at once on this 2-core machine; beside the
# other heavy group (test_invariants, test_faults), whose crowds they would otherwise queue behind.
pytestmark = pytest.mark.xdist_group("loadtest")

DROP_EVERY_FIFTH = """
CREATE TABLE loadtest_dropped (id text PRIMARY KEY);
CREATE SEQUENCE loadtest_drop_seq;
CREATE FUNCTION loadtest_drop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- every 5th row written is silently skipped, and so is every later write of the same reservation
    IF EXISTS (SELECT 1 FROM loadtest_dropped WHERE id = NEW.id) OR nextval('loadtest_drop_seq') % 5 = 0 THEN
        INSERT INTO loadtest_dropped VALUES (NEW.id) ON CONFLICT DO NOTHING;
        RETURN NULL;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER loadtest_drop BEFORE INSERT ON reservations FOR EACH ROW EXECUTE FUNCTION loadtest_drop();
"""


async def run_scenario(
    settings: Settings, reports: Path, scenario: str, users: int, duration: str, processes: int = 1, **env: str
) -> tuple[int, list[str], dict[str, Any]]:
    """Runs ``python -m loadtest.run`` to the end; returns its exit code, its lines and the verdict."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest.run",
        "--scenario",
        scenario,
        "--users",
        str(users),
        "--duration",
        duration,
        "--reports",
        str(reports),
        "--processes",
        str(processes),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env={
            **os.environ,
            "REDIS_URL": settings.redis_url,
            "DATABASE_URL": settings.database_url,
            "FLASHSALE_KEY_PREFIX": settings.key_prefix,
            "PYTHONPATH": str(ROOT),
            "LOADTEST_PROGRESS_S": "5",
            **env,
        },
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 150)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the runner stops everything it started
        try:
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    lines = out.decode(errors="replace").strip().splitlines()
    verdicts = sorted(p for p in reports.glob(f"{scenario}-*.json") if ".records." not in p.name)
    verdict = json.loads(verdicts[-1].read_text()) if verdicts else {}
    return proc.returncode or 0, lines, verdict


@pytest.mark.timeout(200)
async def test_flash_crowd_keeps_every_invariant(settings: Settings, redis: Redis, tmp_path: Path) -> None:
    code, lines, verdict = await run_scenario(settings, tmp_path, "flash_crowd", 150, "6s")
    assert lines[-1] == "PASS", "\n".join(lines[-60:])
    assert code == 0
    assert (verdict["oversold"], verdict["lost"], verdict["duplicates"]) == (0, 0, 0)
    assert verdict["acknowledged"] > 0


@pytest.mark.timeout(200)
async def test_flash_crowd_in_two_locust_processes_is_judged_on_the_records_of_both(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    code, lines, verdict = await run_scenario(settings, tmp_path, "flash_crowd", 100, "5s", processes=2)
    assert lines[-1] == "PASS", "\n".join(lines[-60:])
    assert code == 0
    parts = [Part.load(p) for p in tmp_path.glob("flash_crowd-*.records.[0-9]*.json")]
    assert len({p.pids[0] for p in parts}) == len(parts) == 2
    assert all(p.records.attempts > 0 for p in parts)  # both worker processes made load
    assert verdict["attempts"] == sum(p.records.attempts for p in parts)
    assert verdict["acknowledged"] == sum(len(p.records.acked) for p in parts) > 0
    assert any("records of 2 locust worker processes merged" in n for n in verdict["notes"])


@pytest.mark.timeout(200)
async def test_retry_storm_never_makes_two_reservations_for_one_key(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    code, lines, verdict = await run_scenario(settings, tmp_path, "retry_storm", 150, "6s")
    assert lines[-1] == "PASS", "\n".join(lines[-60:])
    assert code == 0
    assert (verdict["oversold"], verdict["lost"], verdict["duplicates"]) == (0, 0, 0)
    assert verdict["answers"].get("reserve 200", 0) > 0  # retries got the earlier reservation back


@pytest.mark.timeout(200)
async def test_reservations_dropped_on_their_way_to_postgres_fail_the_run(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(DROP_EVERY_FIFTH)
    finally:
        await conn.close()
    code, lines, verdict = await run_scenario(settings, tmp_path, "flash_crowd", 200, "6s", LOADTEST_RECONCILE_WAIT="1")
    assert code == 1, "\n".join(lines[-60:])
    assert lines[-1].startswith("FAIL: ") and "lost" in lines[-1]
    assert verdict["lost"] > 0 and not verdict["pass"]


def test_peak_counts_units_held_at_one_instant() -> None:
    assert peak([(0, 10, 1), (5, 15, 2), (20, 30, 5)]) == 5
    assert peak([(0, 10, 1), (10, 20, 1)]) == 1  # one ends as the other starts: not at once
    assert peak([(0, FOREVER, 2), (1, 2, 1)]) == 3
    assert peak([]) == 0


def records(*acked: Acked, by_key: dict[str, set[str]] | None = None) -> Records:
    sale = {"id": "s", "items": [{"sku": "a", "stock": 2, "per_user_limit": 1}]}
    rec = Records(scenario="unit", sale=sale, base_url="http://127.0.0.1:9")
    rec.acked = {a.rid: a for a in acked}
    rec.by_key = by_key or {f"{a.user} {a.key}": {a.rid} for a in acked}
    return rec


def hold(rid: str, user: str, start: int, end: int, status: str = "held") -> Acked:
    return Acked(rid=rid, user=user, sku="a", qty=1, key=rid, created_ms=start, expires_ms=end, status=status)


def test_client_records_show_an_oversell_and_a_user_over_the_limit() -> None:
    v = Verdict("unit", "s", 1, 1)
    rec = records(hold("r1", "u1", 0, 100), hold("r2", "u2", 10, 100, "confirmed"), hold("r3", "u1", 50, 60))
    assert check_client(v, rec) == (0, 1)
    assert v.oversold == 1


def test_client_records_show_two_reservations_for_one_key() -> None:
    v = Verdict("unit", "s", 1, 1)
    rec = records(hold("r1", "u1", 0, 10), hold("r2", "u1", 20, 30), by_key={"u1 k": {"r1", "r2"}})
    assert check_client(v, rec) == (1, 0)
    assert v.oversold == 0


def test_a_hold_released_before_another_starts_is_no_oversell() -> None:
    v = Verdict("unit", "s", 1, 1)
    first = hold("r1", "u1", 0, 100, "released")
    first.final_ms = 40
    rec = records(first, hold("r2", "u2", 10, 100), hold("r3", "u3", 40, 100))
    assert check_client(v, rec) == (0, 0)
    assert v.oversold == 0


def test_records_of_two_processes_merge_and_one_key_answered_in_both_is_a_duplicate(tmp_path: Path) -> None:
    first = records(hold("r1", "u1", 0, 10), hold("r2", "u2", 5, 100, "confirmed"), by_key={"u1 k": {"r1"}})
    first.attempts, first.answers["reserve 201"] = 2, 2
    second = records(hold("r3", "u1", 20, 30), hold("r2", "u2", 5, 100), by_key={"u1 k": {"r3"}})
    second.attempts, second.answers["reserve 201"] = 3, 2
    second.answers["reserve 409 sold_out"] = 1
    for pid, rec, times in ((11, first, [5.0, 1.0]), (12, second, [3.0, 2.0, 4.0])):
        Part([pid], rec, {"POST reserve": times}, {"POST reserve": pid - 11}).save(tmp_path / f"p.records.{pid}.json")
    assert check_client(Verdict("unit", "s", 1, 1), first) == (0, 0)  # neither process alone sees it
    assert check_client(Verdict("unit", "s", 1, 1), second) == (0, 0)

    merged = merge([Part.load(tmp_path / f"p.records.{pid}.json") for pid in (11, 12)])
    rec = merged.records
    assert merged.pids == [11, 12]
    assert (rec.attempts, dict(rec.answers)) == (5, {"reserve 201": 4, "reserve 409 sold_out": 1})
    assert sorted(rec.acked) == ["r1", "r2", "r3"] and rec.acked["r2"].status == "confirmed"
    assert rec.by_key["u1 k"] == {"r1", "r3"}
    assert sorted(merged.samples["POST reserve"]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert merged.failures == {"POST reserve": 1}
    v = Verdict("unit", "s", 1, 1)
    assert check_client(v, rec) == (1, 0)
    assert "idempotency key 'u1 k' answered with 2 reservations" in v.details


def no_progress(request: httpx.Request) -> httpx.Response:
    return httpx.Response(404, json={"error": {"code": "not_found", "message": "no endpoint"}})


async def backlog_of_one(client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Verdict:
    sale = await create_sale(client)
    r = await client.post(f"/v1/sales/{sale['id']}/reservations", json={"user_id": "u1", "sku": "phone"})
    assert r.status_code == 201
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("FLASHSALE_KEY_PREFIX", settings.key_prefix)
    return Verdict("unit", sale["id"], 1, 1)


async def test_without_progress_the_backlog_is_read_from_redis(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = await backlog_of_one(client, settings, monkeypatch)
    async with httpx.AsyncClient(transport=httpx.MockTransport(no_progress), base_url="http://x") as http:
        assert await drain(v, http, patience=0.5) == (False, None)  # no worker: the event stays queued
    assert "GET /progress is not there yet" in v.notes[0]
    assert v.breaches == ["the queue did not drain in 0 s (2 events left)"]  # the sale's event and the hold's


async def test_without_progress_a_drained_queue_is_seen_in_redis(
    client: httpx.AsyncClient, settings: Settings, worker: Persister, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = await backlog_of_one(client, settings, monkeypatch)
    async with httpx.AsyncClient(transport=httpx.MockTransport(no_progress), base_url="http://x") as http:
        assert await drain(v, http, patience=20) == (True, None)
    assert not v.breaches


def test_bench_reads_wrk_output() -> None:
    out = """Running 10s test @ http://127.0.0.1:8000/ping
  Latency Distribution
     50%  812.00us
     99%    1.20s
  48651 requests in 10.00s, 7.01MB read
  Non-2xx or 3xx responses: 17
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:   4865.10
"""
    r = parse_wrk("a", out)
    assert (r.rps, r.p50_ms, r.p99_ms, r.requests, r.non_2xx, r.socket_errors) == (4865.1, 0.812, 1200.0, 48651, 17, 3)


@pytest.mark.timeout(200)
async def test_the_waiting_room_admits_fairly_follows_the_stock_and_lets_nobody_in_without_a_token(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    code, lines, verdict = await run_scenario(settings, tmp_path, "waiting_room", 300, "16s")
    assert lines[-1] == "PASS", "\n".join(lines[-60:])
    assert code == 0
    q = verdict["queue"]
    assert q["admitted pre-start joiners"] >= 100 and q["admitted later joiners"] > 0
    assert q["left without polling"] > 0 and q["pause: s with every unit out"] > 0
    assert q["closed: waiting tickets told sold_out"] > 0  # it sold out, and the line was told so
    assert verdict["answers"]["sneak reserve 403 not_admitted"] > 0


def queue_records(tickets: list[dict[str, Any]], samples: list[dict[str, Any]] | None = None) -> Records:
    sale = {
        "id": "s",
        "starts_at": "2026-01-01T00:00:00+00:00",
        "waiting_room": {"admit_per_s": 10},
        "items": [{"sku": "a", "stock": 2, "per_user_limit": 1}],
    }
    rec = Records(scenario="unit", sale=sale, base_url="http://127.0.0.1:9")
    rec.tickets, rec.queue_samples = tickets, samples or []
    return rec


def ticket(n: int, sent: int, admitted: int | None) -> dict[str, Any]:
    """A ticket whose join was sent at ``sent`` and answered 5 ms later (before or after OPENS)."""
    return {"user": f"u{n}", "sent_ms": sent, "joined_ms": sent + 5, "admitted_ms": admitted} | {
        "final": "waiting" if admitted is None else "admitted",
        "last_waiting_ms": None,
        "reason": None,
    }


OPENS = 1_767_225_600_000  # the unit sale's starts_at, ms


def test_pre_start_joiners_admitted_in_their_join_order_fail_the_shuffle_check() -> None:
    in_order = [ticket(n, OPENS - 5000 + n * 10, OPENS + n * 100) for n in range(120)]
    _, breaches = queue_verdict.judge(queue_records(in_order), [])
    assert any("join order" in b for b in breaches)
    shuffled = [ticket(n, OPENS - 5000 + n * 10, OPENS + ((n * 7) % 120) * 100) for n in range(120)]
    summary, breaches = queue_verdict.judge(queue_records(shuffled), [])
    assert not any("join order" in b for b in breaches), summary


def test_later_joiners_admitted_out_of_their_order_fail_the_fifo_check() -> None:
    early = [ticket(n, OPENS - 5000 + n * 10, OPENS + ((n * 7) % 120) * 100) for n in range(120)]
    late = [ticket(100, OPENS + 100, OPENS + 9000), ticket(101, OPENS + 200, OPENS + 8000)]
    _, breaches = queue_verdict.judge(queue_records(early + late), [])
    assert any("out of their order" in b for b in breaches)


def test_a_line_that_stops_moving_while_units_are_free_fails_the_stall_check() -> None:
    samples = [
        {"at_ms": OPENS + 1000 + k * 500, "waiting": 5, "admitted": 3, "expired": 0, "closed": None}
        | {"available": 1, "held": 1}
        for k in range(6)
    ]
    assert queue_verdict.stalls(samples, OPENS) == [(OPENS + 1000, 2500)]
    moving = [s | {"admitted": k} for k, s in enumerate(samples)]
    assert queue_verdict.stalls(moving, OPENS) == []


def test_an_admission_while_every_unit_is_held_fails_the_pause_check() -> None:
    rows = [
        {"user_id": "u1", "quantity": 1, "status": "held", "created_at": at(OPENS), "confirmed_at": None}
        | {"released_at": None, "expired_at": None},
        {"user_id": "u2", "quantity": 1, "status": "released", "created_at": at(OPENS + 10), "confirmed_at": None}
        | {"released_at": at(OPENS + 3000), "expired_at": None},
    ]
    shuffled = [ticket(n, OPENS - 5000 + n * 10, OPENS - 1000 + ((n * 7) % 120) * 10) for n in range(120)]
    before = [ticket(n, OPENS - 100, OPENS - 20 + n) for n in (1, 2)]  # admitted, then they held
    _, breaches = queue_verdict.judge(queue_records([*shuffled, *before]), rows)
    assert not any("held for 0.5 s" in b for b in breaches), breaches
    inside = ticket(99, OPENS + 600, OPENS + 2000)  # both units out since OPENS + 10
    _, breaches = queue_verdict.judge(queue_records([*shuffled, *before, inside]), rows)
    assert any("held for 0.5 s" in b for b in breaches)


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)

"""`flashsale serve --server granian`: the same service under granian, as real processes on real
servers. It answers (ids on every response), counts across its workers, and SIGTERM / SIGINT stop
it in seconds, an open progress stream included, after the lifespan shutdown has run in every
worker (the counts answered from memory reach Redis only then)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from flashsale import cli
from flashsale.embedded import free_port
from flashsale.keys import Keys
from flashsale.settings import Settings

from . import procs
from .conftest import OPS, STORE, create_sale

SOLD_OUT_TRIES = 30
STOP_WITHIN_S = 8.0  # about 2.5 s here, as under uvicorn: most of it the lifespan shutdown's


@contextlib.contextmanager
def granian(settings: Settings, workers: int, **extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = ["serve", "--server", "granian", "--port", str(port), "--workers", str(workers)]
    proc = procs.spawn(args, procs.env_for(settings, **extra))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"flashsale serve --server granian exited with {proc.returncode} in start-up"
            assert time.monotonic() < deadline, "flashsale serve --server granian did not answer in 30 s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield url, proc
    finally:
        procs.stop(proc)


async def stopped(proc: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    started = time.monotonic()
    proc.send_signal(sig)
    while proc.poll() is None:
        assert time.monotonic() - started < STOP_WITHIN_S, f"still running {STOP_WITHIN_S:.0f} s after {sig.name}"
        await asyncio.sleep(0.05)
    assert proc.returncode == 0, f"exit status {proc.returncode} after {sig.name}"
    return time.monotonic() - started


async def sold_out_tries(c: httpx.AsyncClient, sid: str, n: int, tag: str) -> None:
    for i in range(n):
        r = await c.post(f"/v1/sales/{sid}/reservations", json={"user_id": f"{tag}-{i}", "sku": "phone", "quantity": 1})
        assert r.status_code == 409 and r.json()["error"]["code"] == "sold_out", r.text
        assert len(r.headers["x-request-id"]) == 32  # made by the service: none was sent


async def one_left(c: httpx.AsyncClient) -> str:
    """A sale of one unit, reserved: every try after it is sold out."""
    sale = await create_sale(c, items=[{"sku": "phone", "name": "Phone", "price_cents": 100, "stock": 1}])
    r = await c.post(
        f"/v1/sales/{sale['id']}/reservations",
        json={"user_id": "first", "sku": "phone", "quantity": 1},
        headers={"Idempotency-Key": "first", "X-Request-ID": "granian-201"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == "granian-201"
    return str(sale["id"])


async def reserves_counted(c: httpx.AsyncClient) -> float:
    text = (await c.get("/metrics", headers=OPS)).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("flashsale_http_requests_total{") and "/reservations" in line
    )


async def test_granian_serves_two_workers_and_stops_on_sigterm_with_a_stream_open(
    settings: Settings, redis: Redis, keys: Keys
) -> None:
    with granian(settings, workers=2) as (url, proc):
        async with httpx.AsyncClient(base_url=url, headers=STORE, timeout=10) as c:
            r = await c.get("/healthz", headers={"X-Request-ID": "granian-health"})
            assert r.status_code == 200 and r.headers["x-request-id"] == "granian-health"
            sid = await one_left(c)
            await sold_out_tries(c, sid, SOLD_OUT_TRIES, "late")
            # /metrics adds up both workers (PROMETHEUS_MULTIPROC_DIR); the other's counts come
            # at most metrics.FLUSH_S late.
            deadline = time.monotonic() + 5
            while (answered := await reserves_counted(c)) != 1 + SOLD_OUT_TRIES and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert answered == 1 + SOLD_OUT_TRIES, "/metrics does not add up both workers"
            # A progress stream open at the stop: granian drains every open request first, and
            # sse-starlette ends its streams by itself only under uvicorn.
            async with (
                httpx.AsyncClient(base_url=url, headers=OPS, timeout=10) as ops,
                ops.stream("GET", f"/v1/sales/{sid}/progress/stream") as stream,
            ):
                chunks = stream.aiter_bytes()
                assert b"progress" in await anext(chunks)
                await sold_out_tries(c, sid, SOLD_OUT_TRIES, "later")  # some wait in memory: the tally
                await stopped(proc, signal.SIGTERM)
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in chunks:  # ended by the stop, not by us
                        pass
    item = keys.item(sid, "phone")
    assert int(await redis.hget(item, "attempts") or 0) == 1 + 2 * SOLD_OUT_TRIES, "an attempt was not counted"


async def test_granian_runs_the_lifespan_shutdown_on_sigint(settings: Settings, redis: Redis, keys: Keys) -> None:
    # The same handler as SIGTERM's, in granian's main process and in its workers. Refusals
    # repeated from memory reach Redis through the tally: with its timer this long and no
    # progress read (which flushes it), through the flush of the lifespan shutdown alone.
    with granian(settings, workers=1, FLASHSALE_TALLY_MS="600000", FLASHSALE_VERDICT_TTL_MS="10000") as (url, proc):
        async with httpx.AsyncClient(base_url=url, headers=STORE, timeout=10) as c:
            sid = await one_left(c)
            await sold_out_tries(c, sid, SOLD_OUT_TRIES, "late")
        item = keys.item(sid, "phone")
        assert int(await redis.hget(item, "attempts") or 0) < 1 + SOLD_OUT_TRIES, "none answered from memory"
        await stopped(proc, signal.SIGINT)
    assert int(await redis.hget(item, "attempts") or 0) == 1 + SOLD_OUT_TRIES, "the lifespan shutdown did not run"
    assert int(await redis.hget(item, "rej:sold_out") or 0) == SOLD_OUT_TRIES


def test_granian_missing_exits_2_and_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m == "granian" or m.startswith("granian.")] + ["granian"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import granian` now fails as if it were absent
    assert cli.main(["serve", "--server", "granian"]) == 2
    assert "pip install 'flashsale[granian]'" in capsys.readouterr().err

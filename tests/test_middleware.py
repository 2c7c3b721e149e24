"""Every request: one JSON log line, and an X-Request-ID that comes back."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flashsale.embedded import free_port
from flashsale.logs import JsonFormatter
from flashsale.monitor import Monitor
from flashsale.settings import Settings

from . import procs
from .conftest import OPS, OPS_KEY, STORE_KEY, create_sale


def access_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [
        json.loads(formatter.format(r))
        for r in caplog.records
        if r.name == "flashsale.access" and getattr(r, "request_id", None) == request_id
    ]


async def test_each_request_logs_one_json_line_with_id_method_route_status_and_duration(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    sale = (await create_sale(client))["id"]
    caplog.set_level(logging.INFO, logger="flashsale.access")
    await client.get(f"/v1/sales/{sale}?user_id=someone", headers={"X-Request-ID": "trace-1"})
    [line] = access_lines(caplog, "trace-1")
    assert {k: line[k] for k in ("level", "logger", "msg", "request_id", "method", "route", "status")} == {
        "level": "info",
        "logger": "flashsale.access",
        "msg": "request",
        "request_id": "trace-1",
        "method": "GET",
        "route": "/v1/sales/{sale_id}",
        "status": 200,
    }
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0


async def test_request_log_lines_never_hold_keys_headers_or_query_strings(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashsale.access")
    await client.get("/v1/sales/x?user_id=secret-user", headers={"X-Request-ID": "trace-2"})
    await client.get("/metrics", headers={**OPS, "X-Request-ID": "trace-2"})
    text = json.dumps(access_lines(caplog, "trace-2"))
    assert len(access_lines(caplog, "trace-2")) == 2
    for secret in (STORE_KEY, OPS_KEY, "secret-user", "Bearer"):
        assert secret not in text


async def test_the_request_id_a_client_sends_comes_back(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "abc-123_ok.1"})
    assert r.headers["x-request-id"] == "abc-123_ok.1"


async def test_a_request_id_is_made_when_the_client_sends_none(client: httpx.AsyncClient) -> None:
    ids = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]


async def test_a_request_id_is_cleaned_of_unsafe_characters_and_cut_to_128(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": 'a b"c<d>\\e;' + "x" * 200})
    assert r.headers["x-request-id"] == "abcde" + "x" * 123


async def test_a_request_id_of_only_unsafe_characters_is_replaced(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-ID": "<>;"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


async def test_errors_carry_the_request_id_and_unknown_paths_log_as_unmatched(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flashsale.access")
    refused = await client.get("/metrics", headers={"X-Request-ID": "e1"})
    missing = await client.get("/no/such/thing", headers={"X-Request-ID": "e2"})
    assert (refused.status_code, refused.headers["x-request-id"]) == (403, "e1")
    assert (missing.status_code, missing.headers["x-request-id"]) == (404, "e2")
    assert access_lines(caplog, "e2")[0]["route"] == "unmatched"


async def test_a_crash_is_answered_500_as_json_with_its_request_id_and_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Monitor, sale_id: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Monitor, "progress", broken)
    caplog.set_level(logging.INFO, logger="flashsale")
    r = await client.get("/v1/sales/s/progress", headers={**OPS, "X-Request-ID": "boom"})
    assert (r.status_code, r.headers["x-request-id"], r.json()["error"]["code"]) == (500, "boom", "internal")
    assert access_lines(caplog, "boom")[0]["status"] == 500
    assert any(rec.exc_info and getattr(rec, "request_id", None) == "boom" for rec in caplog.records)


@pytest.mark.parametrize(("level", "logged"), [("INFO", True), ("WARNING", False)])
def test_flashsale_serve_honours_log_level_for_request_lines(
    settings: Settings, tmp_path: Path, level: str, logged: bool
) -> None:
    port = free_port()
    err = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "serve", "--port", str(port)],
        env=procs.env_for(settings, LOG_LEVEL=level),
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "flashsale serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"X-Request-ID": "lvl"}).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers=OPS).status_code == 200
    finally:
        procs.stop(proc)
        err.close()
    text = (tmp_path / "stderr").read_text()
    assert OPS_KEY not in text
    lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    assert any(x.get("request_id") == "lvl" and x.get("route") == "/healthz" for x in lines) is logged


async def test_an_access_line_written_the_cheap_way_is_the_line_a_log_record_gives() -> None:
    import io

    from flashsale import logs

    saved = logging.root.handlers[:], logging.root.level
    try:
        logs.setup_logging("INFO")
        [handler] = logging.root.handlers
        assert isinstance(handler, logs.TickHandler)
        handler.stream = stream = io.StringIO()
        fields: dict[str, object] = {
            "request_id": "r1",
            "method": "GET",
            "route": "/x",
            "status": 200,
            "duration_ms": 1.5,
        }
        access = logging.getLogger("flashsale.access")
        logs.access(access, fields)
        await asyncio.sleep(0)  # written at the end of the tick
        cheap = json.loads(stream.getvalue())
        record = access.makeRecord(access.name, logging.INFO, __file__, 0, "request", (), None, extra=fields)
        full = json.loads(handler.format(record))
        assert cheap.pop("ts")[:19] == full.pop("ts")[:19] and cheap == full
    finally:
        logging.root.handlers[:], level = saved
        logging.root.setLevel(level)

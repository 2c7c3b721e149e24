"""The waiting room (contract, "Crowd control"): tokens checked on reserve, places random before
the start and first come after it, admission at the rate set that follows the stock, abandoned
tickets expired, the queue closed at sold out; the app's own tick does the admitting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from redis.asyncio import Redis

from flashsale.keys import Keys
from flashsale.persister import Persister
from flashsale.recover import recover
from flashsale.sales import now_ms
from flashsale.scripts import Scripts
from flashsale.settings import Settings
from flashsale.waiting import Tokens

from .conftest import OPS, create_sale, drained
from .test_recover import forget_sale


def room(admit_per_s: int = 100, **more: Any) -> dict[str, Any]:
    return {"admit_per_s": admit_per_s, **more}


def phone(stock: int, limit: int = 1) -> list[dict[str, Any]]:
    return [{"sku": "phone", "name": "Phone", "price_cents": 100, "stock": stock, "per_user_limit": limit}]


async def join(c: httpx.AsyncClient, sale: str, user: str) -> httpx.Response:
    return await c.post(f"/v1/sales/{sale}/queue", json={"user_id": user})


async def poll(c: httpx.AsyncClient, sale: str, ticket: str, user: str) -> dict[str, Any]:
    r = await c.get(f"/v1/sales/{sale}/queue/{ticket}", params={"user_id": user})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def admitted(c: httpx.AsyncClient, sale: str, ticket: str, user: str, timeout: float = 5) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while (t := await poll(c, sale, ticket, user))["status"] == "waiting":
        assert asyncio.get_running_loop().time() < deadline, f"never admitted: {t}"
        await asyncio.sleep(0.1)
    return t


async def reserve(c: httpx.AsyncClient, sale: str, user: str, token: str | None) -> httpx.Response:
    headers = {"Admission-Token": token} if token else {}
    return await c.post(f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": "phone"}, headers=headers)


async def admitted_hold(c: httpx.AsyncClient, sale: str, user: str) -> dict[str, Any]:
    """The user joins, is admitted, and holds a unit with the token: the hold."""
    ticket = (await join(c, sale, user)).json()
    token = (await admitted(c, sale, ticket["ticket"], user))["admission_token"]
    hold: dict[str, Any] = (await reserve(c, sale, user, token)).json()
    return hold


async def test_a_reservation_without_a_valid_admission_token_is_refused_with_403_not_admitted(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    sale = (await create_sale(client, waiting_room=room(), items=phone(10)))["id"]
    other = (await create_sale(client, waiting_room=room(), items=phone(10)))["id"]
    ticket = (await join(client, sale, "alice")).json()
    token = (await admitted(client, sale, ticket["ticket"], "alice"))["admission_token"]
    tokens = Tokens(settings.signing_secret)
    expires, _, signature = token.partition(".")
    wrong = {
        "none": None,
        "garbage": "not-a-token",
        "another user's": token,  # sent below for bob
        "another sale's": tokens.make(other, "alice", int(expires)),
        "past its time": tokens.make(sale, "alice", now_ms() - 1),
        "tampered expiry": f"{int(expires) + 60_000}.{signature}",
        "forged": Tokens("another secret").make(sale, "alice", int(expires)),
    }
    for name, bad in wrong.items():
        r = await reserve(client, sale, "bob" if name == "another user's" else "alice", bad)
        assert (r.status_code, r.json()["error"]["code"]) == (403, "not_admitted"), name
    assert (await reserve(client, sale, "alice", token)).status_code == 201
    got = (await client.get(f"/v1/sales/{sale}")).json()["items"][0]
    assert got["held"] == 1  # the refused ones changed nothing


async def test_the_same_user_joining_again_gets_the_same_ticket(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, waiting_room=room(), items=phone(10)))["id"]
    first, again = await join(client, sale, "alice"), await join(client, sale, "alice")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["ticket"] == again.json()["ticket"]


async def test_joiners_before_the_start_are_put_in_random_order_and_later_ones_in_the_order_they_came(
    client: httpx.AsyncClient,
) -> None:
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    sale = (await create_sale(client, starts_at=later, waiting_room=room(admit_per_s=1), items=phone(500)))["id"]
    early = [(await join(client, sale, f"early{n}")).json() for n in range(200)]
    assert all(t["status"] == "waiting" for t in early)
    positions = [(await poll(client, sale, t["ticket"], t["user_id"]))["position"] for t in early]
    assert sorted(positions) == list(range(1, 201))
    assert abs(spearman(list(range(200)), positions)) < 0.3, "the order before the start follows the join order"
    starts = datetime.now(UTC) + timedelta(seconds=1)  # however long the joins took on a busy machine
    moved = await client.patch(f"/v1/sales/{sale}", json={"starts_at": starts.isoformat()}, headers=OPS)
    assert moved.status_code == 200, moved.text
    while datetime.now(UTC) < starts:
        await asyncio.sleep(0.1)
    late = [(await join(client, sale, f"late{n}")).json() for n in range(5)]
    got = [await poll(client, sale, t["ticket"], t["user_id"]) for t in late]
    assert [t["position"] for t in got] == sorted(t["position"] for t in got)  # first come, first in line
    assert all(t["position"] > 195 for t in got)  # behind every early one still waiting


def spearman(a: list[int], b: list[int]) -> float:
    """Rank correlation of two rankings (each a permutation, 0- or 1-based alike)."""
    n = len(a)
    shift = sum(b) / n - sum(a) / n
    d = sum((x + shift - y) ** 2 for x, y in zip(a, b, strict=True))
    return 1 - 6 * d / (n * (n * n - 1))


async def test_admission_goes_at_most_admit_per_s_in_queue_order(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=4), items=phone(100)))["id"]
    tickets = [(await join(client, sale, f"u{n}")).json() for n in range(20)]
    await asyncio.sleep(1.0)
    status = [(await poll(client, sale, t["ticket"], t["user_id"]))["status"] for t in tickets]
    n = status.count("admitted")
    assert 2 <= n <= 7, status  # 4 a second, give or take a tick
    assert status == ["admitted"] * n + ["waiting"] * (20 - n)


async def test_an_abandoned_ticket_expires_and_never_holds_the_line_up(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=1), items=phone(10)))["id"]
    gone = (await join(client, sale, "gone")).json()
    behind = (await join(client, sale, "behind")).json()
    await redis.zadd(keys.queue_polls(sale), {gone["ticket"]: now_ms() - 60_000})  # last polled a minute ago
    t = await admitted(client, sale, behind["ticket"], "behind", timeout=4)
    assert t["status"] == "admitted"
    assert (await poll(client, sale, gone["ticket"], "gone"))["status"] == "expired"
    again = await join(client, sale, "gone")
    assert again.status_code == 201 and again.json()["ticket"] != gone["ticket"]  # back of the line


async def test_admission_pauses_while_every_unit_is_held_and_resumes_when_one_comes_back(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=50), items=phone(1)))["id"]
    hold = await admitted_hold(client, sale, "first")
    waiting = (await join(client, sale, "second")).json()
    await asyncio.sleep(0.8)
    assert (await poll(client, sale, waiting["ticket"], "second"))["status"] == "waiting"
    cancel = await client.post(f"/v1/reservations/{hold['reservation_id']}/cancel", json={"user_id": "first"})
    assert cancel.status_code == 200
    assert (await admitted(client, sale, waiting["ticket"], "second"))["status"] == "admitted"


async def test_the_queue_closes_once_nothing_is_left_or_held_and_every_waiting_ticket_is_told(
    client: httpx.AsyncClient,
) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=50), items=phone(1)))["id"]
    hold = await admitted_hold(client, sale, "first")
    others = [(await join(client, sale, f"u{n}")).json() for n in range(3)]
    done = await client.post(
        f"/v1/reservations/{hold['reservation_id']}/confirm", json={"user_id": "first", "payment_ref": "p"}
    )
    assert done.status_code == 200
    await asyncio.sleep(0.6)
    told = [await poll(client, sale, t["ticket"], t["user_id"]) for t in others]
    assert [(t["status"], t["reason"]) for t in told] == [("closed", "sold_out")] * 3
    late = (await join(client, sale, "late")).json()
    assert (late["status"], late["reason"]) == ("closed", "sold_out")
    progress = (await client.get(f"/v1/sales/{sale}/progress", headers=OPS)).json()
    assert progress["queue"]["closed"] == "sold_out" and progress["queue"]["waiting"] == 0


async def test_ops_change_the_rate_live_and_close_the_queue(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=1), items=phone(100)))["id"]
    tickets = [(await join(client, sale, f"u{n}")).json() for n in range(30)]
    faster = await client.patch(f"/v1/sales/{sale}/queue", json={"admit_per_s": 100}, headers=OPS)
    assert faster.status_code == 200 and faster.json()["admit_per_s"] == 100
    assert (await client.get(f"/v1/sales/{sale}")).json()["waiting_room"]["admit_per_s"] == 100
    await asyncio.sleep(0.8)
    assert {(await poll(client, sale, t["ticket"], t["user_id"]))["status"] for t in tickets} == {"admitted"}
    # Slow again, and three join: a tick between the joins and the close admits one at most, so the
    # last in line is surely still waiting when ops close it (one late joiner was once admitted first).
    assert (await client.patch(f"/v1/sales/{sale}/queue", json={"admit_per_s": 1}, headers=OPS)).status_code == 200
    late = [(await join(client, sale, f"late{n}")).json() for n in range(3)]
    closed = await client.delete(f"/v1/sales/{sale}/queue", headers=OPS)
    assert closed.status_code == 200 and closed.json()["closed"] == "closed_by_ops"
    told = [await poll(client, sale, t["ticket"], t["user_id"]) for t in late]
    assert (told[-1]["status"], told[-1]["reason"]) == ("closed", "closed_by_ops")
    assert {t["status"] for t in told} <= {"admitted", "closed"}  # none left "waiting"
    again = await client.delete(f"/v1/sales/{sale}/queue", headers=OPS)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "invalid_state")


async def test_a_waiting_ticket_says_its_place_its_wait_and_when_to_poll_again(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=1, abandon_after_s=30), items=phone(100)))["id"]
    tickets = [(await join(client, sale, f"u{n}")).json() for n in range(12)]
    last = await poll(client, sale, tickets[-1]["ticket"], "u11")
    assert last["status"] == "waiting" and 8 <= last["position"] <= 12
    assert last["estimated_wait_s"] == last["position"]  # one a second
    assert 1 <= last["poll_after_s"] <= 10  # well inside abandon_after_s


async def test_bad_queue_requests_get_a_clear_error_and_change_nothing(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client, waiting_room=room(), items=phone(10)))["id"]
    plain = (await create_sale(client, items=phone(10)))["id"]
    ticket = (await join(client, sale, "alice")).json()["ticket"]
    assert (await client.post(f"/v1/sales/{sale}/queue", json={"user": "x"})).status_code == 422
    assert (await join(client, plain, "alice")).status_code == 409  # the sale is there, its room is not
    assert (await join(client, "no-such-sale", "alice")).status_code == 404
    assert (await client.get(f"/v1/sales/{sale}/queue/{ticket}")).status_code == 422  # no user_id
    assert (await client.get(f"/v1/sales/{sale}/queue/{ticket}", params={"user_id": "bob"})).status_code == 404
    assert (await client.get(f"/v1/sales/{sale}/queue/nope", params={"user_id": "alice"})).status_code == 404
    bad_rate = await client.patch(f"/v1/sales/{sale}/queue", json={"admit_per_s": 0}, headers=OPS)
    assert bad_rate.status_code == 422
    assert (await client.patch(f"/v1/sales/{plain}/queue", json={"admit_per_s": 5}, headers=OPS)).status_code == 409
    bad_room = await client.post(
        "/v1/sales",
        json={
            "id": "x1",
            "name": "x",
            "starts_at": "2026-01-01T00:00:00Z",
            "ends_at": "2030-01-01T00:00:00Z",
            "items": phone(1),
            "waiting_room": {"admit_per_s": 5, "extra": 1},
        },
        headers=OPS,
    )
    assert bad_room.status_code == 422
    assert (await reserve(client, plain, "alice", None)).status_code == 201  # no room: no token needed


async def test_recover_brings_a_lost_sale_back_with_its_waiting_room(
    client: httpx.AsyncClient,
    redis: Redis,
    keys: Keys,
    settings: Settings,
    scripts: Scripts,
    pg: asyncpg.Connection,
    worker: Persister,
) -> None:
    sale = (await create_sale(client, waiting_room=room(admit_per_s=7), items=phone(10)))["id"]
    await drained(redis, keys, sale)
    await forget_sale(redis, keys, sale)
    report = await recover(redis, pg, keys, scripts, sale)
    assert report.sale_reloaded and not report.problems
    assert (await client.get(f"/v1/sales/{sale}")).json()["waiting_room"]["admit_per_s"] == 7
    assert (await reserve(client, sale, "alice", None)).json()["error"]["code"] == "not_admitted"
    joined = await join(client, sale, "alice")
    assert joined.status_code == 201, joined.text
    token = (await admitted(client, sale, joined.json()["ticket"], "alice"))["admission_token"]
    held = await reserve(client, sale, "alice", token)
    assert held.status_code == 201, held.text

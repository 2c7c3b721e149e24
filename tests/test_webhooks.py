"""Webhooks (contract, "Storefront integration"): registered by ops, every event delivered at least
once in the Standard Webhooks form from a consumer group of their own, retried with backoff, then
dead-lettered and shown to ops; secrets rotate. Checked against real local HTTP receivers, the
signatures with the independent ``standardwebhooks`` package."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook as Verifier
from standardwebhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flashsale import db
from flashsale.keys import WEBHOOKS, Keys
from flashsale.settings import Settings

from .conftest import OPS, create_sale, dispatching, persister_alone, persisting, serving_asgi

RESERVATION_EVENTS = ["reservation.created", "reservation.confirmed", "reservation.released", "reservation.expired"]
SALE_EVENTS = ["sale.started", "sale.sold_out", "sale.ended"]


@dataclasses.dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        got: dict[str, Any] = msgspec.json.decode(self.body)
        return got


Answer = Callable[[Received], Awaitable[int]]


@contextlib.asynccontextmanager
async def receiver(answer: Answer | None = None) -> AsyncIterator[tuple[str, list[Received]]]:
    """A real HTTP endpoint on loopback that records every request and answers ``answer``'s status."""
    got: list[Received] = []

    async def hook(request: Request) -> Response:
        r = Received(time.monotonic(), dict(request.headers), await request.body())
        got.append(r)
        return Response(status_code=await answer(r) if answer else 204)

    async with serving_asgi(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        yield f"{url}/hook", got


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Retries a fifth, two fifths, four fifths of a second apart, then the dead letter."""
    return dataclasses.replace(settings, webhook_retry_s=(0.2, 0.4, 0.8), webhook_timeout_s=5.0)


async def register(client: httpx.AsyncClient, url: str, events: list[str]) -> dict[str, Any]:
    r = await client.post("/v1/webhooks", json={"url": url, "events": events}, headers=OPS)
    assert r.status_code == 201, r.text
    hook: dict[str, Any] = r.json()
    return hook


async def settled(client: httpx.AsyncClient) -> dict[str, Any]:
    """The one webhook listed, once none of its deliveries waits for a try."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        listed: dict[str, Any] = (await client.get("/v1/webhooks", headers=OPS)).json()["webhooks"][0]
        if listed["deliveries"]["pending"] == 0 or asyncio.get_running_loop().time() > deadline:
            return listed
        await asyncio.sleep(0.05)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)


def types(got: list[Received]) -> list[str]:
    return [r.event["type"] for r in got]


async def reserve(client: httpx.AsyncClient, sale: str, user: str) -> str:
    r = await client.post(f"/v1/sales/{sale}/reservations", json={"user_id": user, "sku": "phone", "quantity": 1})
    assert r.status_code == 201, r.text
    rid: str = r.json()["reservation_id"]
    return rid


async def test_every_reservation_event_arrives_signed_and_expired_only_once_its_unit_is_back(
    client: httpx.AsyncClient, fast: Settings, redis: Redis
) -> None:
    seen_available: list[int] = []

    async def answer(r: Received) -> int:
        if r.event["type"] == "reservation.expired":  # asked while the request is in flight
            sale = (await client.get(f"/v1/sales/{r.event['data']['sale_id']}")).json()
            seen_available.append(sale["items"][0]["available"])
        return 200

    async with receiver(answer) as (url, got), dispatching(fast, redis):
        hook = await register(client, url, RESERVATION_EVENTS + SALE_EVENTS)
        sale = (await create_sale(client, hold_seconds=2))["id"]
        paid, dropped = await reserve(client, sale, "ann"), await reserve(client, sale, "bob")
        await reserve(client, sale, "cy")  # left to expire
        assert (
            await client.post(f"/v1/reservations/{paid}/confirm", json={"user_id": "ann", "payment_ref": "psp-1"})
        ).status_code == 200
        assert (await client.post(f"/v1/reservations/{dropped}/cancel", json={"user_id": "bob"})).status_code == 200
        await until(lambda: len(got) >= 7)
    verifier = Verifier(hook["secret"])
    for r in got:
        assert verifier.verify(r.body, r.headers)  # raises on a bad signature
        assert r.headers["webhook-id"] and int(r.headers["webhook-timestamp"]) <= time.time() + 1
    assert sorted(types(got)) == sorted(
        ["sale.started", "reservation.confirmed", "reservation.released", "reservation.expired"]
        + ["reservation.created"] * 3
    )
    assert len({r.headers["webhook-id"] for r in got}) == len(got)
    expired = next(r.event for r in got if r.event["type"] == "reservation.expired")
    assert expired["data"]["user_id"] == "cy" and expired["data"]["status"] == "expired"
    assert seen_available == [9]  # 10 units: ann's confirmed, bob's and cy's back


async def test_an_endpoint_that_fails_is_tried_again_later_each_time_then_delivered_once_it_answers(
    client: httpx.AsyncClient, fast: Settings, redis: Redis
) -> None:
    async def answer(r: Received) -> int:
        return 500 if len(got) <= 3 else 200

    async with receiver(answer) as (url, got), dispatching(fast, redis):
        await register(client, url, ["reservation.created"])
        sale = (await create_sale(client))["id"]
        await reserve(client, sale, "ann")
        await until(lambda: len(got) >= 4)
        listed = await settled(client)
    assert len(got) == 4 and len({r.headers["webhook-id"] for r in got}) == 1  # one event, the same id
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3 and gaps[2] >= 0.6  # backing off, within the jitter
    assert listed["deliveries"] == {"pending": 0, "dead": 0} and "secret" not in listed


async def test_a_delivery_whose_retries_run_out_is_a_dead_letter_on_progress_and_can_be_sent_again(
    client: httpx.AsyncClient, fast: Settings, redis: Redis
) -> None:
    failing = True

    async def answer(r: Received) -> int:
        return 503 if failing else 200

    async with receiver(answer) as (url, got), dispatching(fast, redis):
        hook = await register(client, url, ["reservation.created"])
        sale = (await create_sale(client))["id"]
        await reserve(client, sale, "ann")
        dead_path = f"/v1/webhooks/{hook['id']}/deliveries?status=dead"

        async def dead() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = (await client.get(dead_path, headers=OPS)).json()["deliveries"]
            return found

        deadline = asyncio.get_running_loop().time() + 10
        while not await dead():
            assert asyncio.get_running_loop().time() < deadline, "never dead-lettered"
            await asyncio.sleep(0.1)
        assert len(got) == 4  # the first try and the three retries
        letter = (await dead())[0]
        assert letter["attempts"] == 4 and "503" in letter["last_error"]
        progress = (await client.get(f"/v1/sales/{sale}/progress", headers=OPS)).json()
        assert progress["webhooks"] == {"pending": 0, "dead": 1}
        failing = False
        again = await client.post(
            f"/v1/webhooks/{hook['id']}/deliveries/{letter['event_id']}/redeliver", headers=OPS, json={}
        )
        assert again.status_code == 200 and again.json()["status"] == "pending"
        await until(lambda: len(got) == 5)
        assert (await settled(client))["deliveries"] == {"pending": 0, "dead": 0}
        progress = (await client.get(f"/v1/sales/{sale}/progress", headers=OPS)).json()
        assert progress["webhooks"] == {"pending": 0, "dead": 0}
        twice = await client.post(
            f"/v1/webhooks/{hook['id']}/deliveries/{letter['event_id']}/redeliver", headers=OPS, json={}
        )
        assert twice.status_code == 409 and twice.json()["error"]["code"] == "invalid_state"


async def test_a_slow_endpoint_slows_neither_persistence_nor_another_endpoint(
    client: httpx.AsyncClient, fast: Settings, redis: Redis
) -> None:
    release = asyncio.Event()
    inside = 0
    most = 0

    async def slow(r: Received) -> int:  # answers only once the test lets it
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await release.wait()
        inside -= 1
        return 200

    slowed = dataclasses.replace(fast, webhook_timeout_s=30.0)
    async with (
        receiver(slow) as (slow_url, slow_got),
        receiver() as (fast_url, fast_got),
        persisting(slowed, redis),  # a persister and a dispatcher, as a worker runs them
    ):
        await register(client, slow_url, ["reservation.created"])
        await register(client, fast_url, ["reservation.created"])
        sale = (await create_sale(client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 40}]))["id"]
        await asyncio.gather(*(reserve(client, sale, f"u{n}") for n in range(30)))
        await until(lambda: len(fast_got) == 30)  # all of them, while the slow endpoint answered none
        persisted = await _persisted(fast, sale)
        stuck = len(slow_got)
        release.set()
        await until(lambda: len(slow_got) == 30)
    assert persisted == 30  # Postgres has them all while the slow endpoint sits on its requests
    assert stuck == most == fast.webhook_concurrency  # 8 in flight to it, no more, the rest waiting


async def _persisted(settings: Settings, sale: str) -> int:
    pool = await db.create_pool(settings.database_url, 1)
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while (n := int(await pool.fetchval("SELECT count(*) FROM reservations WHERE sale_id = $1", sale))) < 30:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        return n
    finally:
        await pool.close()


async def test_after_a_rotation_both_secrets_sign_until_the_previous_one_runs_out(
    client: httpx.AsyncClient, fast: Settings, redis: Redis
) -> None:
    async with receiver() as (url, got), dispatching(fast, redis):
        hook = await register(client, url, ["reservation.created"])
        old = hook["secret"]
        rotated = await client.post(f"/v1/webhooks/{hook['id']}/rotate", json={"previous_valid_s": 60}, headers=OPS)
        assert rotated.status_code == 200
        new = rotated.json()["secret"]
        assert new != old and new.startswith("whsec_") and "previous_secret_until" in rotated.json()
        sale = (await create_sale(client))["id"]
        await reserve(client, sale, "ann")
        await until(lambda: len(got) == 1)
        again = await client.post(f"/v1/webhooks/{hook['id']}/rotate", json={"previous_valid_s": 0}, headers=OPS)
        newest = again.json()["secret"]
        await reserve(client, sale, "bob")
        await until(lambda: len(got) == 2)
    both, only_newest = got
    assert Verifier(old).verify(both.body, both.headers) and Verifier(new).verify(both.body, both.headers)
    assert Verifier(newest).verify(only_newest.body, only_newest.headers)
    with pytest.raises(WebhookVerificationError):
        Verifier(new).verify(only_newest.body, only_newest.headers)


async def test_sale_events_come_once_each_even_with_two_dispatchers_watching(
    client: httpx.AsyncClient, fast: Settings, redis: Redis, keys: Keys
) -> None:
    async with receiver() as (url, got), dispatching(fast, redis), dispatching(fast, redis):
        await register(client, url, SALE_EVENTS)
        sale = (await create_sale(client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 1}]))["id"]
        rid = await reserve(client, sale, "ann")
        confirm = {"user_id": "ann", "payment_ref": "psp-1"}
        assert (await client.post(f"/v1/reservations/{rid}/confirm", json=confirm)).status_code == 200  # all sold
        await until(lambda: "sale.sold_out" in types(got))
        assert (await client.post(f"/v1/sales/{sale}/end", headers=OPS)).status_code == 200
        await until(lambda: "sale.ended" in types(got))
        await asyncio.sleep(1.5)  # both have looked again since
    assert sorted(types(got)) == sorted(SALE_EVENTS)
    assert {r.event["data"]["sale_id"] for r in got} == {sale}
    assert await redis.hget(keys.sale(sale), "ended_told") == "1"  # the persister may retire it now


async def test_the_stream_keeps_what_the_webhooks_have_not_taken_yet(
    client: httpx.AsyncClient, fast: Settings, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    await reserve(client, sale, "ann")
    stream = keys.events(sale)
    async with persister_alone(fast, redis) as alone:
        await until(lambda: alone.written >= 2)
        await alone.trim(stream)
        kept = await redis.xlen(stream)
        untaken = (await client.get(f"/v1/sales/{sale}/progress", headers=OPS)).json()["webhooks_backlog"]
        async with dispatching(fast, redis) as dispatcher:
            await until(lambda: dispatcher.enqueued >= 1)
            await asyncio.sleep(0.2)
            await alone.trim(stream)
            left = await redis.xlen(stream)
            taken = (await client.get(f"/v1/sales/{sale}/progress", headers=OPS)).json()["webhooks_backlog"]
    assert kept == 2  # the sale's document and the hold: persisted, but not yet taken for webhooks
    assert (untaken, taken) == (2, 0)  # and progress says so, until a dispatcher took them
    assert left == 1  # both groups done: trimmed to the last entry (XTRIM MINID keeps the floor)
    assert WEBHOOKS in {g["name"] for g in await redis.xinfo_groups(stream)}


async def test_a_stream_made_before_webhooks_is_kept_whole_until_its_group_is_made_then_delivered(
    client: httpx.AsyncClient, fast: Settings, redis: Redis, keys: Keys
) -> None:
    async with receiver() as (url, got):
        await register(client, url, ["reservation.created"])
        sale = (await create_sale(client))["id"]
        stream = keys.events(sale)
        await redis.xgroup_destroy(stream, WEBHOOKS)  # as a sale made by the version before
        await reserve(client, sale, "ann")
        async with persister_alone(fast, redis) as alone:
            await until(lambda: alone.written >= 2)
            await alone.trim(stream)
            kept = await redis.xlen(stream)
        async with dispatching(fast, redis):
            await until(lambda: len(got) == 1)
    assert kept == 2  # not trimmed past what the webhooks group, not there yet, would have to take
    assert got[0].event["data"]["user_id"] == "ann"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example.test/hook", "events": ["sale.started"]}, "url"),
        ({"url": "http://127.0.0.1:9/hook\n", "events": ["sale.started"]}, "url"),
        ({"url": "http://127.0.0.1:9/\u0000", "events": ["sale.started"]}, "url"),
        ({"url": "http://127.0.0.1:9/hook", "events": ["sale.begun"]}, "events"),
        ({"url": "http://127.0.0.1:9/hook", "events": []}, "events"),
        ({"url": "http://127.0.0.1:9/hook"}, "events"),
    ],
)
async def test_a_bad_registration_is_a_422_naming_the_field_and_registers_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    r = await client.post("/v1/webhooks", json=body, headers=OPS)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert field in r.json()["error"]["message"]
    assert (await client.get("/v1/webhooks", headers=OPS)).json() == {"webhooks": []}


async def test_webhooks_are_for_ops_keys_only_and_a_deleted_one_is_gone(client: httpx.AsyncClient) -> None:
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["sale.started"]}
    assert (await client.post("/v1/webhooks", json=hook)).status_code == 403  # the storefront key
    made = await register(client, "http://127.0.0.1:9/hook", ["sale.started"])
    assert (await client.get("/v1/webhooks")).status_code == 403
    assert (await client.delete(f"/v1/webhooks/{made['id']}", headers=OPS)).status_code == 204
    assert (await client.delete(f"/v1/webhooks/{made['id']}", headers=OPS)).status_code == 404
    assert (await client.get(f"/v1/webhooks/{made['id']}/deliveries", headers=OPS)).status_code == 404
    assert (await client.get("/v1/webhooks/nope/deliveries", headers=OPS)).status_code == 404

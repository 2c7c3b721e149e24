"""GET /metrics: Prometheus text that moves with the traffic, in one process or several."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from flashsale.embedded import free_port
from flashsale.keys import Keys
from flashsale.metrics import FLUSH_S
from flashsale.persister import Persister
from flashsale.settings import Settings

from . import procs
from .conftest import OPS, STORE, create_sale, drained, serving
from .test_reservations import reserve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics", headers=OPS)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_requests_by_route_template_and_status(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client))["id"]
    before = await scrape(client)
    for _ in range(3):
        await client.get(f"/v1/sales/{sale}")
    await client.get("/v1/sales/no-such-sale")
    await client.get("/no/such/path")
    after = await scrape(client)

    def delta(name: str, route: str, status: str) -> float:
        labels = {"method": "GET", "route": route, "status": status}
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("flashsale_http_requests_total", "/v1/sales/{sale_id}", "200") == 3
    assert delta("flashsale_http_requests_total", "/v1/sales/{sale_id}", "404") == 1
    assert delta("flashsale_http_requests_total", "unmatched", "404") == 1
    assert delta("flashsale_http_request_duration_seconds_count", "/v1/sales/{sale_id}", "200") == 3


async def test_metrics_count_reservations_by_outcome(client: httpx.AsyncClient) -> None:
    sale = (
        await create_sale(
            client, items=[{"sku": "phone", "name": "P", "price_cents": 1, "stock": 2, "per_user_limit": 1}]
        )
    )["id"]
    before = await scrape(client)
    await reserve(client, sale, user="a", key="k")
    await reserve(client, sale, user="a", key="k")
    await reserve(client, sale, user="b")
    await reserve(client, sale, user="c")
    after = await scrape(client)
    moved = {
        o: value(after, "flashsale_reservations_total", outcome=o)
        - value(before, "flashsale_reservations_total", outcome=o)
        for o in ("created", "replayed", "sold_out")
    }
    assert moved == {"created": 2, "replayed": 1, "sold_out": 1}


async def test_metrics_show_each_item_s_numbers_read_from_redis(client: httpx.AsyncClient) -> None:
    sale = (await create_sale(client))["id"]
    await reserve(client, sale, qty=2)
    await reserve(client, sale, user="u2", qty=3)  # over the per-user limit of 2
    m = await scrape(client)
    at = {"sale_id": sale, "sku": "phone"}
    assert value(m, "flashsale_item_stock_total_units", **at) == 10
    units = {s: value(m, "flashsale_item_units", **at, state=s) for s in ("available", "held", "confirmed")}
    assert units == {"available": 8, "held": 2, "confirmed": 0}
    assert value(m, "flashsale_item_attempts_total", **at) == 2
    assert value(m, "flashsale_item_rejections_total", **at, code="limit_exceeded") == 1


async def test_metrics_show_each_sale_s_queue_backlog_and_dead_letters(
    client: httpx.AsyncClient, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    await reserve(client, sale)
    await redis.xadd(keys.dead(sale), {"reason": "test"})
    m = await scrape(client)
    assert value(m, "flashsale_queue_backlog_events", sale_id=sale) == 2  # the sale's event and the hold's
    assert value(m, "flashsale_dead_lettered_events", sale_id=sale) == 1
    assert value(m, "flashsale_queue_oldest_unpersisted_age_seconds", sale_id=sale) >= 0
    assert value(m, "flashsale_redis_up") == 1


async def test_metrics_show_the_persister_s_batches_and_lag(
    client: httpx.AsyncClient, worker: Persister, redis: Redis, keys: Keys
) -> None:
    sale = (await create_sale(client))["id"]
    before = await scrape(client)
    await reserve(client, sale)
    await reserve(client, sale, user="u2")
    await drained(redis, keys, sale)
    after = await scrape(client)

    def moved(name: str) -> float:
        return value(after, name) - value(before, name)

    assert moved("flashsale_persister_events_total") >= 2
    assert moved("flashsale_persister_batch_size_count") >= 1
    assert moved("flashsale_persister_lag_seconds_count") >= 1
    assert value(after, "flashsale_persister_workers_alive") == 1
    assert value(after, "flashsale_persisted_reservations", sale_id=sale) == 2
    assert value(after, "flashsale_queue_backlog_events", sale_id=sale) == 0


async def test_metrics_leave_out_sales_that_have_ended(client: httpx.AsyncClient, redis: Redis, keys: Keys) -> None:
    sale = (await create_sale(client))["id"]
    await redis.hset(keys.sale(sale), "state", "ended")
    m = await scrape(client)
    assert not any(dict(labels).get("sale_id") == sale for _, labels in m)


async def test_metrics_still_answer_with_redis_up_0_when_redis_is_down(settings: Settings) -> None:
    nowhere = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with serving(nowhere) as url, httpx.AsyncClient(base_url=url) as c:
        m = await scrape(c)
    assert value(m, "flashsale_redis_up") == 0
    assert any(name == "flashsale_http_requests_total" for name, _ in m)


async def test_metrics_add_up_the_requests_of_every_uvicorn_worker(settings: Settings, redis: Redis) -> None:
    with procs.api(settings, workers=3) as url:
        async with httpx.AsyncClient(base_url=url, headers=OPS) as c:
            sale = (await create_sale(c))["id"]
        n = 30

        async def one() -> None:  # a connection each, so that the kernel spreads them over the workers
            async with httpx.AsyncClient(base_url=url, headers=STORE) as c:
                assert (await c.get(f"/v1/sales/{sale}")).status_code == 200

        await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(FLUSH_S + 0.5)  # each worker hands its counts to the shared files once a second
        seen = set()
        for _ in range(6):
            async with httpx.AsyncClient(base_url=url) as c:  # likely another worker each time
                m = await scrape(c)
            seen.add(value(m, "flashsale_http_requests_total", method="GET", route="/v1/sales/{sale_id}", status="200"))
    assert seen == {n}


def test_requests_added_up_between_flushes_give_what_observing_each_would() -> None:
    from prometheus_client import REGISTRY, CollectorRegistry, Histogram

    from flashsale import metrics

    seconds = [0.0005, 0.001, 0.003, 0.003, 0.2, 7.0, 11.0]  # on a bound, between, past the last
    reference = Histogram("reference_latency", "", buckets=metrics.LATENCY_BUCKETS, registry=CollectorRegistry())
    for s in seconds:
        reference.observe(s)
    labels = {"method": "GET", "route": "/test/flush", "status": "299"}

    def ours() -> dict[str, float]:
        return {
            s.labels.get("le", "sum"): s.value
            for family in REGISTRY.collect()
            if family.name == "flashsale_http_request_duration_seconds"
            for s in family.samples
            if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")
        }

    for s in seconds:
        metrics.request("GET", "/test/flush", 299, s)  # no loop running: flushed at once
    theirs = {
        s.labels.get("le", "sum"): s.value
        for s in next(iter(reference.collect())).samples
        if not s.name.endswith("_created")
    }
    assert ours() == theirs and theirs["+Inf"] == len(seconds)

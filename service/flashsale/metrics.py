"""Prometheus metrics, and the text /metrics answers with.

Two kinds of numbers:

- Counted by a process (requests, latency, reserve outcomes in the API; batches, lag and dead
  letters in the persister): prometheus_client counters and histograms. With more than one
  process, ``PROMETHEUS_MULTIPROC_DIR`` must name a directory shared by all of them (empty at
  start); each process writes its own files there and /metrics adds them up.
  ``flashsale serve --workers N`` and ``flashsale dev`` make a fresh one when it is unset.
  prometheus_client reads the variable when it is first imported, so it must be set before.
- Kept in Redis (stock, attempts and rejections per item, queue backlog and age, dead letters,
  persisters alive): read at scrape time, so every API process gives the same, current answer
  and nothing is double counted, wherever the persister runs.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .schemas import SaleProgress

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUESTS = Counter(
    "flashsale_http_requests", "HTTP requests answered, by route template and status", ["method", "route", "status"]
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LATENCY = Histogram(
    "flashsale_http_request_duration_seconds",
    "Time to answer a request (a stream: its life)",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
RESERVATIONS = Counter(
    "flashsale_reservations", "Reserve calls decided: created, replayed, or the error code", ["outcome"]
)
FROM_MEMORY = Counter(
    "flashsale_refusals_from_memory",
    "Reserve attempts refused from this process's memory of the script's last answer, no script run",
    ["code"],
)
POLLS = Counter(
    "flashsale_waiting_room_polls",
    "Waiting-room polls answered, from this process's memory or by a script call (polls.py)",
    ["answered"],
)
BATCH = Histogram(
    "flashsale_persister_batch_size",
    "Events in each batch the persister committed",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
PERSISTED = Counter("flashsale_persister_events", "Events the persister committed to Postgres")
LAG = Histogram(
    "flashsale_persister_lag_seconds",
    "Age of a batch's oldest event when the batch committed",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
DEAD = Counter("flashsale_persister_dead_lettered", "Events the persister moved to a dead-letter stream")


FLUSH_S = 1.0  # what this process counted reaches prometheus_client at most this late
# (method, route, status) -> [requests, seconds in all, requests per latency bucket]
_pending: dict[tuple[str, str, int], list[Any]] = {}
_counts: dict[tuple[Counter, str], int] = {}  # (counter, its one label) -> increments not handed over
_flush_due: asyncio.TimerHandle | None = None


def _flush_soon() -> None:
    global _flush_due
    if _flush_due is None:
        try:
            _flush_due = asyncio.get_running_loop().call_later(FLUSH_S, flush)
        except RuntimeError:  # no loop: nothing would flush later
            flush()


def request(method: str, route: str, status: int, seconds: float) -> None:
    """One request counted and timed, added up here and handed to prometheus_client once a second
    (``flush``): its labels(), locks and per-bucket writes cost more per request than the
    sold-out answer itself. A scrape of this process flushes first; another process's scrape, in
    multiprocess mode, sees this one's counts at most FLUSH_S late."""
    entry = _pending.get((method, route, status))
    if entry is None:
        entry = _pending[(method, route, status)] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
    entry[0] += 1
    entry[1] += seconds
    entry[2][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    _flush_soon()


def flush() -> None:
    """Everything counted here since the last flush, handed to prometheus_client."""
    global _flush_due
    if _flush_due is not None:
        _flush_due.cancel()
        _flush_due = None
    pending, counts = list(_pending.items()), list(_counts.items())
    _pending.clear()
    _counts.clear()
    for (method, route, status), (n, total, buckets) in pending:
        labels = (method if method in METHODS else "other", route, str(status))
        REQUESTS.labels(*labels).inc(n)
        latency = LATENCY.labels(*labels)
        # What Histogram.observe does per observation, once per bucket (prometheus_client has no
        # bulk observe; tests/test_metrics.py checks this against observe()).
        latency._sum.inc(total)
        for i, count in enumerate(buckets):
            if count:
                latency._buckets[i].inc(count)
    for (counter, label), n in counts:
        counter.labels(label).inc(n)


def _count(counter: Counter, label: str) -> None:
    """Added up like ``request``: in multiprocess mode each inc() is a locked write to a file."""
    key = (counter, label)
    _counts[key] = _counts.get(key, 0) + 1
    _flush_soon()


def reserved(outcome: str) -> None:
    """One reserve decided: created, replayed, or the error code."""
    _count(RESERVATIONS, outcome)


def from_memory(code: str) -> None:
    """One refusal given from memory (it is counted by ``reserved`` too)."""
    _count(FROM_MEMORY, code)


def polled(answered: str) -> None:
    """One waiting-room poll answered: ``memory`` or ``redis``."""
    _count(POLLS, answered)


def committed(entry_ids: Sequence[str]) -> None:
    """A batch of stream entries is in Postgres; their ids carry the ms they were added."""
    BATCH.observe(len(entry_ids))
    PERSISTED.inc(len(entry_ids))
    oldest = min(int(e.split("-", 1)[0]) for e in entry_ids)
    LAG.observe(max(0.0, time.time() - oldest / 1000))


class FromRedis(Collector):
    """The numbers of one scrape, read from Redis just before."""

    def __init__(self, sales: Sequence[SaleProgress], workers_alive: int | None) -> None:
        self.sales, self.workers_alive = sales, workers_alive

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("flashsale_redis_up", "1 if Redis answered this scrape")
        up.add_metric([], 0 if self.workers_alive is None else 1)
        yield up
        if self.workers_alive is None:
            return
        workers = GaugeMetricFamily("flashsale_persister_workers_alive", "Persisters with a live heartbeat")
        workers.add_metric([], self.workers_alive)
        yield workers
        sale, item = ["sale_id"], ["sale_id", "sku"]
        total = GaugeMetricFamily("flashsale_item_stock_total_units", "Units the item was stocked with", labels=item)
        units = GaugeMetricFamily(
            "flashsale_item_units", "Units by state: available, held, confirmed, released", labels=[*item, "state"]
        )
        made = CounterMetricFamily("flashsale_item_reservations", "Holds made", labels=item)
        attempts = CounterMetricFamily("flashsale_item_attempts", "Reserve attempts", labels=item)
        rejected = CounterMetricFamily(
            "flashsale_item_rejections", "Reserve attempts refused, by error code", labels=[*item, "code"]
        )
        backlog = GaugeMetricFamily("flashsale_queue_backlog_events", "Events not yet in Postgres", labels=sale)
        age = GaugeMetricFamily(
            "flashsale_queue_oldest_unpersisted_age_seconds", "Age of the oldest event not yet in Postgres", labels=sale
        )
        dead = GaugeMetricFamily(
            "flashsale_dead_lettered_events", "Events in the sale's dead-letter stream", labels=sale
        )
        persisted = GaugeMetricFamily("flashsale_persisted_reservations", "Reservation rows in Postgres", labels=sale)
        drift = GaugeMetricFamily(
            "flashsale_item_drift_units",
            "available + held + confirmed - stock_total: 0 unless a unit was lost",
            labels=item,
        )
        differences = GaugeMetricFamily(
            "flashsale_sale_drift", "Differences the live audit finds (units, Redis against Postgres)", labels=sale
        )
        waiting = GaugeMetricFamily(
            "flashsale_waiting_room_tickets", "Tickets waiting in the sale's waiting room", labels=sale
        )
        tickets = CounterMetricFamily(
            "flashsale_waiting_room", "Waiting-room tickets by what became of them", labels=[*sale, "outcome"]
        )
        wait = GaugeMetricFamily(
            "flashsale_waiting_room_estimated_wait_seconds", "Estimated wait for one joining now", labels=sale
        )
        for p in self.sales:
            if p.queue is not None:
                waiting.add_metric([p.sale_id], p.queue.waiting)
                wait.add_metric([p.sale_id], p.queue.estimated_wait_s)
                for outcome in ("joined", "admitted", "expired", "closed_told"):
                    tickets.add_metric([p.sale_id, outcome], getattr(p.queue, outcome))
            for i in p.items:
                at = [p.sale_id, i.sku]
                total.add_metric(at, i.stock_total)
                for state in ("available", "held", "confirmed", "released"):
                    units.add_metric([*at, state], getattr(i, state))
                made.add_metric(at, i.reservations)
                drift.add_metric(at, i.drift)
                attempts.add_metric(at, i.attempts)
                for code, n in sorted(i.rejected.items()):
                    rejected.add_metric([*at, code], n)
            backlog.add_metric([p.sale_id], p.queue_backlog)
            age.add_metric([p.sale_id], p.oldest_unpersisted_age_s)
            dead.add_metric([p.sale_id], p.dead_lettered)
            differences.add_metric([p.sale_id], len(p.drift))
            if p.persisted is not None:
                persisted.add_metric([p.sale_id], p.persisted)
        yield from (total, units, made, attempts, rejected, backlog, age, dead, persisted, drift, differences)
        yield from (waiting, tickets, wait)


def _registry(collectors: Iterable[Collector]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return registry


def exposition(sales: Sequence[SaleProgress], workers_alive: int | None) -> bytes:
    """The scrape: this process's metrics (or every process's, in multiprocess mode), then
    Redis's. Reads files in multiprocess mode: call it off the event loop, after
    ``flush`` on it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counted = CollectorRegistry()
        MultiProcessCollector(counted)  # type: ignore[no-untyped-call]
    else:
        counted = REGISTRY
    return generate_latest(counted) + generate_latest(_registry([FromRedis(sales, workers_alive)]))

"""waiting_room: a crowd queues in front of a sale (contract, "Crowd control").

60% of the crowd joins before ``starts_at``, the rest after. Two thirds keep polling as ``poll_after_s``
says, and once admitted reserve with their Admission-Token, then pay, cancel or walk away (holds
last 2 s, so units come back; told sold_out while every unit is held, they try again a few
times), and come back as new shoppers until the line is closed; a third join and leave without
ever polling. Two sneaks try to reserve without a token, with a forged one and with another
user's, all along.
``loadtest/queue_verdict.py`` then judges, from what the clients saw, the sale's progress read
twice a second and Postgres: pre-start joiners admitted in an order that does not follow their
join order (|Spearman| <= 0.3), later ones first come first admitted, admission never stalled by
the leavers, never above ``admit_per_s``, never while every unit was held, the queue closed at
sold-out and nobody told "waiting" after it, and no reservation without a valid token.
"""

from __future__ import annotations

import itertools
import random
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

import gevent
import requests
from locust import constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtest.records import Records
from loadtest.shopper import Answer, Shopper, install, new_sale_id, run, sale_window

SKU = "console"
HOLD_SECONDS = 2
OPENS_IN_S = 2.4  # 60% of the crowd arrives before the start (the scenario spawns it over 4 s)
ABANDON_S = 5
TOKEN_TTL_S = 30
SAMPLE_S = 0.5
RESERVE_TRIES = 8  # an admitted shopper told sold_out while every unit is held tries again
STOLEN: list[str] = []  # tokens admitted users were given, for the sneaks to try as theirs


def stock_for(users: int) -> int:
    """Seven units for every twenty users. Selling 105 units takes at least 140 holds, as three
    holds in four are paid (OUTCOMES), each by another shopper (one unit each), so 140 or more are
    admitted before the sell-out: the 120 to 150 waiters who join before the start first (ahead of
    every later one in the line; the shuffle is judged on 100 or more), then later ones. The
    waiters who come back keep the line full, so admission pauses while every unit is held and
    someone is still waiting when the queue closes (three runs: 19 to 60 later joiners admitted,
    7.9 to 9.0 s with every unit out, 129 to 174 waiting tickets told sold_out)."""
    return max(20, users * 7 // 20)


# What an admitted shopper does with its hold, in exact shares, so that the number of holds a
# sell-out takes is known (stock_for).
OUTCOMES = itertools.cycle(random.sample(["confirm"] * 15 + ["cancel"] * 3 + ["walk away"] * 2, 20))


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("waiting-room"),
        "name": "Console drop",
        "hold_seconds": HOLD_SECONDS,
        **sale_window(opens_in=OPENS_IN_S),
        "waiting_room": {
            "admit_per_s": max(20, users // 5),
            "abandon_after_s": ABANDON_S,
            "admission_ttl_s": TOKEN_TTL_S,
        },
        "items": [
            {"sku": SKU, "name": "Console", "price_cents": 49900, "stock": stock_for(users), "per_user_limit": 1}
        ],
    }


def expect(rec: Records) -> list[str]:
    unmet = []
    if not rec.answers.get("sneak reserve 403 not_admitted"):
        unmet.append("the sneaks were never refused 403 not_admitted (they did not run?)")
    leavers = sum(1 for t in rec.tickets if t["final"] == "left")
    if not leavers:
        unmet.append("nobody left the queue: the run did not test abandoned tickets")
    return unmet


install("waiting_room", make_sale, expect)


def _sample_progress(environment: Environment, **_: Any) -> None:
    """The sale's /progress twice a second, in one process (the local one, or worker 0)."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner) and runner.worker_index not in (0, -1):
        return
    if run().role == "master":
        return

    def sample() -> None:
        rec = run().wait_records()
        url = f"{environment.host}/v1/sales/{rec.sale['id']}/progress"
        headers = {"Authorization": f"Bearer {run().ops_key}"}
        while not run().stopped:
            try:
                got = requests.get(url, headers=headers, timeout=5).json()
            except (requests.RequestException, ValueError):
                gevent.sleep(SAMPLE_S)
                continue
            queue, it = got.get("queue") or {}, (got.get("items") or [{}])[0]
            rec.queue_samples.append(
                {
                    "at_ms": round(time.time() * 1000),
                    "waiting": queue.get("waiting", 0),
                    "admitted": queue.get("admitted", 0),
                    "expired": queue.get("expired", 0),
                    "closed": queue.get("closed"),
                    "available": it.get("available", 0),
                    "held": it.get("held", 0),
                }
            )
            gevent.sleep(SAMPLE_S)

    gevent.spawn(sample)


events.test_start.add_listener(_sample_progress)


def now_ms() -> int:
    return round(time.time() * 1000)


def joined_ticket(shopper: Shopper, sent_ms: int, final: str) -> dict[str, Any]:
    """The record of a ticket joined now (its join sent at ``sent_ms``), kept for the verdict,
    which tells pre-start joins from later ones by these two times."""
    t: dict[str, Any] = {"user": shopper.user_id, "sent_ms": sent_ms, "joined_ms": now_ms(), "admitted_ms": None}
    t |= {"last_waiting_ms": None, "final": final, "reason": None}
    shopper.records.tickets.append(t)
    return t


def join_until_answered(shopper: Shopper, tries: int = 5) -> tuple[int, Answer]:
    """(when the join that was answered was sent, its answer): a 503 under load is asked again,
    as a client would, so that a busy machine does not thin out the pre-start crowd."""
    sent, joined = now_ms(), shopper.join()
    for _ in range(tries - 1):
        if joined.status != 503:
            break
        gevent.sleep(0.1)
        sent, joined = now_ms(), shopper.join()
    return sent, joined


class Waiter(Shopper):
    """Joins, keeps its place by polling, and buys once admitted; then comes back as a new shopper
    until told the line is closed, so that the crowd keeps arriving while there is something to
    sell (a fixed crowd could all be let in before the sell-out, and no one be left to tell)."""

    weight = 2
    wait_time = constant(0)

    @task
    def queue_and_buy(self) -> None:
        if self.done:
            self.idle()
            return
        if self.queue_once() == "closed":
            self.done = True
            return
        self.pause(0.3, 1.0)
        self.user_id = self.new_user_id()

    def queue_once(self) -> str:
        """One shopper's way through the line: its ticket's final status ('' if it never joined)."""
        sent, joined = join_until_answered(self)
        if not joined.ok or joined.body is None:
            return ""
        t = joined_ticket(self, sent, "waiting")
        ticket = joined.body
        while ticket["status"] == "waiting":
            t["last_waiting_ms"] = now_ms()
            gevent.sleep(ticket["poll_after_s"] * random.uniform(0.9, 1.0))
            polled = self.poll(ticket["ticket"])
            if polled.status != 200 or polled.body is None:
                continue  # a 503 under load: ask again, the place is kept for abandon_after_s
            ticket = polled.body
        t["final"], t["reason"] = ticket["status"], ticket.get("reason")
        if ticket["status"] == "admitted":
            expires = datetime.fromisoformat(ticket["expires_at"]).timestamp() * 1000
            t["admitted_ms"] = round(expires) - TOKEN_TTL_S * 1000
            self.buy(ticket["admission_token"], expires)
        return str(ticket["status"])

    def buy(self, token: str, expires: float) -> None:
        """Reserves with the admission token (valid until ``expires``, ms), then settles as OUTCOMES say."""
        STOLEN.append(token)
        a = self.reserve_until_answered(SKU, 1, token=token)
        for _ in range(RESERVE_TRIES):  # every unit held: units come back as holds end, try again
            if a.code != "sold_out" or time.time() * 1000 > expires - 1000:
                break
            self.pause(0.5, 1.0)
            a = self.reserve_until_answered(SKU, 1, token=token)
        if not (a.ok and a.body is not None):
            return
        self.pause(0.3, 1.0)
        outcome = next(OUTCOMES)
        if outcome != "walk away":  # one who walks away lets the hold expire: the unit comes back
            self.settle_until_answered(a.body["reservation_id"], outcome)


class Leaver(Shopper):
    """Joins and is gone: never polls. Its ticket must expire, never hold the line up."""

    weight = 1
    wait_time = constant(0)

    @task
    def join_and_leave(self) -> None:
        if self.done:
            self.idle()
            return
        self.done = True
        sent, joined = join_until_answered(self)
        if joined.ok:
            joined_ticket(self, sent, "left")


class Sneak(Shopper):
    """Reserves without a valid token: none, a forged one, another user's. Every try must be 403."""

    fixed_count = 2
    wait_time = constant(0.2)
    user_prefix = "sneak"

    @task
    def try_without_a_token(self) -> None:
        forged = f"{int(time.time() * 1000) + 60_000}.{secrets.token_urlsafe(32)}"
        for token in (None, forged, random.choice(STOLEN) if STOLEN else forged):
            self.reserve(SKU, 1, token=token, name="sneak reserve")

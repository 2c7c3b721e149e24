"""abuse: a few users hammer the reserve endpoint with no pause, asking for more than the per-user
limit and far above the per-user rate, cancelling now and then to try again; ordinary shoppers
buy alongside. The abusers must get 409 limit_exceeded and 429 rate_limited, and never hold more
than the limit at any instant. And a bot farm: 500 accounts behind 3 addresses, each account
within its own limit, must hold at most 3 x per_ip_limit units at any instant (client budgets).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import between, constant, task

from loadtest.records import Records, peak
from loadtest.shopper import Shopper, install, item, new_sale_id, sale_window

SKU = "gpu"
LIMIT = 2
PER_IP = 3
FARM_SKU = "gpu-b"
FARM_ACCOUNTS = 500
FARM_ADDRESSES = ("203.0.113.7", "198.51.100.23", "2001:db8:aa:1::5")
MAX_REQUESTS = 5000  # per abuser: the hammering is bounded in count as well as in time


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("abuse"),
        "name": "Abuse",
        "hold_seconds": 30,
        **sale_window(),
        "items": [
            {"sku": SKU, "name": "GPU", "price_cents": 99900, "stock": max(10, users // 5), "per_user_limit": LIMIT},
            # the farm's own item, with more stock than 3 addresses may take: the limit must stop it
            {"sku": FARM_SKU, "name": "GPU (farm)", "price_cents": 99900, "stock": 30, "per_user_limit": LIMIT}
            | {"per_ip_limit": PER_IP, "shards": 3},
        ],
    }


def expect(rec: Records) -> list[str]:
    wanted = ["abuser reserve 409 limit_exceeded"]
    if os.environ.get("FLASHSALE_USER_RATE", "20") != "0":
        wanted.append("abuser reserve 429 rate_limited")
    unmet = [f"abusers never got {w.split(' ', 2)[2]}" for w in wanted if not rec.answers.get(w)]
    farm = [a.interval() for a in rec.acked.values() if a.user.startswith("farm")]
    most = peak((*span, 1) for span in farm if span is not None)
    rec.notes.append(f"the farm ({FARM_ACCOUNTS} accounts, {len(FARM_ADDRESSES)} addresses) held at most {most} units")
    if most > len(FARM_ADDRESSES) * PER_IP:
        unmet.append(f"the farm held {most} units at once behind 3 addresses (per_ip_limit {PER_IP})")
    if not rec.answers.get("farm reserve 409 limit_exceeded"):
        unmet.append("the farm was never refused limit_exceeded (did it run?)")
    return unmet


install("abuse", make_sale, expect)


class Abuser(Shopper):
    fixed_count = 3
    wait_time = constant(0)
    user_prefix = "abuser"

    def on_start(self) -> None:
        self.records.abusers.add(self.user_id)
        self.sent = 0
        self.mine: list[str] = []

    @task
    def hammer(self) -> None:
        if self.sent >= MAX_REQUESTS:
            self.idle()
            return
        self.sent += 1
        a = self.reserve(SKU, random.choice((1, 1, 2, 3)))
        if a.ok and a.body is not None:
            self.mine.append(a.body["reservation_id"])
        if self.mine and random.random() < 0.05:
            self.sent += 1
            self.settle(self.mine.pop(random.randrange(len(self.mine))), "cancel")


class Farm(Shopper):
    """A bot farm: one locust user playing 500 accounts in turn, behind 3 addresses."""

    fixed_count = 1
    wait_time = constant(0.01)

    def on_start(self) -> None:
        self.turn = 0

    @task
    def hammer(self) -> None:
        if self.turn >= FARM_ACCOUNTS * 3:
            self.idle()
            return
        n = self.turn % FARM_ACCOUNTS
        self.turn += 1
        self.user_id = f"farm{n}"
        self.reserve(FARM_SKU, 1, end_user={"ip": FARM_ADDRESSES[n % len(FARM_ADDRESSES)]}, name="farm reserve")


class Regular(Shopper):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.tries = 0

    @task
    def buy(self) -> None:
        if self.done or self.tries >= 5:
            self.idle()
            return
        self.tries += 1
        gpu = item(self.browse(), SKU)
        if not gpu.get("available"):
            return
        a = self.reserve_until_answered(SKU, 1)
        if a.ok and a.body is not None:
            self.pause(0.5, 2.0)
            self.settle_until_answered(a.body["reservation_id"], "confirm")
            self.done = True

"""abuse: a few users hammer the reserve endpoint with no pause, asking for more than the per-user
limit and far above the per-user rate, cancelling now and then to try again; ordinary shoppers
buy alongside. The abusers must get 409 limit_exceeded and 429 rate_limited, and never hold more
than the limit at any instant.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import between, constant, task

from loadtest.records import Records
from loadtest.shopper import Shopper, install, item, new_sale_id, sale_window

SKU = "gpu"
LIMIT = 2
MAX_REQUESTS = 5000  # per abuser: the hammering is bounded in count as well as in time


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("abuse"),
        "name": "Abuse",
        "hold_seconds": 30,
        **sale_window(),
        "items": [
            {"sku": SKU, "name": "GPU", "price_cents": 99900, "stock": max(10, users // 5), "per_user_limit": LIMIT}
        ],
    }


def expect(rec: Records) -> list[str]:
    wanted = ["abuser reserve 409 limit_exceeded"]
    if os.environ.get("FLASHSALE_USER_RATE", "20") != "0":
        wanted.append("abuser reserve 429 rate_limited")
    return [f"abusers never got {w.split(' ', 2)[2]}" for w in wanted if not rec.answers.get(w)]


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

"""browse_and_buy: a storefront's usual mix. Ten reads of the sale page for every reservation
attempt, across three items; winners pay (50%), cancel (30%) or leave the hold (20%), and
look at their reservation afterwards.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import task

from loadtest.shopper import Shopper, install, item, new_sale_id, sale_window

SKUS = ("tee", "hoodie", "cap")


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    stock = max(5, users // 4)
    return {
        "id": new_sale_id("browse_and_buy"),
        "name": "Browse and buy",
        "hold_seconds": 30,
        **sale_window(),
        "items": [
            {"sku": s, "name": s.title(), "price_cents": 2500, "stock": stock, "per_user_limit": 2} for s in SKUS
        ],
    }


install("browse_and_buy", make_sale)


class Customer(Shopper):
    def on_start(self) -> None:
        self.rounds = 0

    @task
    def round(self) -> None:
        if self.done or self.rounds >= 20:
            self.idle()
            return
        self.rounds += 1
        sale = None
        for _ in range(10):
            sale = self.browse() or sale
            self.pause(0.1, 0.5)
        sku = random.choice(SKUS)
        if not item(sale, sku).get("available") and random.random() < 0.7:
            return  # nothing left of it right now; most shoppers don't click
        a = self.reserve_until_answered(sku, random.choice((1, 1, 2)))
        if a.code == "rate_limited":
            self.pause(a.retry_after, a.retry_after + 1)
        if not (a.ok and a.body is not None):
            return
        rid = a.body["reservation_id"]
        self.look(rid)
        self.pause(0.5, 2.0)
        roll = random.random()
        if roll < 0.5:
            self.settle_until_answered(rid, "confirm")
        elif roll < 0.8:
            self.settle_until_answered(rid, "cancel")
        self.look(rid)

"""abandon: most winners never pay. Holds last 3 s; 85% of winners walk away, so their units go back
to stock when the hold expires, and shoppers still trying get them. The run must show units sold
more than once over (expired holds re-sold) and every expired hold released and persisted.
"""

from __future__ import annotations

import random
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import task

from loadtest.records import Records
from loadtest.shopper import Shopper, install, item, new_sale_id, sale_window

SKU = "sneaker"
HOLD_SECONDS = 3


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("abandon"),
        "name": "Abandoned carts",
        "hold_seconds": HOLD_SECONDS,
        **sale_window(),
        "items": [
            {"sku": SKU, "name": "Sneaker", "price_cents": 12000, "stock": max(5, users // 10), "per_user_limit": 1}
        ],
    }


def expect(rec: Records) -> list[str]:
    if rec.duration_s < 4 * HOLD_SECONDS:
        return []
    stock = rec.sale["items"][0]["stock"]
    sold = sum(a.qty for a in rec.acked.values())
    expired = sum(1 for a in rec.acked.values() if a.status in ("held", "expired"))
    unmet = []
    if sold <= stock:
        unmet.append(f"no expired hold was re-sold: {sold} units reserved of a stock of {stock}")
    if not expired:
        unmet.append("no hold was abandoned")
    return unmet


install("abandon", make_sale, expect)


class Browser(Shopper):
    @task
    def journey(self) -> None:
        if self.done:
            self.idle()
            return
        for _ in range(20):
            a = self.reserve_until_answered(SKU, 1)
            if a.ok and a.body is not None:
                rid = a.body["reservation_id"]
                if random.random() < 0.15:
                    self.pause(0.3, 1.5)
                    self.settle_until_answered(rid, "confirm")
                break  # a winner who walks away does not come back
            if a.code == "rate_limited":
                self.pause(a.retry_after, a.retry_after + 1)
                continue
            if a.code != "sold_out":
                break
            # "all reserved, may free up at next_release_at": come back around then
            sneaker = item(self.browse(), SKU)
            if not sneaker.get("held") and not sneaker.get("available"):
                break  # sold for good
            release = sneaker.get("next_release_at")
            wait = datetime.fromisoformat(release).timestamp() - datetime.now().timestamp() if release else 1.0
            self.pause(max(0.0, wait), max(0.0, wait) + 1.5)
        self.idle()

"""flash_crowd: the whole crowd arrives within seconds of the opening and wants 20x the stock.

The sale opens 3 s after the test starts; a LoadTestShape brings every user in over ~3 s (the
spawn rate), so most are waiting on the page when it opens and click at once. Winners pay (70%),
cancel (10%) or walk away (20%, their 20 s holds expire); losers refresh the page a few times and
try again when units come back.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import LoadTestShape, task

from loadtest.records import Records
from loadtest.shopper import Shopper, install, item, new_sale_id, sale_window

SKU = "drop"
OPENS_IN = 3.0


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("flash_crowd"),
        "name": "Flash crowd",
        "hold_seconds": 20,
        **sale_window(opens_in=OPENS_IN),
        "items": [
            {"sku": SKU, "name": "Limited drop", "price_cents": 9900, "stock": max(5, users // 20), "per_user_limit": 2}
        ],
    }


def expect(rec: Records) -> list[str]:
    stock = rec.sale["items"][0]["stock"]
    return [] if rec.users >= 10 * stock else [f"demand {rec.users} users < 10x stock {stock}"]


install("flash_crowd", make_sale, expect)


class Spike(LoadTestShape):
    """0 to all users at the spawn rate (-r, default over 3 s), held until the run time (-t) is up."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None and self.runner.environment.parsed_options is not None
        opts = self.runner.environment.parsed_options
        users = int(opts.num_users or 1)
        if self.get_run_time() >= float(opts.run_time or 60):
            return None
        return users, float(opts.spawn_rate or max(1.0, users / 3))


class Buyer(Shopper):
    @task
    def journey(self) -> None:
        if self.done:
            self.idle()
            return
        self.browse()  # the landing page, before the opening
        self.wait_for_opening()
        for _ in range(4):
            a = self.reserve_until_answered(SKU, random.choice((1, 1, 1, 2)))
            if a.ok and a.body is not None:
                self.pay_or_not(a.body["reservation_id"])
                break
            if a.code == "rate_limited":
                self.pause(a.retry_after, a.retry_after + 1)
                continue
            if a.code not in ("sold_out", "limit_exceeded"):
                break
            # "all reserved, may free up": refresh the page a few times until units come back
            for _ in range(5):
                self.pause(1.0, 3.0)
                drop = item(self.browse(), SKU)
                if drop.get("available", 0) > 0 or (not drop.get("held") and not drop.get("available")):
                    break
            if not drop.get("available"):
                break
        self.idle()

    def pay_or_not(self, rid: str) -> None:
        self.pause(1.0, 4.0)  # filling in the payment form
        roll = random.random()
        if roll < 0.7:
            self.settle_until_answered(rid, "confirm")
        elif roll < 0.8:
            self.settle_until_answered(rid, "cancel")
        else:
            return  # walks away; the hold expires
        self.look(rid)

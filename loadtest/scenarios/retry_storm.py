"""retry_storm: impatient clients. Each purchase sends the same reservation twice at once (a double
click) while a third copy goes through a connection that gives up after a few milliseconds and is
resent, with the same Idempotency-Key, until it gets an answer. Payments and cancels are
double-clicked too. Every answer for one key must name one reservation, never two.
"""

from __future__ import annotations

import random
import secrets
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `loadtest`

from locust import between, task

from loadtest.records import Records
from loadtest.shopper import Answer, Shopper, install, new_sale_id, sale_window

SKU = "console"


def make_sale(users: int, seconds: float) -> dict[str, Any]:
    return {
        "id": new_sale_id("retry_storm"),
        "name": "Retry storm",
        "hold_seconds": 30,
        **sale_window(),
        "items": [
            {"sku": SKU, "name": "Console", "price_cents": 49900, "stock": max(10, users // 5), "per_user_limit": 2}
        ],
    }


def expect(rec: Records) -> list[str]:
    unmet = []
    if not rec.answers.get("reserve 200"):
        unmet.append("no retry was answered with the earlier reservation (200)")
    if not any(k.startswith("reserve 0") for k in rec.answers):
        unmet.append("no client gave up on a request (nothing was retried after a timeout)")
    return unmet


install("retry_storm", make_sale, expect)


class Impatient(Shopper):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        # Gives up after 2-40 ms: under load many first tries time out while the service works on them.
        self.hasty = self.impatient(random.choice((0.002, 0.005, 0.01, 0.02, 0.04)))
        self.purchases = 0

    @task
    def purchase(self) -> None:
        if self.done or self.purchases >= 3:
            self.idle()
            return
        self.purchases += 1
        key = secrets.token_urlsafe(12)
        qty = 1
        answers = self.together(
            lambda: self.reserve(SKU, qty, key),
            lambda: self.reserve(SKU, qty, key),
            lambda: self.hasty_then_patient(key, qty),
        )
        won = next((a for a in answers if a.ok and a.body is not None), None)
        if won is None:
            if any(a.code == "sold_out" for a in answers):
                self.done = True
            return
        assert won.body is not None
        rid = won.body["reservation_id"]
        self.pause(0.2, 1.5)
        roll = random.random()
        if roll < 0.6:
            self.together(
                lambda: self.settle_until_answered(rid, "confirm"), lambda: self.settle_until_answered(rid, "confirm")
            )
        elif roll < 0.8:
            self.together(
                lambda: self.settle_until_answered(rid, "cancel"), lambda: self.settle_until_answered(rid, "cancel")
            )
        self.look(rid)

    def hasty_then_patient(self, key: str, qty: int) -> Answer:
        """Resends on the hasty connection while it times out, then once on the patient one."""
        for _ in range(3):
            a = self.reserve(SKU, qty, key, client=self.hasty)
            if not a.unanswered:
                return a
            self.pause(0.0, 0.05)
        return self.reserve_until_answered(SKU, qty, key)

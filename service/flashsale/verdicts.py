"""Refusals a process may repeat from memory: sold out, not started, paused, ended.

Only what the reserve script itself answered is remembered, never a guess from an error or a
timeout, and only while it is provably fresh (contract invariants 7 and 8):

- Every script that can turn a refusal into a success (units back, a state or window change)
  publishes the sale id on the changes channel in the same atomic step; the listener
  (``invalidation.py``) calls ``forget`` and the sale's verdicts are gone.
- A reply is remembered only if nothing about its sale was heard between the moment its call
  was sent and the moment it came back (``ticket``): a change that raced the call is never
  papered over by the call's older answer.
- While the channel is down, nothing is remembered and nothing is answered from memory; after
  it is back, only replies to calls sent after that are remembered.
- Each verdict also dies ``ttl_s`` after its call was sent, whatever the channel says: a
  silently stalled connection can keep a stale answer at most that long.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

SALE_WIDE = frozenset({"sale_not_started", "sale_paused", "sale_ended"})
REMEMBERED = SALE_WIDE | {"sold_out"}


@dataclass(frozen=True)
class Verdict:
    code: str
    number: int  # sold_out: units available then; sale_not_started: starts_ms
    until: float  # time.monotonic() after which it is not used


@dataclass(frozen=True)
class Ticket:
    epoch: int
    generation: int
    sent: float


class Verdicts:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.trusted = False  # the channel is up and subscribed
        self._epoch = 0  # bumped whenever the channel goes down or comes back
        self._generation: dict[str, int] = {}  # sale id -> changes heard
        self._items: dict[tuple[str, str], Verdict] = {}

    def ticket(self, sale_id: str) -> Ticket:
        """Taken just before a reserve call is sent; handed back with its reply to ``remember``."""
        return Ticket(self._epoch, self._generation.get(sale_id, 0), time.monotonic())

    def remember(self, sale_id: str, sku: str, code: str, number: int, ticket: Ticket) -> None:
        if (
            code not in REMEMBERED
            or not self.trusted
            or self.ttl_s <= 0
            or ticket.epoch != self._epoch
            or ticket.generation != self._generation.get(sale_id, 0)
        ):
            return
        until = ticket.sent + self.ttl_s
        if code == "sale_not_started":  # the window opens by itself, with no message: stop then
            until = min(until, ticket.sent + (number / 1000 - time.time()))
        self._items[(sale_id, sku)] = Verdict(code, number, until)

    def recall(self, sale_id: str, sku: str, quantity: int) -> Verdict | None:
        """The remembered refusal of this request, if there is one that still holds."""
        verdict = self._items.get((sale_id, sku))
        if verdict is None:
            return None
        if time.monotonic() >= verdict.until:
            del self._items[(sale_id, sku)]
            return None
        if verdict.code == "sold_out" and quantity <= verdict.number:
            return None  # fewer units asked than were left: only the script can say
        return verdict

    def forget(self, sale_id: str) -> None:
        """Something about the sale changed: drop its verdicts and any reply still in flight."""
        self._generation[sale_id] = self._generation.get(sale_id, 0) + 1
        for key in [k for k in self._items if k[0] == sale_id]:
            del self._items[key]

    def channel(self, up: bool) -> None:
        """The changes channel went down (forget everything) or came back (trust from now on)."""
        self._epoch += 1
        self._items.clear()
        self._generation.clear()
        self.trusted = up

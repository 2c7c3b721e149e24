"""Attempts answered from memory, added to the same Redis counters the reserve script keeps
(``attempts`` and ``rej:<code>`` in the item hash), so progress counts every attempt (contract
invariant 8). Flushed every ``interval_s`` and at shutdown; counts a failed flush could not
write are kept for the next one. One script call per sale (``lua/tally_add.lua``: a sale's keys
share a slot, two sales' need not), sent together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from . import connection
from .keys import Keys
from .scripts import Scripts

log = logging.getLogger("flashsale.tally")


class Tally:
    def __init__(self, keys: Keys, scripts: Scripts) -> None:
        self.keys, self.scripts = keys, scripts
        self._counts: Counter[tuple[str, str, str]] = Counter()  # (sale, sku, code) -> refusals

    def refused(self, sale_id: str, sku: str, code: str) -> None:
        self._counts[(sale_id, sku, code)] += 1

    async def flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        by_sale: dict[str, Counter[tuple[str, str, str]]] = {}
        for (sale_id, sku, code), n in counts.items():
            by_sale.setdefault(sale_id, Counter())[(sale_id, sku, code)] = n
        await asyncio.gather(*(self._flush_counts(c) for c in by_sale.values()))

    async def _flush_counts(self, counts: Counter[tuple[str, str, str]]) -> None:
        keys = [self.keys.item(sale_id, sku) for sale_id, sku, _ in counts]
        args = [x for (_, _, code), n in counts.items() for x in (code, n)]
        try:
            refused = int(await self.scripts.tally_add(keys=keys, args=args))  # all of them or none
        except connection.ERRORS as exc:
            # Kept for the next flush. Only if the connection died after Redis ran the script but
            # before its reply came back are they counted twice: the lesser wrong, and rare.
            log.warning("could not add %d answers from memory to progress, retrying: %r", counts.total(), exc)
            self._counts.update(counts)
            return
        if refused:  # a counter Redis will not add to (not a number): retrying cannot help
            log.error("progress counters refused %d increments, dropped", refused)

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            await self.flush()

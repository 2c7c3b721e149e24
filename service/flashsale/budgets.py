"""Client budgets (``per_ip_limit``, ``per_device_limit``, ``ip_rate_per_s``) of a sharded item,
exact across its shards.

A script counts in one slot, and a sharded item's holds are spread over its shards by user
(``shards.home``), so one address's holds may sit in every shard. Each client key is therefore
counted in one shard of its own, picked the same way from the key, and a reserve:

1. charges the client where it is counted (lua/budget_take.lua: checked and taken in one step,
   the charge kept by reservation id, and marked pending);
2. makes the hold in the user's shard, marked charged (reserve.lua ARGV[11]);
3. on success drops the pending mark; on any refusal gives the charge back (lua/budget_give.lua).

A cancel or expiry of a charged hold records a refund in its shard (settle.lua), given back at
once by the API and, should that fail, by the sweeper. A process that dies between 1 and 2 leaves
a pending charge: after ``PENDING_MS`` the sweeper settles it, first making sure the hold can
never be made later (lua/budget_void.lua). Each charge is given back once, however often asked.
So a client is counted for at most what it holds and has bought, never less: until a repair, a
crash can only leave it with fewer units.

When the user's, the address's and the device's shards are one, reserve.lua counts all of them
in one step, as for an item in one slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from . import shards
from .connection import Client
from .keys import Keys
from .scripts import Scripts

PENDING_MS = 30_000  # a charge whose hold was neither reported made nor refused after this long: the API died


def places(slots: Sequence[str], ip: str, device: str, rate_ip: str = "") -> dict[str, tuple[str, str, str]]:
    """slot -> (the ip key whose units are counted there, the device counted there, the ip key
    whose attempts a second are counted there), '' for none: each client key's units in the shard
    its own hash picks (prefixed, so that an ip and a device named alike differ); the attempts
    an ip makes a second in the sale's own slot, where every other item of the sale counts them."""
    out: dict[str, tuple[str, str, str]] = {}
    if ip:
        out[shards.home(slots, f"ip:{ip}")] = (ip, "", "")
    if device:
        slot = shards.home(slots, f"device:{device}")
        was = out.get(slot, ("", "", ""))
        out[slot] = (was[0], device, "")
    if rate_ip:
        was = out.get(slots[0], ("", "", ""))
        out[slots[0]] = (was[0], was[1], rate_ip)
    return out


@dataclass(frozen=True)
class Budgets:
    redis: Client
    keys: Keys
    scripts: Scripts

    async def charge(
        self, where: Mapping[str, tuple[str, str, str]], sku: str, rid: str, quantity: int
    ) -> tuple[str, int] | None:
        """Takes the client's budget in every slot that counts a part of it, or none: then the
        refusal (code, number), and a refusal in one gave back what the others took."""
        k = self.keys
        taken: list[str] = []
        for slot, (ip, device, rate_ip) in where.items():
            got = await self.scripts.budget_take(
                keys=[
                    k.sale(slot),
                    k.item(slot, sku),
                    k.charges(slot, sku),
                    k.pending(slot, sku),
                    k.ips(slot, sku),
                    k.devices(slot, sku),
                    k.ip_rate(slot, rate_ip),
                ],
                args=[rid, quantity, ip, device, rate_ip],
            )
            if got[0] != "ok":
                await self.give(taken, sku, [rid])
                return str(got[1]), int(got[2])
            taken.append(slot)
        return None

    async def kept(self, slots: Sequence[str], sku: str, rid: str) -> None:
        """The hold was made: its charges stay (until it is released), no longer pending."""
        for slot in slots:
            await self.redis.zrem(self.keys.pending(slot, sku), rid)

    async def give(self, slots: Sequence[str], sku: str, rids: Sequence[str]) -> int:
        """Gives the charges of ``rids`` back in each of ``slots``; how many there were."""
        k = self.keys
        given = 0
        for slot in slots:
            given += int(
                await self.scripts.budget_give(
                    keys=[k.charges(slot, sku), k.pending(slot, sku), k.ips(slot, sku), k.devices(slot, sku)],
                    args=list(rids),
                )
            )
        return given

    async def refund(self, slot: str, item_slots: Mapping[str, Sequence[str]], rids: Sequence[str] = ()) -> int:
        """Gives back the charges of the released holds in ``slot`` (settle.lua's refunds): those
        of ``rids`` only, or all. ``item_slots``: sku -> its shards, to find where each was charged."""
        k = self.keys
        if rids:
            found = cast(list[str | None], await self.redis.hmget(k.refunds(slot), list(rids)))
            waiting = {r: s for r, s in zip(rids, found, strict=True) if s is not None}
        else:
            waiting = cast(dict[str, str], await self.redis.hgetall(k.refunds(slot)))
        if not waiting:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for rid in waiting:
            pipe.hmget(k.reservation(slot, rid), ["ip", "device"])
        given = 0
        for (rid, sku), (ip, device) in zip(waiting.items(), await pipe.execute(), strict=True):
            counted = places(item_slots.get(sku, [slot]), ip or "", device or "")  # the rate is not given back
            given += await self.give(list(counted), sku, [rid])
            await self.redis.hdel(k.refunds(slot), rid)
        return given

    async def repair(self, slot: str, sku: str, older_than_ms: int) -> int:
        """Settles the charges in ``slot`` still pending since before ``older_than_ms``: kept if
        their hold was made, given back if it never will be; how many were given back."""
        k = self.keys
        rids = cast(list[str], await self.redis.zrangebyscore(k.pending(slot, sku), "-inf", older_than_ms))
        given = 0
        for rid in rids:
            held_in = rid.split(".", 1)[0]  # the slot a reservation id names (reservations.RID)
            made = int(await self.scripts.budget_void(keys=[k.reservation(held_in, rid)], args=[]))
            if made:
                await self.redis.zrem(k.pending(slot, sku), rid)
            else:
                given += await self.give([slot], sku, [rid])
        return given

"""Reserve, read, confirm and cancel: each one call to a Lua script that decides atomically.

A reserve that the script refused moments ago for a reason that still holds (sold out, not
started, paused, ended) is refused again from memory (``verdicts.py``), counted in the same
progress counters (``tally.py``): a crowd's sold-out answers then cost no Redis call at all.
A request with an Idempotency-Key first asks Redis whether the key was used (one EXISTS, in the
tick's pipeline): a retry of a reservation that succeeded must get that reservation back.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from . import budgets, metrics, shards
from .connection import Client
from .errors import ApiError
from .keys import Keys
from .sales import instant, now_ms
from .schemas import Reservation
from .scripts import Scripts
from .settings import Settings
from .tally import Tally
from .verdicts import Verdicts
from .waiting import Tokens

# The slot the reservation lives in (its sale id, and "~x" in an extra slot of a sharded item:
# shards.py), then 128 random bits.
RID = re.compile(r"^(([A-Za-z0-9_-]{1,64})(?:~[0-9a-f]{1,8})?)\.[A-Za-z0-9_-]{22}(?!\n)$")
FIELDS = ("rid", "sku", "user", "qty", "status", "created_ms", "expires_ms", "final_ms", "payment_ref")
MOVE_TRIES = 5  # a sharded item: rounds of "take stock from the other shards, try again"
KEY_WAIT_S = 0.25  # a charge refused: how long a same-key request in flight may take to make its hold


def new_rid(slot: str) -> str:
    """The slot (so the id finds its keys) and 128 random bits (so nobody can guess one)."""
    return f"{slot}.{secrets.token_urlsafe(16)}"


def reserve_keys(k: Keys, slot: str, rid: str, user_id: str, sku: str, idem: str, ip: str) -> list[str]:
    """lua/reserve.lua's KEYS, in its order: laid out in this one place."""
    return [
        k.sale(slot),
        k.item(slot, sku),
        k.users(slot, sku),
        k.holds(slot, sku),
        k.reservation(slot, rid),
        k.events(slot),
        k.idempotency(slot, user_id, idem),
        k.rate(slot, user_id),
        k.user_reservations(slot, user_id),
        k.ips(slot, sku),
        k.devices(slot, sku),
        k.ip_rate(slot, ip),
    ]


def fingerprint(sku: str, quantity: int) -> str:
    """What an Idempotency-Key remembers of its request besides the reservation: the same key
    with another sku or quantity is an idempotency_conflict."""
    return f"{sku}:{quantity}"


def slot_of(rid: str) -> tuple[str, str]:
    """(the slot a reservation id names, its sale id)."""
    match = RID.match(rid)
    if match is None:
        raise ApiError("not_found", "no such reservation")
    return match.group(1), match.group(2)


def to_reservation(sale_id: str, values: list[str | None], now: int | None = None) -> Reservation:
    rid, sku, user, qty, status, created, expires, final, payment_ref = values
    assert rid and sku and user and qty and status and created and expires
    if status == "held" and now is not None and now >= int(expires):
        status = "expired"  # due and about to be swept: say what it is
    return Reservation(
        reservation_id=rid,
        sale_id=sale_id,
        sku=sku,
        user_id=user,
        quantity=int(qty),
        status=status,  # type: ignore[arg-type]
        created_at=instant(created),
        expires_at=instant(expires),
        updated_at=instant(final) if final else None,
        payment_ref=payment_ref or None,
    )


async def settle(
    scripts: Scripts,
    keys: Keys,
    slot: str,
    sku: str,
    action: Literal["confirm", "cancel", "expire"],
    rids: Sequence[str],
    user_id: str = "",
    payment_ref: str = "",
) -> Any:
    """lua/settle.lua on reservations of one sku in one slot, its KEYS/ARGV laid out in this one place."""
    return await scripts.settle(
        keys=[
            keys.item(slot, sku),
            keys.users(slot, sku),
            keys.holds(slot, sku),
            keys.events(slot),
            keys.ips(slot, sku),
            keys.devices(slot, sku),
            keys.refunds(slot),
            *(keys.reservation(slot, r) for r in rids),
        ],
        args=[action, user_id, payment_ref, keys.changes, shards.sale_of_slot(slot), *rids],
    )


def reject(code: str, number: int) -> ApiError:
    """The error a script's refusal stands for, with the number it came with."""
    if code == "not_found":
        return ApiError("not_found", "no such sale or item")
    if code in ("sold_out", "limit_exceeded"):
        return ApiError(code, available=number)
    if code == "sale_not_started":
        return ApiError(code, starts_at=instant(number), retry_after=max(1, math.ceil((number - now_ms()) / 1000)))
    if code == "rate_limited":
        return ApiError(code, retry_after=max(1, math.ceil(number / 1000)))
    return ApiError(code)


@dataclass(frozen=True)
class Reservations:
    redis: Client
    keys: Keys
    scripts: Scripts
    settings: Settings
    verdicts: Verdicts
    tally: Tally
    routes: shards.Routes
    mover: shards.Mover
    tokens: Tokens
    budgets: budgets.Budgets

    async def reserve(
        self,
        sale_id: str,
        user_id: str,
        sku: str,
        quantity: int,
        idempotency_key: str | None,
        admission_token: str | None = None,
        client: tuple[str, str] = ("", ""),
    ) -> tuple[Reservation, bool] | ApiError:
        """The reservation and whether this call created it (False: a replay), or the refusal.
        ``client``: the end user's (ip key, device), clients.py; '' for each not given."""
        idem = idempotency_key or ""
        if await self.routes.waiting_room(sale_id):
            self.tokens.check(sale_id, user_id, admission_token)  # in memory: 403 not_admitted
        verdict = self.verdicts.recall(sale_id, sku, quantity)
        if verdict is not None and idem:
            # A key that made a reservation gets it back (a replay): only the script can say. Recalled
            # again after that round trip, which a busy Redis can make long.
            used = await self._used(sale_id, sku, user_id, idem)
            verdict = None if used else self.verdicts.recall(sale_id, sku, quantity)
        if verdict is not None:
            self.tally.refused(sale_id, sku, verdict.code)
            metrics.from_memory(verdict.code)
            return reject(verdict.code, verdict.number)
        slots = await self.routes.item(sale_id, sku)
        if len(slots) == 1:
            outcome = await self._reserve_in(sale_id, sale_id, user_id, sku, quantity, idem, "", client)
        else:
            outcome = await self._reserve_sharded(sale_id, slots, user_id, sku, quantity, idem, client)
        if not isinstance(outcome, ApiError):
            return outcome
        if outcome.code == "not_found":
            self.routes.forget(sale_id)  # made again since (flashsale recover, or by ops): read it anew
        return outcome

    async def _reserve_in(
        self,
        sale_id: str,
        slot: str,
        user_id: str,
        sku: str,
        quantity: int,
        idem: str,
        mode: str,
        client: tuple[str, str] = ("", ""),
        rid: str = "",
        charged: bool = False,
    ) -> tuple[Reservation, bool] | ApiError:
        """One call to lua/reserve.lua in ``slot``; a refusal that holds for everyone is remembered.
        ``rid``: the id to make (a new one if ''); ``charged``: the client's budgets were taken in
        their own slots (budgets.py)."""
        k = self.keys
        ticket = self.verdicts.ticket(sale_id)
        rid = rid or new_rid(slot)
        result = await self.scripts.reserve(
            keys=reserve_keys(k, slot, rid, user_id, sku, idem, client[0]),
            args=[
                rid,
                user_id,
                sku,
                quantity,
                fingerprint(sku, quantity),
                idem,
                self.settings.user_rate_per_s,
                mode,
                *client,
                "1" if charged else "",
            ],
        )
        if result[0] == "ok":
            _, created, expires = result
            values = [rid, sku, user_id, str(quantity), "held", created, expires, None, None]
            return to_reservation(sale_id, values), True
        if result[0] == "replay":
            try:
                return await self.get(result[1], user_id), False
            except ApiError:
                if result[1] != rid:
                    raise
                # This very id, and no hold: the sweeper gave up on it (budgets.py, a charge
                # that waited too long) and left a tombstone so that it is never made.
                return ApiError("unavailable", "the reservation took too long: try again", retry_after=1)
        code, number = result[1], int(result[2])
        if not (mode and code == "sold_out"):  # a shard's sold_out is not the item's
            self.verdicts.remember(sale_id, sku, code, number, ticket)
        return reject(code, number)

    async def _reserve_sharded(
        self, sale_id: str, slots: list[str], user_id: str, sku: str, quantity: int, idem: str, client: tuple[str, str]
    ) -> tuple[Reservation, bool] | ApiError:
        """In the user's shard; when it is short, stock moved there from the others (shards.py)
        and asked again, or sold_out if the item as a whole is short. The client's budgets are
        charged first where they are counted, unless that is the user's shard too (budgets.py)."""
        slot = shards.home(slots, user_id)
        by_ip, by_device, ip_rate = await self.routes.counted(sale_id, sku)
        ip, device = client
        where = budgets.places(slots, ip if by_ip else "", device if by_device else "", ip if ip_rate else "")
        charged = bool(where) and set(where) != {slot}
        rid = new_rid(slot)
        claimed = False
        if idem and slot != sale_id:  # in the sale's own slot the script's own key is the sale's
            claim = await self._claim(sale_id, slot, user_id, sku, quantity, idem)
            if isinstance(claim, ApiError):
                self.tally.refused(sale_id, sku, claim.code)
                return claim
            claimed = claim
        if charged and idem and await self._key_used(slot, user_id, idem):
            charged = False  # a retry of a reservation made: the script replays it before any budget
        refusal = await self._charge(sku, rid, quantity, where) if charged else None
        if refusal is not None and idem and await self._key_used(slot, user_id, idem, wait=not claimed):
            charged, refusal = False, None  # the same key's first try got the budget: its hold is replayed
        outcome = refusal or await self._hold_in_shard(
            sale_id, slots, slot, user_id, sku, quantity, idem, client, rid, charged
        )
        made = not isinstance(outcome, ApiError) and outcome[0].reservation_id == rid
        if charged and made:
            await self.budgets.kept(list(where), sku, rid)
        elif charged:  # refused, or a replay of another request's hold: this one charged for nothing
            await self.budgets.give(list(where), sku, [rid])
        if claimed and isinstance(outcome, ApiError):  # a refused attempt may be tried again with another body
            await self.scripts.calls.call("DEL", self.keys.idempotency(sale_id, user_id, idem))
        return outcome

    async def _charge(
        self, sku: str, rid: str, quantity: int, where: dict[str, tuple[str, str, str]]
    ) -> ApiError | None:
        """The client's budgets taken where they are counted, or the refusal (counted there, by
        lua/budget_take.lua, not again here)."""
        refused = await self.budgets.charge(where, sku, rid, quantity)
        return None if refused is None else reject(*refused)

    async def _key_used(self, slot: str, user_id: str, idem: str, wait: bool = False) -> bool:
        """Whether the Idempotency-Key made a reservation in ``slot``. ``wait``: a request with the
        same key may be between its charge and its hold (it took the budget this one was refused):
        give it a moment (KEY_WAIT_S) to make the hold, so that this one replays it."""
        key = self.keys.idempotency(slot, user_id, idem)
        deadline = asyncio.get_running_loop().time() + (KEY_WAIT_S if wait else 0)
        while not await self.redis.exists(key):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _hold_in_shard(
        self,
        sale_id: str,
        slots: list[str],
        slot: str,
        user_id: str,
        sku: str,
        quantity: int,
        idem: str,
        client: tuple[str, str],
        rid: str,
        charged: bool,
    ) -> tuple[Reservation, bool] | ApiError:
        ticket = self.verdicts.ticket(sale_id)
        for attempt in range(MOVE_TRIES):
            outcome = await self._reserve_in(sale_id, slot, user_id, sku, quantity, idem, "shard", client, rid, charged)
            if not isinstance(outcome, ApiError) or outcome.code != "sold_out":
                return outcome
            left = await self.mover.gather(sale_id, sku, slots, slot, quantity)
            if left < quantity:  # read once more: a cancel in one shard and a hold in another can cross the reads
                left = await self.mover.gather(sale_id, sku, slots, slot, quantity)
            if left < quantity:
                self.tally.refused(sale_id, sku, "sold_out")
                self.verdicts.remember(sale_id, sku, "sold_out", max(left, 0), ticket)
                return reject("sold_out", max(left, 0))
            await asyncio.sleep(0.005 * attempt)  # units on their way here from another request's move
        self.tally.refused(sale_id, sku, "unavailable")
        return ApiError("unavailable", "the item's stock is moving between its shards: try again", retry_after=1)

    async def _claim(
        self, sale_id: str, slot: str, user_id: str, sku: str, quantity: int, idem: str
    ) -> bool | ApiError:
        """An Idempotency-Key of a sharded item, claimed in the sale's own slot, where every other
        item's keys are too (SET NX GET): a key is then one request's in the whole sale, whichever
        slot its reservation is in. True if this call claimed it, False if it was this request's
        before (a retry: the shard's script replays it), the conflict otherwise."""
        key = self.keys.idempotency(sale_id, user_id, idem)
        prior = await self.redis.set(key, f"~{slot}|{fingerprint(sku, quantity)}", nx=True, get=True)
        if prior is None:
            return True
        if str(prior).partition("|")[2] != fingerprint(sku, quantity):
            return reject("idempotency_conflict", 0)
        return False

    async def _used(self, sale_id: str, sku: str, user_id: str, idempotency_key: str) -> bool:
        """Whether the key made a reservation already: then only the script can answer (a replay)."""
        slot = shards.home(await self.routes.item(sale_id, sku), user_id)
        return bool(await self.scripts.calls.call("EXISTS", self.keys.idempotency(slot, user_id, idempotency_key)))

    async def of_user(self, sale_id: str, user_id: str, limit: int) -> list[Reservation]:
        """The user's reservations in the sale, newest first, at most ``limit`` (from every slot
        of the sale: a sharded item's are in the user's shard)."""
        slots = await self.routes.slots(sale_id)
        pipe = self.redis.pipeline(transaction=False)
        for slot in slots:
            pipe.zrevrange(self.keys.user_reservations(slot, user_id), 0, limit - 1, withscores=True)
        newest = heapq.nlargest(limit, (e for found in await pipe.execute() for e in found), key=lambda e: e[1])
        pipe = self.redis.pipeline(transaction=False)
        for rid, _ in newest:
            pipe.hmget(self.keys.reservation(slot_of(rid)[0], rid), FIELDS)
        now = now_ms()
        return [to_reservation(sale_id, values, now) for values in await pipe.execute() if values[0] is not None]

    async def get(self, rid: str, user_id: str) -> Reservation:
        slot, sale_id = slot_of(rid)
        values = cast(list[str | None], await self.redis.hmget(self.keys.reservation(slot, rid), FIELDS))
        if values[0] is None or values[2] != user_id:
            raise ApiError("not_found", "no such reservation")
        return to_reservation(sale_id, values, now_ms())

    async def extend(self, rid: str, user_id: str, seconds: int) -> Reservation:
        """A live hold's expiry moved ``seconds`` later, within the sale's limits (lua/extend.lua)."""
        slot, sale_id = slot_of(rid)
        k = self.keys
        sku = cast(str | None, await self.redis.hget(k.reservation(slot, rid), "sku"))
        if sku is None:
            raise ApiError("not_found", "no such reservation")
        most, most_s = await self.routes.extensions(sale_id)
        result = await self.scripts.extend(
            keys=[k.reservation(slot, rid), k.holds(slot, sku), k.events(slot)],
            args=[rid, user_id, seconds, most, most_s],
        )
        if result[0] == "err":
            if result[1] == "not_found":
                raise ApiError("not_found", "no such reservation")
            raise ApiError(result[1])
        return await self.get(rid, user_id)

    async def settle(
        self, rid: str, user_id: str, action: Literal["confirm", "cancel"], payment_ref: str = ""
    ) -> Reservation:
        slot, sale_id = slot_of(rid)
        k = self.keys
        sku = cast(str | None, await self.redis.hget(k.reservation(slot, rid), "sku"))
        if sku is None:
            raise ApiError("not_found", "no such reservation")
        result = await settle(self.scripts, k, slot, sku, action, [rid], user_id, payment_ref)
        if any(await self.routes.counted(sale_id, sku)):  # a hold released here gives its client budget back
            await self.budgets.refund(slot, {sku: await self.routes.item(sale_id, sku)}, [rid])
        if result[1] == "not_found":
            raise ApiError("not_found", "no such reservation")
        if result[0] == "err":
            raise ApiError(result[1])
        return to_reservation(sale_id, result[2:])

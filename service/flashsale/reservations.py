"""Reserve, read, confirm and cancel: each one call to a Lua script that decides atomically.

A reserve that the script refused moments ago for a reason that still holds (sold out, not
started, paused, ended) is refused again from memory (``verdicts.py``), counted in the same
progress counters (``tally.py``): a crowd's sold-out answers then cost no Redis call at all.
A request with an Idempotency-Key first asks Redis whether the key was used (one EXISTS, in the
tick's pipeline): a retry of a reservation that succeeded must get that reservation back.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from . import metrics
from .connection import Client
from .errors import ApiError
from .keys import Keys
from .sales import instant, now_ms
from .schemas import Reservation
from .scripts import Scripts
from .settings import Settings
from .tally import Tally
from .verdicts import Verdicts

RID = re.compile(r"^([A-Za-z0-9_-]{1,64})\.[A-Za-z0-9_-]{22}(?!\n)$")
FIELDS = ("rid", "sku", "user", "qty", "status", "created_ms", "expires_ms", "final_ms", "payment_ref")


def new_rid(sale_id: str) -> str:
    """The sale id (so the id finds its keys) and 128 random bits (so nobody can guess one)."""
    return f"{sale_id}.{secrets.token_urlsafe(16)}"


def fingerprint(sku: str, quantity: int) -> str:
    """What an Idempotency-Key remembers of its request besides the reservation: the same key
    with another sku or quantity is an idempotency_conflict."""
    return f"{sku}:{quantity}"


def sale_of(rid: str) -> str:
    match = RID.match(rid)
    if match is None:
        raise ApiError("not_found", "no such reservation")
    return match.group(1)


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
    sale_id: str,
    sku: str,
    action: Literal["confirm", "cancel", "expire"],
    rids: Sequence[str],
    user_id: str = "",
    payment_ref: str = "",
) -> Any:
    """lua/settle.lua on reservations of one sku, its KEYS/ARGV laid out in this one place."""
    return await scripts.settle(
        keys=[
            keys.item(sale_id, sku),
            keys.users(sale_id, sku),
            keys.holds(sale_id, sku),
            keys.events(sale_id),
            *(keys.reservation(sale_id, r) for r in rids),
        ],
        args=[action, user_id, payment_ref, keys.changes, sale_id, *rids],
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

    async def reserve(
        self, sale_id: str, user_id: str, sku: str, quantity: int, idempotency_key: str | None
    ) -> tuple[Reservation, bool] | ApiError:
        """The reservation and whether this call created it (False: a replay), or the refusal."""
        k = self.keys
        idem = idempotency_key or ""
        verdict = self.verdicts.recall(sale_id, sku, quantity)
        if verdict is not None and idem:
            # A key that made a reservation gets it back (a replay): only the script can say. Recalled
            # again after that round trip, which a busy Redis can make long.
            used = await self._used(sale_id, user_id, idem)
            verdict = None if used else self.verdicts.recall(sale_id, sku, quantity)
        if verdict is not None:
            self.tally.refused(sale_id, sku, verdict.code)
            metrics.from_memory(verdict.code)
            return reject(verdict.code, verdict.number)
        rid = new_rid(sale_id)
        ticket = self.verdicts.ticket(sale_id)
        result = await self.scripts.reserve(
            keys=[
                k.sale(sale_id),
                k.item(sale_id, sku),
                k.users(sale_id, sku),
                k.holds(sale_id, sku),
                k.reservation(sale_id, rid),
                k.events(sale_id),
                k.idempotency(sale_id, user_id, idem),
                k.rate(sale_id, user_id),
                k.user_reservations(sale_id, user_id),
            ],
            args=[rid, user_id, sku, quantity, fingerprint(sku, quantity), idem, self.settings.user_rate_per_s],
        )
        if result[0] == "ok":
            _, created, expires = result
            values = [rid, sku, user_id, str(quantity), "held", created, expires, None, None]
            return to_reservation(sale_id, values), True
        if result[0] == "replay":
            return await self.get(result[1], user_id), False
        code, number = result[1], int(result[2])
        self.verdicts.remember(sale_id, sku, code, number, ticket)
        return reject(code, number)

    async def _used(self, sale_id: str, user_id: str, idempotency_key: str) -> bool:
        """Whether the key made a reservation already: then only the script can answer (a replay)."""
        return bool(await self.scripts.calls.call("EXISTS", self.keys.idempotency(sale_id, user_id, idempotency_key)))

    async def of_user(self, sale_id: str, user_id: str, limit: int) -> list[Reservation]:
        """The user's reservations in the sale, newest first, at most ``limit``."""
        rids = cast(list[str], await self.redis.zrevrange(self.keys.user_reservations(sale_id, user_id), 0, limit - 1))
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hmget(self.keys.reservation(sale_id, rid), FIELDS)
        now = now_ms()
        return [to_reservation(sale_id, values, now) for values in await pipe.execute() if values[0] is not None]

    async def get(self, rid: str, user_id: str) -> Reservation:
        sale_id = sale_of(rid)
        values = cast(list[str | None], await self.redis.hmget(self.keys.reservation(sale_id, rid), FIELDS))
        if values[0] is None or values[2] != user_id:
            raise ApiError("not_found", "no such reservation")
        return to_reservation(sale_id, values, now_ms())

    async def settle(
        self, rid: str, user_id: str, action: Literal["confirm", "cancel"], payment_ref: str = ""
    ) -> Reservation:
        sale_id = sale_of(rid)
        k = self.keys
        sku = cast(str | None, await self.redis.hget(k.reservation(sale_id, rid), "sku"))
        if sku is None:
            raise ApiError("not_found", "no such reservation")
        result = await settle(self.scripts, k, sale_id, sku, action, [rid], user_id, payment_ref)
        if result[1] == "not_found":
            raise ApiError("not_found", "no such reservation")
        if result[0] == "err":
            raise ApiError(result[1])
        return to_reservation(sale_id, result[2:])

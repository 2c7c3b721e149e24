"""Carts (contract, "Storefront integration"): several lines held together, or none of them.

One sale is one slot, so one script (lua/cart.lua) checks every line and then writes them all, or
refuses with the first line that failed and writes nothing. Each line is an ordinary reservation
(confirm, cancel, extend and expiry work on it alone, and Postgres gets it as any other), and
lua/cart_settle.lua confirms or cancels a whole cart in one step, so a cart is never half paid.

A line of a sharded item (``shards`` above 1) is refused with 422: its users' units live in the
user's shard (shards.py), a slot other than the cart's, and one script cannot hold in two slots.
So a partial hold can never be left behind; a sharded item is reserved on its own.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Literal, cast

from .connection import Client
from .errors import ApiError
from .keys import Keys
from .reservations import FIELDS, fingerprint, new_rid, reject, to_reservation
from .sales import instant, now_ms
from .schemas import Cart, CartIn
from .scripts import Scripts
from .settings import Settings
from .shards import Routes
from .waiting import Tokens

CART_ID = re.compile(r"^([A-Za-z0-9_-]{1,64})\.c[A-Za-z0-9_-]{22}(?!\n)$")


def sale_of(cart_id: str) -> str:
    match = CART_ID.match(cart_id)
    if match is None:
        raise ApiError("not_found", "no such cart")
    return match.group(1)


def lines_fingerprint(ask: CartIn) -> str:
    """What an Idempotency-Key remembers of a cart's body: another body with it is a conflict, and
    so is a reservation's (the key is the sale's and user's, whichever endpoint used it first)."""
    return "cart:" + ",".join(fingerprint(line.sku, line.quantity) for line in ask.lines)


@dataclass(frozen=True)
class Carts:
    redis: Client
    keys: Keys
    scripts: Scripts
    settings: Settings
    routes: Routes
    tokens: Tokens

    async def create(
        self, sale_id: str, ask: CartIn, idem: str | None, token: str | None, client: tuple[str, str]
    ) -> tuple[Cart, bool]:
        """The cart and whether this call made it (False: a replay of the same Idempotency-Key)."""
        skus = [line.sku for line in ask.lines]
        if len(set(skus)) != len(skus):
            raise ApiError("invalid_request", "each sku once per cart: add up its quantity", fields=["lines"])
        if await self.routes.waiting_room(sale_id):
            self.tokens.check(sale_id, ask.user_id, token)
        for n, sku in enumerate(skus):
            if len(await self.routes.item(sale_id, sku)) > 1:
                raise ApiError(
                    "invalid_request",
                    f"{sku!r} is sharded: its holds live in the user's shard, not the cart's slot; reserve it alone",
                    fields=[f"lines[{n}].sku"],
                )
        k = self.keys
        cart_id = f"{sale_id}.c{secrets.token_urlsafe(16)}"
        rids = [new_rid(sale_id) for _ in skus]
        keys = [
            k.sale(sale_id),
            k.events(sale_id),
            k.cart(sale_id, cart_id),
            k.idempotency(sale_id, ask.user_id, idem or ""),
            k.rate(sale_id, ask.user_id),
            k.user_reservations(sale_id, ask.user_id),
            k.ip_rate(sale_id, client[0]),
        ]
        args: list[str | int] = [
            cart_id,
            ask.user_id,
            idem or "",
            lines_fingerprint(ask),
            self.settings.user_rate_per_s,
            *client,
        ]
        for line, rid in zip(ask.lines, rids, strict=True):
            keys += [
                k.item(sale_id, line.sku),
                k.users(sale_id, line.sku),
                k.holds(sale_id, line.sku),
                k.reservation(sale_id, rid),
                k.ips(sale_id, line.sku),
                k.devices(sale_id, line.sku),
            ]
            args += [line.sku, line.quantity, rid]
        result = await self.scripts.cart(keys=keys, args=args)
        if result[0] == "replay":
            return await self.get(result[1], ask.user_id), False
        if result[0] == "err":
            code, failed, number = result[1], int(result[2]), int(result[3])
            if code == "not_found" and failed == 0 and not await self.redis.exists(k.sale(sale_id)):
                self.routes.forget(sale_id)
                raise ApiError("not_found", f"no sale {sale_id!r}")
            refusal = reject(code, number)
            refusal.fields = [f"lines[{failed}]"]
            raise refusal
        created, expires = result[1], result[2]
        held = [
            to_reservation(
                sale_id, [rid, line.sku, ask.user_id, str(line.quantity), "held", created, expires, None, None]
            )
            for line, rid in zip(ask.lines, rids, strict=True)
        ]
        return Cart(cart_id, sale_id, ask.user_id, instant(expires), held), True

    async def get(self, cart_id: str, user_id: str) -> Cart:
        sale_id = sale_of(cart_id)
        k = self.keys
        cart = cast(dict[str, str], await self.redis.hgetall(k.cart(sale_id, cart_id)))
        if cart.get("user") != user_id:
            raise ApiError("not_found", "no such cart")
        pipe = self.redis.pipeline(transaction=False)
        for rid in cart["rids"].split(","):
            pipe.hmget(k.reservation(sale_id, rid), FIELDS)
        now = now_ms()
        lines = [to_reservation(sale_id, values, now) for values in await pipe.execute()]
        held = [line.expires_at for line in lines if line.status == "held"]
        return Cart(cart_id, sale_id, user_id, min(held) if held else instant(cart["expires_ms"]), lines)

    async def settle(
        self, cart_id: str, user_id: str, action: Literal["confirm", "cancel"], payment_ref: str = ""
    ) -> Cart:
        """Every line confirmed, or every held line released, in one step (lua/cart_settle.lua)."""
        sale_id = sale_of(cart_id)
        k = self.keys
        cart = cast(dict[str, str], await self.redis.hgetall(k.cart(sale_id, cart_id)))
        if cart.get("user") != user_id:
            raise ApiError("not_found", "no such cart")
        rids = cart["rids"].split(",")
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hget(k.reservation(sale_id, rid), "sku")
        skus = cast(list[str], await pipe.execute())
        keys = [k.cart(sale_id, cart_id), k.events(sale_id)]
        for rid, sku in zip(rids, skus, strict=True):
            keys += [
                k.reservation(sale_id, rid),
                k.item(sale_id, sku),
                k.users(sale_id, sku),
                k.holds(sale_id, sku),
                k.ips(sale_id, sku),
                k.devices(sale_id, sku),
            ]
        result = await self.scripts.cart_settle(
            keys=keys, args=[action, user_id, payment_ref, k.changes, sale_id, *rids]
        )
        if result[0] == "err":
            if result[1] == "not_found":
                raise ApiError("not_found", "no such cart")
            raise ApiError(result[1], fields=[f"lines[{int(result[2])}]"])
        return await self.get(cart_id, user_id)

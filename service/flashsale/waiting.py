"""A sale's waiting room (contract, "Crowd control"): join, poll, admission that follows the stock.

- **Places.** Joiners before ``starts_at`` get a random place (so at the start they are in random
  order, whoever came first); later ones a place after all of those, in the order they came.
- **Admission**, at most ``admit_per_s`` a second, by one process at a time (``tick``, under a
  short lock, as the sweeper): paused while every unit is held, resumed when units come back, and
  the queue closed for good (``sold_out``) once no unit is left or held, or when the sale ends.
  A ticket not polled for ``abandon_after_s`` expires, in the tick or at its next poll, and never
  holds the line up.
- **Tokens.** An admitted ticket's poll carries an Admission-Token: HMAC-SHA256 of sale, user and
  expiry with ``FLASHSALE_SECRET``, so reserve checks it in memory (``Tokens.check``), no round trip.
- Every change is one script in the sale's slot (lua/queue_*.lua).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import math
import random
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

from . import connection
from .connection import Client
from .errors import ApiError
from .keys import Keys
from .sales import Sales, instant, now_ms
from .schemas import QueueProgress, QueueStatus, Reason, Ticket
from .scripts import Scripts

log = logging.getLogger("flashsale.waiting")
TICK_MS = 250
CANDIDATES = 1000  # tickets looked at per tick and sale, at most (expiry and admission each)
TICKET = re.compile(r"^[A-Za-z0-9_-]{22}(?!\n)$")
STATS = ("admit_per_s", "joined", "admitted", "expired", "closed_told", "closed")


class Tokens:
    """Admission tokens: ``<expiry ms>.<signature>``, bound to one sale and one user."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(("flashsale admission\n" + secret).encode()).digest()

    def _sign(self, sale_id: str, user_id: str, expires_ms: int) -> str:
        mac = hmac.new(self._key, f"{sale_id}\n{user_id}\n{expires_ms}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def make(self, sale_id: str, user_id: str, expires_ms: int) -> str:
        return f"{expires_ms}.{self._sign(sale_id, user_id, expires_ms)}"

    def check(self, sale_id: str, user_id: str, token: str | None) -> None:
        """Raises 403 ``not_admitted`` unless ``token`` was made for this sale and user and is not
        past its time."""
        if not token:
            raise ApiError("not_admitted")
        expires, _, signature = token.partition(".")
        if not (expires.isdigit() and len(expires) <= 15):
            raise ApiError("not_admitted", "the Admission-Token is not one this service gave out")
        if not hmac.compare_digest(signature, self._sign(sale_id, user_id, int(expires))):
            raise ApiError("not_admitted", "the Admission-Token is not this user's for this sale")
        if int(expires) <= now_ms():
            raise ApiError("not_admitted", "the Admission-Token has run out: join the queue again")


@dataclass
class Standing:
    """Where a ticket stands, as lua/queue_poll.lua read it, with the room's numbers then."""

    user_id: str
    status: QueueStatus
    place: float
    position: int  # 1 = next in line, while waiting; 0 otherwise
    admitted_ms: int  # when admitted; 0 otherwise
    reason: str  # why closed; '' otherwise
    rate: int  # admit_per_s
    abandon_ms: int
    ttl_ms: int  # how long an admission token is good for
    starts_ms: int  # the sale's start
    admitted: int  # the room's admitted count then
    expired: int  # the room's expired count then
    joined: int  # the room's joined count then
    generation: int  # the sale's created_ms: a sale loaded again (flashsale recover) has a new one


@dataclass(frozen=True)
class Room:
    redis: Client
    keys: Keys
    scripts: Scripts
    tokens: Tokens

    async def join(self, sale_id: str, user_id: str) -> tuple[Ticket, bool]:
        """The user's ticket, and whether it is new (False: the one they had)."""
        k = self.keys
        for _ in range(5):
            held = cast(str | None, await self.redis.hget(k.queue_users(sale_id), user_id)) or ""
            ticket = secrets.token_urlsafe(16)
            result = await self.scripts.queue_join(
                keys=[
                    k.sale(sale_id),
                    k.queue_state(sale_id),
                    k.queue_users(sale_id),
                    k.queue(sale_id),
                    k.queue_polls(sale_id),
                    k.ticket(sale_id, ticket),
                    k.ticket(sale_id, held or "-"),
                ],
                args=[ticket, user_id, repr(random.random()), held],
            )
            if result[0] == "retry":
                continue
            if result[0] == "err":
                raise await self._no_room(sale_id)
            return await self.poll(sale_id, result[1], user_id), result[0] == "new"
        raise ApiError("unavailable", "the user's ticket kept changing: try again", retry_after=1)

    async def poll(self, sale_id: str, ticket: str, user_id: str) -> Ticket:
        """Where the ticket stands, read in one script call (polls.py answers most from memory)."""
        return self.answer(sale_id, ticket, await self.read(sale_id, ticket, user_id), now_ms())

    async def read(self, sale_id: str, ticket: str, user_id: str) -> Standing:
        """lua/queue_poll.lua: the ticket's standing, its place kept (or expired, or told closed)."""
        k = self.keys
        result = await self.scripts.queue_poll(
            keys=[
                k.ticket(sale_id, ticket),
                k.queue(sale_id),
                k.queue_polls(sale_id),
                k.queue_state(sale_id),
                k.sale(sale_id),
            ],
            args=[ticket, user_id],
        )
        if result[0] == "err":
            raise ApiError("not_found", "no such ticket for this user")
        status, position, admitted_ms, reason, room, place = cast(list[Any], result)
        rate, abandon, ttl, starts, _, admitted, expired, joined, generation = (int(v) for v in room)
        return Standing(
            user_id=user_id,
            status=status,
            place=float(place),
            position=int(position) + 1 if status == "waiting" else 0,
            admitted_ms=int(admitted_ms or 0),
            reason=reason,
            rate=rate,
            abandon_ms=abandon,
            ttl_ms=ttl,
            starts_ms=starts,
            admitted=admitted,
            expired=expired,
            joined=joined,
            generation=generation,
        )

    def answer(self, sale_id: str, ticket: str, s: Standing, now: int) -> Ticket:
        """The poll's answer for a ticket standing as ``s`` at ``now``."""
        abandon_s = s.abandon_ms // 1000
        out = Ticket(ticket=ticket, user_id=s.user_id, status=s.status, poll_after_s=_poll_after(abandon_s, None))
        if s.status == "waiting":
            out.position = s.position
            out.estimated_wait_s = math.ceil(s.position / s.rate) + max(0, math.ceil((s.starts_ms - now) / 1000))
            out.poll_after_s = _poll_after(abandon_s, out.estimated_wait_s)
        elif s.status == "admitted":
            expires = s.admitted_ms + s.ttl_ms
            out.admission_token = self.tokens.make(sale_id, s.user_id, expires)
            out.expires_at = instant(expires)
        elif s.status == "closed":
            out.reason = cast(Reason, s.reason) or None
        return out

    async def stats(self, sale_id: str) -> QueueProgress | None:
        return await stats(self.scripts, self.keys, sale_id)

    async def set_rate(self, sale_id: str, admit_per_s: int) -> QueueProgress:
        await self._control(sale_id, "rate", admit_per_s)
        return cast(QueueProgress, await self.stats(sale_id))

    async def close(self, sale_id: str) -> QueueProgress:
        await self._control(sale_id, "close", 0)
        return cast(QueueProgress, await self.stats(sale_id))

    async def _control(self, sale_id: str, action: str, n: int) -> None:
        k = self.keys
        result = await self.scripts.queue_control(
            keys=[k.sale(sale_id), k.queue_state(sale_id), k.events(sale_id), k.queue(sale_id), k.queue_polls(sale_id)],
            args=[sale_id, action, n],
        )
        if result[0] == "err":
            if result[1] == "invalid_state":
                raise ApiError("invalid_state", "the waiting room is closed, and closed is final")
            raise await self._no_room(sale_id)

    async def _no_room(self, sale_id: str) -> ApiError:
        """404 for no such sale; 409 for a sale that has no waiting room (the sale is there)."""
        if await self.redis.exists(self.keys.sale(sale_id)):
            return ApiError(
                "invalid_state", f"sale {sale_id!r} has no waiting room (it is set when the sale is created)"
            )
        return ApiError("not_found", f"no sale {sale_id!r}")

    async def tick(self, sales: Sales, sale_id: str) -> tuple[int, int, str]:
        """One admission tick of one sale: (admitted, expired, closed reason or '')."""
        k = self.keys
        state = cast(
            list[str | None],
            await self.redis.hmget(k.queue_state(sale_id), ["admit_per_s", "abandon_ms", "tick_ms", "carry", "closed"]),
        )
        if state[0] is None or state[4]:
            return 0, 0, state[4] or ""
        sale = await sales.view(sale_id)
        now = now_ms()
        if sale.status == "scheduled":
            return 0, 0, ""
        close = ""
        if sale.status == "ended":
            close = "sale_ended"
        elif all(i.available == 0 and i.held == 0 for i in sale.items):
            close = "sold_out"
        rate, abandon = int(state[0]), int(state[1] or 0)
        since = min(1000, now - int(state[2])) if state[2] else TICK_MS
        allowance = rate * since / 1000 + float(state[3] or 0)
        allowed = min(int(allowance), CANDIDATES)
        carry = min(allowance - allowed, 1.0)
        stale = cast(
            list[str],
            await self.redis.zrangebyscore(k.queue_polls(sale_id), "-inf", now - abandon, start=0, num=CANDIDATES),
        )
        head = cast(list[str], await self.redis.zrange(k.queue(sale_id), 0, allowed - 1)) if allowed else []
        paused = all(i.available == 0 for i in sale.items)
        admitted, expired, closed = await self.scripts.queue_tick(
            keys=[
                k.queue_state(sale_id),
                k.queue(sale_id),
                k.queue_polls(sale_id),
                *(k.ticket(sale_id, t) for t in [*stale, *head]),
            ],
            args=[allowed, repr(carry), close, "1" if paused else "0", len(stale), *stale, *head],
        )
        return int(admitted), int(expired), closed

    async def rooms(self, sale_ids: list[str]) -> list[str]:
        """The sales among ``sale_ids`` that have a waiting room."""
        pipe = self.redis.pipeline(transaction=False)
        for sale_id in sale_ids:
            pipe.exists(self.keys.queue_state(sale_id))
        return [s for s, there in zip(sale_ids, await pipe.execute(), strict=True) if there]


async def stats(scripts: Scripts, keys: Keys, sale_id: str) -> QueueProgress | None:
    """A room's counts now, or None for a sale without one (one atomic read: they agree)."""
    *values, waiting = await scripts.queue_stats(keys=[keys.queue_state(sale_id), keys.queue(sale_id)], args=STATS)
    if values[0] is None:
        return None
    n = dict(zip(STATS, values, strict=True))
    rate = int(n["admit_per_s"])
    return QueueProgress(
        admit_per_s=rate,
        waiting=int(waiting),
        joined=int(n["joined"] or 0),
        admitted=int(n["admitted"] or 0),
        expired=int(n["expired"] or 0),
        closed_told=int(n["closed_told"] or 0),
        estimated_wait_s=math.ceil(int(waiting) / rate),
        closed=n["closed"],
    )


def _poll_after(abandon_s: int, wait_s: int | None) -> int:
    """Soon enough to keep the place (a third of abandon_after_s at most), no sooner than the
    wait makes useful, and spread by a random part, so that a crowd's polls do not come in waves."""
    most = max(1, abandon_s // 3)
    base = most if wait_s is None else min(most, max(1, wait_s // 2))
    return max(1, min(most, round(base * random.uniform(0.7, 1.0))))


async def run(room: Room, sales: Sales, stop: asyncio.Event) -> None:
    """Ticks every waiting room of the active sales until ``stop`` is set, in one process at a
    time (a lock of one tick)."""
    k = room.keys
    while not stop.is_set():
        try:
            if await room.redis.set(k.queue_lock, "1", nx=True, px=TICK_MS):
                started = time.monotonic()
                active = cast(list[str], await room.redis.zrange(k.active, 0, -1))
                for sale_id in await room.rooms(active):
                    admitted, expired, closed = await room.tick(sales, sale_id)
                    if admitted or expired or closed:
                        log.debug("queue tick", extra={"sale_id": sale_id, "admitted": admitted, "expired": expired})
                if time.monotonic() - started > TICK_MS / 1000:
                    log.warning("a waiting-room tick took longer than the tick")
        except connection.ERRORS as exc:
            log.warning("waiting-room tick failed, retrying next tick: %s", exc)
        except ApiError as exc:  # a sale gone between the listing and its read
            log.warning("waiting-room tick skipped a sale: %s", exc)
        except Exception:  # a bug: logged, and the next tick tries again (a dead loop admits nobody)
            log.exception("waiting-room tick failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TICK_MS / 1000)

"""Waiting-room polls answered from memory: the crowd's most frequent call while it waits.

A poll keeps its ticket's place (the admission tick expires a ticket whose last poll is older
than ``abandon_after_s``) and says where the ticket stands. Neither needs a Redis call per poll:

- **Where it stands.** Admission goes in place order, and the tick records the highest place it
  has admitted (queue state ``admitted_place``), so a ticket placed above it is still in line,
  unless it expired or the queue closed. Each process reads a room's state (that place, the rate,
  the counts, ``closed``) at most every ``SNAPSHOT_MS``, for all its tickets at once. A ticket's
  own place, rank and the room's counts come from its first poll in this process, one script
  call (``Room.read``); its position then counts down by the admissions since.
- **Keeping the place.** The polls answered from memory are written back every ``FLUSH_MS``, one
  ``ZADD XX GT`` per room (XX: a ticket that left the line is not put back in it).

A poll goes to Redis instead when memory cannot be sure: a ticket this process does not know or
has not seen polled within ``abandon_after_s`` less ``MARGIN_MS`` (it may have expired since,
through no fault of a write-back that takes at most ``FLUSH_MS``); one the admission has reached
(admitted or expired: Redis says which); a closed room (the script tells the ticket, and counts
it); a room made again since (flashsale recover loads a lost sale with an empty room); or once
enough tickets expired (or, before the start, joined) that the counted-down position could be
off by more than a tenth. A final status (admitted, expired, closed) is never taken back, so it
is kept. So memory says "waiting" only for a ticket that is, give or take one ``SNAPSHOT_MS``,
and a failed write-back forgets the room's tickets, whose next polls go to Redis. The polls it
writes back carry this host's clock, which the tick compares with Redis's: hosts must keep
their clocks within ``MARGIN_MS - FLUSH_MS`` of Redis's (NTP does far better).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import cast

from . import connection, metrics
from .connection import Client
from .errors import ApiError
from .keys import Keys
from .sales import now_ms
from .schemas import Ticket
from .waiting import Room, Standing

log = logging.getLogger("flashsale.polls")
SNAPSHOT_MS = 100  # a room's state read again after this long (admission and close show within it)
FLUSH_MS = 250  # polls answered from memory are written back this often
MARGIN_MS = 2000  # a ticket not seen polled here within abandon_after_s less this is asked of Redis
FORGET_MS = 60_000  # a ticket not polled here this long is dropped from memory


@dataclass
class Known:
    standing: Standing  # as last read from Redis
    seen_ms: int  # the last poll of it this process answered
    read_ms: int  # when it was read from Redis


@dataclass
class Snapshot:
    read_at: float  # time.monotonic()
    closed: bool
    admitted_place: float  # -1: nobody admitted yet
    admitted: int
    expired: int
    joined: int
    rate: int
    starts_ms: int
    generation: int  # the sale's created_ms: tickets read in another generation are asked of Redis


@dataclass
class Polls:
    room: Room
    redis: Client
    keys: Keys
    _known: dict[tuple[str, str], Known] = field(default_factory=dict)
    _rooms: dict[str, Snapshot] = field(default_factory=dict)
    _reading: dict[str, asyncio.Future[Snapshot | None]] = field(default_factory=dict)
    _seen: dict[str, dict[str, int]] = field(default_factory=dict)  # sale -> ticket -> ms, to write back

    async def poll(self, sale_id: str, ticket: str, user_id: str) -> Ticket:
        now = now_ms()
        known = self._known.get((sale_id, ticket))
        if known is not None and known.standing.user_id == user_id:
            s = known.standing
            if s.status != "waiting":
                known.seen_ms = now
                return self.room.answer(sale_id, ticket, s, now)
            if now - known.seen_ms < s.abandon_ms - MARGIN_MS:
                snap = await self._snapshot(sale_id)
                fresh = snap is not None and snap.generation == s.generation and not snap.closed
                if snap is not None and fresh and s.place > snap.admitted_place:
                    position = s.position - (snap.admitted - s.admitted)
                    # Tickets ahead may have left (expired), and before the start a joiner's
                    # random place may be ahead: a tenth off at most, or read again.
                    moved = snap.expired - s.expired + (snap.joined - s.joined if now < snap.starts_ms else 0)
                    if moved <= max(1, position // 10):
                        known.seen_ms = now
                        self._seen.setdefault(sale_id, {})[ticket] = now
                        metrics.polled("memory")
                        position = max(1, min(s.position, position))
                        here = dataclasses.replace(s, position=position, rate=snap.rate, starts_ms=snap.starts_ms)
                        return self.room.answer(sale_id, ticket, here, now)
        try:
            standing = await self.room.read(sale_id, ticket, user_id)
        except ApiError:
            self._known.pop((sale_id, ticket), None)  # gone (a sale loaded again has an empty room)
            raise
        metrics.polled("redis")
        self._known[(sale_id, ticket)] = Known(standing, now, now)
        return self.room.answer(sale_id, ticket, standing, now)

    async def _snapshot(self, sale_id: str) -> Snapshot | None:
        """The room's state, read at most every SNAPSHOT_MS however many polls ask (one read in
        flight per room); None for a sale without a waiting room."""
        snap = self._rooms.get(sale_id)
        if snap is not None and (time.monotonic() - snap.read_at) * 1000 < SNAPSHOT_MS:
            return snap
        reading = self._reading.get(sale_id)
        if reading is not None:
            return await asyncio.shield(reading)
        future: asyncio.Future[Snapshot | None] = asyncio.get_running_loop().create_future()
        self._reading[sale_id] = future
        try:
            started = time.monotonic()
            fields = ["closed", "admitted_place", "admitted", "expired", "joined", "admit_per_s"]
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(self.keys.queue_state(sale_id), fields)
            pipe.hmget(self.keys.sale(sale_id), ["starts_ms", "created_ms"])  # a window change; a reload
            values, (starts, made) = cast(tuple[list[str | None], list[str | None]], tuple(await pipe.execute()))
            closed, place, admitted, expired, joined, rate = values
            snap = None
            if rate is not None:
                counts = (int(admitted or 0), int(expired or 0), int(joined or 0))
                window = (int(starts or 0), int(made or 0))
                snap = Snapshot(started, closed is not None, float(place or -1), *counts, int(rate), *window)
                self._rooms[sale_id] = snap
            future.set_result(snap)
            return snap
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters get it, and no "never retrieved" warning
            raise
        finally:
            del self._reading[sale_id]

    async def write_back(self) -> int:
        """Writes the polls answered from memory since the last call into each room's polls
        index; how many. A room whose write fails has its tickets forgotten (their next polls go
        to Redis, which then knows best)."""
        seen, self._seen = self._seen, {}
        if not seen:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for sale_id, polled in seen.items():
            pipe.zadd(self.keys.queue_polls(sale_id), polled, xx=True, gt=True)
        try:
            await pipe.execute()
        except connection.ERRORS:
            for sale_id, polled in seen.items():
                for ticket in polled:
                    self._known.pop((sale_id, ticket), None)
            raise
        return sum(len(p) for p in seen.values())

    def forget_idle(self, now: int) -> None:
        """Drops the tickets not polled here for FORGET_MS (memory stays bounded by the live crowd)."""
        for key in [key for key, known in self._known.items() if now - known.seen_ms > FORGET_MS]:
            del self._known[key]


async def run(polls: Polls, stop: asyncio.Event) -> None:
    """Writes polls back every FLUSH_MS until ``stop`` is set, then once more."""
    last_forget = now_ms()
    while True:
        stopping = stop.is_set()
        try:
            await polls.write_back()
        except connection.ERRORS as exc:
            log.warning("writing polls back failed; their tickets are asked of Redis again: %s", exc)
        if now_ms() - last_forget > FORGET_MS:
            last_forget = now_ms()
            polls.forget_idle(last_forget)
        if stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), FLUSH_MS / 1000)

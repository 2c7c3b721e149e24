"""The sales' event streams, as their consumer groups read them (the persister's and the
webhooks'), and how far a group is behind on a sale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import RedisCluster

from .connection import Client
from .keys import GROUP, Keys
from .sales import now_ms

Entry = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class Streams:
    """Every active sale's streams (its own and its extra slots', shards.py), as read at one time."""

    sale_of: dict[str, str]  # stream key -> sale id, for the streams that are there
    until: dict[str, float]  # sale id -> its score in the active set
    extra: dict[str, list[str]]  # sale id -> its extra slots


async def active_streams(redis: Client, keys: Keys) -> Streams:
    active = cast(list[tuple[str, float]], await redis.zrange(keys.active, 0, -1, withscores=True))
    pipe = redis.pipeline(transaction=False)
    for s, _ in active:
        pipe.hget(keys.sale(s), "slots")
    replies = await pipe.execute()
    extra = {s: [x for x in (slots or "").split(",") if x] for (s, _), slots in zip(active, replies, strict=True)}
    # Only streams that are there: one a lost slot took with it would fail every read (NOGROUP).
    every = [(keys.events(slot), s) for s, _ in active for slot in (s, *extra[s])]
    pipe = redis.pipeline(transaction=False)
    for stream, _ in every:
        pipe.exists(stream)
    there = {stream: s for (stream, s), e in zip(every, await pipe.execute(), strict=True) if e}
    return Streams(sale_of=there, until=dict(active), extra=extra)


async def read_new(
    redis: Client, group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int
) -> list[tuple[str, list[Entry]]]:
    """New entries of the streams for ``group``, waiting up to ``block_ms`` for some. On one Redis,
    one blocking XREADGROUP over all of them. On a cluster, where a command's keys must share a
    slot and every sale has its own, one XREADGROUP per stream, without blocking, in one pipeline
    per master; then the wait, if none had anything."""
    if not isinstance(redis, RedisCluster):
        wanted: dict[Any, Any] = dict.fromkeys(streams, ">")
        got = await redis.xreadgroup(group, consumer, wanted, count=count, block=block_ms)
        return cast(list[tuple[str, list[Entry]]], got or [])
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)
    replies = [r for reply in await pipe.execute() for r in reply or []]
    if not replies:
        await asyncio.sleep(block_ms / 1000)
    return cast(list[tuple[str, list[Entry]]], replies)


async def claim_idle(
    redis: Client, stream: str, group: str, consumer: str, idle_ms: int, count: int
) -> AsyncIterator[tuple[list[Entry], list[str]]]:
    """Batches of (entries, ids of entries gone from the stream) another consumer of ``group``
    (likely dead) left pending longer than ``idle_ms``, now this consumer's (XAUTOCLAIM)."""
    start = "0-0"
    while True:
        start, entries, deleted = cast(
            tuple[str, list[Entry], list[str]],
            await redis.xautoclaim(stream, group, consumer, idle_ms, start, count=count),
        )
        yield entries, deleted
        if start == "0-0":
            return


@dataclass(frozen=True)
class Backlog:
    events: int  # delivered-but-unacknowledged plus not yet delivered
    oldest_age_s: float  # age of the oldest event not yet in Postgres; 0 when none
    dead_lettered: int


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


async def backlog(redis: Client, keys: Keys, sale_id: str, extra: Sequence[str] = (), group: str = GROUP) -> Backlog:
    """The sale's backlog for ``group`` (the persister's unless named) over its own stream and
    those of its ``extra`` slots (shards.py)."""
    return (await backlogs(redis, keys, sale_id, extra, (group,)))[0]


async def backlogs(
    redis: Client, keys: Keys, sale_id: str, extra: Sequence[str], groups: Sequence[str]
) -> list[Backlog]:
    """The sale's backlog for each of ``groups``, in their order, from one read of each stream's
    groups and one of its dead letters."""
    events, oldest = [0] * len(groups), [list[int]() for _ in groups]
    for slot in (sale_id, *extra):
        for i, (n, first) in enumerate(await _stream(redis, keys.events(slot), groups)):
            events[i] += n
            oldest[i] += first
    dead = int(await redis.xlen(keys.dead(sale_id)))
    now = now_ms()
    return [
        Backlog(events=n, oldest_age_s=max(0.0, (now - min(o)) / 1000) if o else 0.0, dead_lettered=dead)
        for n, o in zip(events, oldest, strict=True)
    ]


async def _stream(redis: Client, stream: str, groups: Sequence[str]) -> list[tuple[int, list[int]]]:
    """Per group, the events of one stream it is not done with, and the time of the oldest (none:
    []). A stream that is not there (an extra slot its master lost) has none."""
    # No MULTI (redis-py's cluster MULTI runs each queued command on an event loop of its own,
    # which breaks the client after a failover), and none needed: the groups are read before the
    # pending lists, so an entry delivered in between is counted twice, never none.
    pipe = redis.pipeline(transaction=False)
    pipe.exists(stream)
    pipe.xinfo_groups(stream)
    for group in groups:
        pipe.xpending(stream, group)
    there, info, *pendings = await pipe.execute(raise_on_error=False)  # one round trip, gone or not
    if not there:
        return [(0, []) for _ in groups]
    if isinstance(info, Exception):
        raise info
    return [await _group(redis, stream, info, group, pending) for group, pending in zip(groups, pendings, strict=True)]


async def _group(redis: Client, stream: str, info: list[Any], group: str, pending: Any) -> tuple[int, list[int]]:
    found = next((g for g in info if g["name"] == group), None)
    if found is None:  # a stream older than the group (the webhooks'): it has taken nothing yet
        first = cast(list[tuple[str, object]], await redis.xrange(stream, "-", "+", count=1))
        return int(await redis.xlen(stream)), [_id_ms(first[0][0])] if first else []
    if isinstance(pending, Exception):
        raise pending
    lag = found.get("lag")
    if lag is None:  # Redis could not tell: count what lies after the last delivered entry
        lag = len(cast(list[object], await redis.xrange(stream, f"({found['last-delivered-id']}", "+")))
    oldest: list[int] = []
    if pending and pending.get("pending"):
        oldest.append(_id_ms(pending["min"]))
    if lag:
        after = f"({found['last-delivered-id']}"
        first = cast(list[tuple[str, object]], await redis.xrange(stream, after, "+", count=1))
        if first:
            oldest.append(_id_ms(first[0][0]))
    return int(pending["pending"] if pending else 0) + int(lag), oldest

"""How far the persister is behind on a sale's event stream."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from .connection import Client
from .keys import GROUP, Keys
from .sales import now_ms


@dataclass(frozen=True)
class Backlog:
    events: int  # delivered-but-unacknowledged plus not yet delivered
    oldest_age_s: float  # age of the oldest event not yet in Postgres; 0 when none
    dead_lettered: int


def _id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


async def backlog(redis: Client, keys: Keys, sale_id: str, extra: Sequence[str] = ()) -> Backlog:
    """The sale's backlog over its own stream and those of its ``extra`` slots (shards.py)."""
    events, oldest = 0, []
    for slot in (sale_id, *extra):
        n, first = await _stream(redis, keys.events(slot))
        events += n
        oldest += first
    dead = int(await redis.xlen(keys.dead(sale_id)))
    age = max(0.0, (now_ms() - min(oldest)) / 1000) if oldest else 0.0
    return Backlog(events=events, oldest_age_s=age, dead_lettered=dead)


async def _stream(redis: Client, stream: str) -> tuple[int, list[int]]:
    """Events of one stream not yet in Postgres, and the time of the oldest (none: []). A stream
    that is not there (an extra slot its master lost) has none."""
    # No MULTI (redis-py's cluster MULTI runs each queued command on an event loop of its own,
    # which breaks the client after a failover), and none needed: the group is read before the
    # pending list, so an entry delivered in between is counted twice, never none.
    pipe = redis.pipeline(transaction=False)
    pipe.exists(stream)
    pipe.xinfo_groups(stream)
    pipe.xpending(stream, GROUP)
    there, groups, pending = await pipe.execute(raise_on_error=False)  # one round trip, gone or not
    if not there:
        return 0, []
    if isinstance(groups, Exception) or isinstance(pending, Exception):
        raise groups if isinstance(groups, Exception) else cast(Exception, pending)
    group = next(g for g in groups if g["name"] == GROUP)
    lag = group.get("lag")
    if lag is None:  # Redis could not tell: count what lies after the last delivered entry
        lag = len(cast(list[object], await redis.xrange(stream, f"({group['last-delivered-id']}", "+")))
    oldest: list[int] = []
    if pending and pending.get("pending"):
        oldest.append(_id_ms(pending["min"]))
    if lag:
        after = f"({group['last-delivered-id']}"
        first = cast(list[tuple[str, object]], await redis.xrange(stream, after, "+", count=1))
        if first:
            oldest.append(_id_ms(first[0][0]))
    return int(pending["pending"] if pending else 0) + int(lag), oldest

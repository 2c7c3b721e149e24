"""Listens on the changes channel and makes ``Verdicts`` forget what a change made stale.

Its own connection (pub/sub holds one). While it is down, or not yet subscribed, the process
answers nothing from memory; a health-check PING every few seconds finds a connection that
died without a word. Stopped by an event, like the sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .verdicts import Verdicts

log = logging.getLogger("flashsale.invalidation")

HEALTH_CHECK_S = 2
MAX_BACKOFF_S = 1.0


async def listen(redis: Redis, channel: str, verdicts: Verdicts, stop: asyncio.Event) -> None:
    backoff = 0.05
    while not stop.is_set():
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)
            while not stop.is_set():
                message = await pubsub.get_message(timeout=HEALTH_CHECK_S)
                if message is None:
                    await pubsub.ping()  # a dead peer shows up as an error here, not as silence
                elif message["type"] == "subscribe":
                    verdicts.channel(up=True)
                    backoff = 0.05
                elif message["type"] == "message":
                    verdicts.forget(message["data"])
        except (RedisError, OSError) as exc:
            if verdicts.trusted:
                log.warning("changes channel lost, answering nothing from memory until it is back: %r", exc)
        finally:
            verdicts.channel(up=False)
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)

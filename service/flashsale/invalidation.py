"""Listens on the changes channel and makes ``Verdicts`` forget what a change made stale.

Its own connection (pub/sub holds one). While it is down, or not yet subscribed, the process
answers nothing from memory. A quiet channel is PINGed every HEALTH_CHECK_S, and a PONG that
does not come back within PONG_TIMEOUT_S counts as a lost connection: a peer gone without a word
(a failover, a firewall dropping the flow) is found within about two seconds, not when TCP gives
up. Until then the verdicts' own time limit (FLASHSALE_VERDICT_TTL_MS) bounds a stale answer.
Stopped by an event, like the sweeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import RedisCluster

from . import connection
from .connection import Client
from .verdicts import Verdicts

log = logging.getLogger("flashsale.invalidation")

HEALTH_CHECK_S = 1.0
PONG_TIMEOUT_S = 1.0
MAX_BACKOFF_S = 1.0


class Silent(ConnectionError):
    """The channel's connection stopped answering PING."""


async def listen(redis: Client, channel: str, verdicts: Verdicts, stop: asyncio.Event) -> None:
    """Until ``stop`` is set, and not a moment longer: a read waits up to a second for a message,
    so the listening is cancelled when ``stop`` comes (a process stopping, a test's app)."""
    listening = asyncio.create_task(_listen(redis, channel, verdicts, stop), name="invalidation-listen")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if listening.done():  # it never ends by itself: a bug; its error goes to the app's log
            verdicts.channel(up=False)
            listening.result()
    finally:
        for task in (listening, stopping):
            task.cancel()
        await asyncio.gather(listening, stopping, return_exceptions=True)


async def _listen(redis: Client, channel: str, verdicts: Verdicts, stop: asyncio.Event) -> None:
    backoff = 0.05
    while not stop.is_set():
        pubsub = redis.pubsub()
        pinged = 0.0  # when the unanswered PING went out; 0 for none
        try:
            await pubsub.subscribe(channel)
            while not stop.is_set():
                message = await pubsub.get_message(timeout=PONG_TIMEOUT_S if pinged else HEALTH_CHECK_S)
                now = time.monotonic()
                if pinged and now - pinged > PONG_TIMEOUT_S:
                    raise Silent(f"no PONG in {PONG_TIMEOUT_S:g} s")
                if message is None:
                    if not pinged:
                        await pubsub.ping()
                        pinged = now
                    continue
                pinged = 0.0  # the connection answered: the PONG (in whatever shape redis-py gives it) or more
                if message["type"] == "subscribe":
                    verdicts.channel(up=True)
                    backoff = 0.05
                elif message["type"] == "message":
                    verdicts.forget(message["data"])
        except connection.ERRORS as exc:
            if verdicts.trusted:
                log.warning("changes channel lost, answering nothing from memory until it is back: %r", exc)
        finally:
            verdicts.channel(up=False)
            with contextlib.suppress(*connection.ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if isinstance(redis, RedisCluster) and not stop.is_set():
                # This client carries nothing but the subscription, so nothing else would tell it
                # that its node failed over: read the slot map again before subscribing again.
                with contextlib.suppress(*connection.ERRORS):
                    await redis.aclose()
                    await redis.initialize()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)

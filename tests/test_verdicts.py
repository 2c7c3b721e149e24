"""What a process may remember of the reserve script's refusals, and when it must forget: the
rules of verdicts.py, and the changes channel (invalidation.py) against a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from flashsale.invalidation import HEALTH_CHECK_S, PONG_TIMEOUT_S, listen
from flashsale.settings import Settings
from flashsale.verdicts import Verdicts


def trusted(ttl_s: float = 60.0) -> Verdicts:
    v = Verdicts(ttl_s)
    v.channel(up=True)
    return v


def test_a_sold_out_reply_is_repeated_for_as_many_units_or_more_and_not_for_fewer() -> None:
    v = trusted()
    v.remember("s", "a", "sold_out", 2, v.ticket("s"))
    assert v.recall("s", "a", 3) is not None
    assert v.recall("s", "a", 2) is None  # two were left: only the script can say
    assert v.recall("s", "b", 3) is None


def test_only_refusals_that_hold_for_everyone_are_remembered() -> None:
    v = trusted()
    for code in ("limit_exceeded", "rate_limited", "not_found", "idempotency_conflict", "unavailable"):
        v.remember("s", "a", code, 0, v.ticket("s"))
        assert v.recall("s", "a", 1) is None, code


def test_a_reply_whose_call_raced_a_change_is_not_remembered() -> None:
    v = trusted()
    ticket = v.ticket("s")  # the call is sent...
    v.forget("s")  # ...a change is heard before its reply comes back
    v.remember("s", "a", "sold_out", 0, ticket)
    assert v.recall("s", "a", 1) is None
    v.remember("s", "a", "sold_out", 0, v.ticket("s"))  # a call sent after the change is fine
    assert v.recall("s", "a", 1) is not None


def test_a_change_forgets_that_sale_only() -> None:
    v = trusted()
    for sale in ("s", "t"):
        v.remember(sale, "a", "sale_paused", 0, v.ticket(sale))
    v.forget("s")
    assert v.recall("s", "a", 1) is None and v.recall("t", "a", 1) is not None


def test_nothing_is_remembered_while_the_channel_is_down() -> None:
    v = Verdicts(60.0)
    v.remember("s", "a", "sold_out", 0, v.ticket("s"))
    assert v.recall("s", "a", 1) is None


def test_a_verdict_dies_after_its_ttl_whatever_the_channel_says() -> None:
    v = trusted(ttl_s=0.05)
    v.remember("s", "a", "sold_out", 0, v.ticket("s"))
    assert v.recall("s", "a", 1) is not None
    time.sleep(0.06)
    assert v.recall("s", "a", 1) is None


def test_not_started_is_remembered_no_later_than_the_start() -> None:
    v = trusted()
    v.remember("s", "a", "sale_not_started", int(time.time() * 1000) + 50, v.ticket("s"))
    assert v.recall("s", "a", 1) is not None
    time.sleep(0.06)
    assert v.recall("s", "a", 1) is None  # the window opened by itself: no message says so


def test_a_ttl_of_zero_turns_memory_off() -> None:
    v = trusted(ttl_s=0)
    v.remember("s", "a", "sold_out", 0, v.ticket("s"))
    assert v.recall("s", "a", 1) is None


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.fixture
async def listening(settings: Settings) -> AsyncIterator[tuple[Verdicts, str, str]]:
    """invalidation.listen in this process, on a connection of its own, named for CLIENT KILL."""
    name, channel = f"verdicts-test-{settings.key_prefix}", f"{settings.key_prefix}:changes"
    listener = Redis.from_url(settings.redis_url, decode_responses=True, client_name=name)
    verdicts, stop = Verdicts(60.0), asyncio.Event()
    task = asyncio.create_task(listen(listener, channel, verdicts, stop))
    await until(lambda: verdicts.trusted)
    yield verdicts, channel, name
    stop.set()
    await task
    await listener.aclose()


async def test_a_message_on_the_changes_channel_forgets_the_sale(
    listening: tuple[Verdicts, str, str], redis: Redis
) -> None:
    verdicts, channel, _ = listening
    verdicts.remember("s", "a", "sold_out", 0, verdicts.ticket("s"))
    await redis.publish(channel, "s")
    await until(lambda: verdicts.recall("s", "a", 1) is None, timeout=1.0)


async def test_a_killed_channel_connection_drops_every_verdict_and_the_replies_in_flight(
    listening: tuple[Verdicts, str, str], redis: Redis
) -> None:
    verdicts, channel, name = listening
    verdicts.remember("s", "a", "sold_out", 0, verdicts.ticket("s"))
    in_flight = verdicts.ticket("t")  # a call sent before the loss, answered after it
    [victim] = [c["id"] for c in await redis.client_list() if c.get("name") == name]
    await redis.client_kill_filter(_id=victim)
    await until(lambda: verdicts.recall("s", "a", 1) is None)
    verdicts.remember("t", "a", "sold_out", 0, in_flight)
    assert verdicts.recall("t", "a", 1) is None
    # Back on the channel by itself: remembered again, and forgotten again on a message.
    await until(lambda: _remembers(verdicts))
    await redis.publish(channel, "s")
    await until(lambda: verdicts.recall("s", "a", 1) is None, timeout=1.0)


def _remembers(verdicts: Verdicts) -> bool:
    verdicts.remember("s", "a", "sold_out", 0, verdicts.ticket("s"))
    return verdicts.recall("s", "a", 1) is not None


async def test_a_quiet_channel_that_answers_its_pings_stays_trusted(listening: tuple[Verdicts, str, str]) -> None:
    verdicts, _, _ = listening
    verdicts.remember("s", "a", "sold_out", 0, verdicts.ticket("s"))
    await asyncio.sleep(HEALTH_CHECK_S + PONG_TIMEOUT_S + 1.0)  # past a ping and the wait for its pong
    assert verdicts.trusted and verdicts.recall("s", "a", 1) is not None


class Blackhole:
    """A loopback TCP proxy to Redis that can stop forwarding while keeping the connection open:
    a peer gone without a word, as a failover or a firewall dropping the flow leaves it."""

    def __init__(self, host: str, port: int) -> None:
        self.target, self.forwarding = (host, port), True
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.forwarding:
                    dst.write(data)
                    await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_channel_that_goes_silent_is_not_trusted_within_a_few_seconds(settings: Settings) -> None:
    target = Redis.from_url(settings.redis_url).connection_pool.connection_kwargs
    hole = Blackhole(target["host"], target["port"])
    port = await hole.start()
    listener = Redis(host="127.0.0.1", port=port, db=target.get("db", 0), decode_responses=True)
    verdicts, stop = Verdicts(60.0), asyncio.Event()
    task = asyncio.create_task(listen(listener, f"{settings.key_prefix}:changes", verdicts, stop))
    try:
        await until(lambda: verdicts.trusted)
        verdicts.remember("s", "a", "sold_out", 0, verdicts.ticket("s"))
        hole.forwarding = False  # nothing more goes through, and nothing says so
        lost = time.monotonic()
        await until(lambda: verdicts.recall("s", "a", 1) is None, timeout=HEALTH_CHECK_S + PONG_TIMEOUT_S + 2)
        assert time.monotonic() - lost <= HEALTH_CHECK_S + PONG_TIMEOUT_S + 1
    finally:
        stop.set()
        hole.forwarding = True
        await asyncio.wait_for(task, 10)
        await listener.aclose()
        await hole.close()

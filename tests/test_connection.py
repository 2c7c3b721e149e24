"""The service's Redis clients: commands packed by hiredis, byte for byte what redis-py packs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from flashsale import connection
from flashsale.connection import HiredisPacked
from flashsale.settings import Settings

COMMANDS = [
    ("EVALSHA", "a" * 40, 2, "k:{sale}:item", "k:{sale}:users", "sale.rid", "ütf-8 ✓", 1, 2.5, b"\x00raw"),
    ("CONFIG GET", "maxmemory"),  # a command name of two words is sent as two arguments
    ("SET", "k", memoryview(b"bytes")),
]


@pytest.mark.parametrize("command", COMMANDS, ids=["evalsha", "two-word-name", "memoryview"])
def test_commands_are_packed_to_the_bytes_redis_py_packs(command: tuple[Any, ...]) -> None:
    ours, theirs = HiredisPacked(), Connection()
    assert b"".join(ours.pack_command(*command)) == b"".join(bytes(c) for c in theirs.pack_command(*command))


@pytest.mark.parametrize("value", [None, True, object()])
def test_a_value_redis_cannot_hold_is_refused_as_redis_py_refuses_it(value: Any) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", value)
    with pytest.raises(DataError):
        HiredisPacked().pack_command("SET", "k", value)


def test_tcp_connections_are_packed_by_hiredis_and_unix_sockets_left_as_they_are() -> None:
    assert connection.client("redis://127.0.0.1:1/0").connection_pool.connection_class is HiredisPacked
    unix = connection.client("unix:///tmp/no-such.sock")
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection


async def test_a_client_round_trips_through_a_real_server(settings: Settings) -> None:
    client = connection.client(settings.redis_url, pool_size=2)
    key = f"{settings.key_prefix}:conn:ütf"
    try:
        assert await client.set(key, "välue ✓", ex=60)
        assert await client.get(key) == "välue ✓"
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_server_that_never_answers_is_taken_for_a_single_one_within_seconds() -> None:
    """So that the service starts (and answers 503) while its Redis hangs, as with one that is down."""
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)  # reads the command, never answers
        await done.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        assert await connection.is_cluster(f"redis://127.0.0.1:{port}/0") is False
        assert time.monotonic() - started < 5
    finally:
        done.set()
        server.close()
        await server.wait_closed()

"""Every Redis client of the service, made here from ``REDIS_URL``.

Commands go out packed by hiredis's C packer, the one redis-py's own synchronous client uses when
hiredis is installed: redis-py's asyncio connection packs in Python, 22 us for one reserve call
against 6 us this way (BENCHMARKS.md), on every call of the hot path.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class HiredisPacked(Connection):
    """A plain TCP connection whose commands hiredis packs (same bytes, same errors)."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def _packed(pool: Any) -> Any:
    if HIREDIS_AVAILABLE and pool.connection_class is Connection:  # TLS and unix sockets: as they come
        pool.connection_class = HiredisPacked
    return pool


def client(url: str, pool_size: int | None = None, **options: Any) -> Redis:
    """A client of ``url`` with replies decoded to str, closing its pool when it is closed. With
    ``pool_size``, at most that many connections, and a caller waits up to 5 s for one rather than
    opening more."""
    if pool_size is None:
        pool = ConnectionPool.from_url(url, decode_responses=True, **options)
    else:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=5, decode_responses=True, **options
        )
    return Redis.from_pool(_packed(pool))

"""Every Redis client of the service, made here from ``REDIS_URL``: a cluster client when the
server named there runs in cluster mode (``connect`` asks it), a plain one otherwise.

Commands go out packed by hiredis's C packer, the one redis-py's own synchronous client uses when
hiredis is installed: redis-py's asyncio connection packs in Python, 22 us for one reserve call
against 6 us this way (BENCHMARKS.md), on every call of the hot path.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import RedisClusterException, RedisError
from redis.utils import HIREDIS_AVAILABLE

log = logging.getLogger("flashsale.redis")
Client: TypeAlias = Redis | RedisCluster
# What a call raises when Redis, or a part of the cluster, cannot answer it: the cluster client's
# own errors (no master for a slot, a slot map being rebuilt) are not RedisErrors.
ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)


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


async def is_cluster(url: str) -> bool:
    """Whether the server at ``url`` runs in cluster mode (``INFO cluster``). A server that does
    not answer (or will not run INFO for this user) is taken for a single one, so that the service
    starts (and answers 503) while Redis is down, as it always has; a cluster must be up and
    answer INFO when the service starts."""
    probe = Redis.from_url(
        url, decode_responses=True, single_connection_client=True, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        return bool((await probe.info("cluster")).get("cluster_enabled"))
    except ERRORS as exc:  # down, silent, or INFO not allowed to this user
        log.warning("could not ask REDIS_URL whether it is a cluster node; taking it for one server: %r", exc)
        return False
    finally:
        await probe.aclose()


async def connect(url: str, pool_size: int | None = None, **options: Any) -> Client:
    """``client``, or for a node of a Redis Cluster a cluster client that routes every command
    by its keys' slot, follows MOVED/ASK and reloads the slot map after a failover."""
    if not await is_cluster(url):
        return client(url, pool_size, **options)
    # One retry, after a fresh slot map, then the error: while a master is down and its replica
    # takes over, a call fails in about 0.3 s (a 503 with Retry-After) instead of the library's
    # ten retries a quarter of a second apart, holding every request for seconds.
    cluster = RedisCluster.from_url(url, decode_responses=True, retry=Retry(NoBackoff(), 1), **options)
    await cluster.initialize()  # the slot map now: a cluster that is not ready fails at start, not later
    return cluster

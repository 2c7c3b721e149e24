"""One round trip per event-loop tick: the Redis calls made while the loop runs one batch of
ready callbacks go out together as one redis-py pipeline (no transaction, so nothing blocks
Redis longer than the calls themselves).

A crowd's requests arrive many per tick; sent one by one, each pays a round trip and a pool
checkout. Sent together, they share one write and one read. Each caller still gets its own
reply or its own error: a script's error fails that call only. A script Redis does not know
(NOSCRIPT: a restarted or failed-over server) is loaded and its calls sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from .connection import ERRORS, Client

log = logging.getLogger("flashsale.redis")
Args = Sequence[str | int | float | bytes]


class Coalescer:
    def __init__(self, redis: Client, sources: dict[str, str] | None = None) -> None:
        self.redis = redis
        self.sources = sources or {}  # sha -> Lua source, for NOSCRIPT
        self.round_trips = 0  # pipelines sent
        self.commands = 0  # commands sent in them: commands / round_trips is the coalescing achieved
        self.ticks = 0  # batches flushed; a caller may join a call made in the same tick (see joinable)
        self._queue: list[tuple[Args, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, *args: str | int | float | bytes) -> asyncio.Future[Any]:
        """Queues one command for this tick's pipeline; await the result for its reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((args, future))
        return future

    def evalsha(self, sha: str, keys: Sequence[str], args: Args) -> asyncio.Future[Any]:
        return self.call("EVALSHA", sha, len(keys), *keys, *args)

    def joinable(self, tick: int) -> bool:
        """Whether calls queued at ``tick`` have not been sent yet: a reader that joins one gets an
        answer read after it arrived, never an older one."""
        return tick == self.ticks

    def _flush(self) -> None:
        self.ticks += 1
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Args, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._pipeline([args for args, _ in batch])
        except BaseException as exc:  # the connection failed: every caller of the batch hears it
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        again = [
            (args, future) for (args, future), r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)
        ]
        _deliver([(f, r) for (_, f), r in zip(batch, replies, strict=True) if not isinstance(r, NoScriptError)])
        if not again:
            return
        # Only the calls Redis did not run wait for the reload: the others have their answers, and a
        # reload that fails must not turn a hold that was made into an error.
        try:
            wanted: dict[tuple[str, str | None], ClusterNode | None] = {}  # (sha, master's name) -> that master
            for args, _ in again:
                node = self._master(args)
                wanted.setdefault((str(args[1]), None if node is None else node.name), node)
            for (sha, _), node in wanted.items():
                if sha not in self.sources:
                    raise NoScriptError(f"no source for script {sha!r}")
                await self._load(self.sources[sha], node)
            replies = await self._pipeline([args for args, _ in again])
        except BaseException as exc:
            _fail(again, exc)
            if not isinstance(exc, Exception):
                raise
            return
        _deliver([(f, r) for (_, f), r in zip(again, replies, strict=True)])

    def _master(self, args: Args) -> ClusterNode | None:
        """On a cluster, the master an EVALSHA call goes to (that of its first key); else None."""
        if isinstance(self.redis, RedisCluster) and int(args[2]) > 0:
            return self.redis.get_node_from_key(str(args[3]))
        return None

    async def _load(self, source: str, node: ClusterNode | None) -> None:
        """SCRIPT LOAD where the call goes: on a cluster, only its master, so that a master down
        elsewhere does not fail the load (redis-py would send it to all)."""
        if node is not None:
            await self.redis.execute_command("SCRIPT LOAD", source, target_nodes=node)
        else:
            await self.redis.script_load(source)

    async def _pipeline(self, commands: Sequence[Args]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        self.round_trips += 1
        self.commands += len(commands)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except ERRORS:
            raise
        except Exception as exc:
            # redis-py's cluster pipeline, retrying after a node failed, closes the client's
            # connections under the other pipelines in flight; theirs then fail inside the library
            # (AttributeError on a writer gone). A call that failed on a closing connection: told
            # to its callers as such (503, Retry-After), the library's own error kept in the log.
            log.warning("the redis client failed mid-call, answering it as a lost connection: %r", exc)
            raise RedisConnectionError(f"the redis client failed mid-call: {exc!r}") from exc
        return replies

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


def _deliver(answers: Sequence[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, reply in answers:
        if future.done():  # its caller was cancelled (client gone)
            continue
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)


def _fail(calls: Sequence[tuple[Args, asyncio.Future[Any]]], exc: BaseException) -> None:
    error = exc if isinstance(exc, Exception) else ConnectionError("the call was cancelled")
    for _, future in calls:
        if not future.done():
            future.set_exception(error)

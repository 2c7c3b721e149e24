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
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Args = Sequence[str | int | float | bytes]


class Coalescer:
    def __init__(self, redis: Redis, sources: dict[str, str] | None = None) -> None:
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
            missing = {args[1] for (args, _), r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)}
            if missing:
                replies = await self._reload(batch, replies, missing)
        except BaseException as exc:  # the connection failed: every caller of the batch hears it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled (client gone)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _pipeline(self, commands: Sequence[Args]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        self.round_trips += 1
        self.commands += len(commands)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _reload(
        self, batch: list[tuple[Args, asyncio.Future[Any]]], replies: list[Any], missing: set[Any]
    ) -> list[Any]:
        """Loads the scripts Redis lost and sends their calls again, once."""
        unknown = [sha for sha in missing if sha not in self.sources]
        if unknown:
            raise NoScriptError(f"no source for script {unknown[0]}")
        for sha in missing:
            await self.redis.script_load(self.sources[sha])
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        for i, reply in zip(again, await self._pipeline([batch[i][0] for i in again]), strict=True):
            replies[i] = reply
        return replies

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

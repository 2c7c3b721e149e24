"""The Lua scripts in ``lua/``, each called by SHA through the tick's pipeline (``coalesce``).

The SHA is computed here from the file, so no call waits for a SCRIPT LOAD; a server that does
not know a script (restarted, failed over, SCRIPT FLUSH) answers NOSCRIPT and the coalescer
loads the source and sends the call again, so a script cache flush never fails a request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .coalesce import Args, Coalescer
from .connection import Client

NAMES = (
    "sale_create",
    "reserve",
    "settle",
    "sale_control",
    "restock",
    "sale_update",
    "sale_view",
    "retire",
    "recover_hold",
    "shard_create",
    "shard_sync",
    "shard_give",
    "shard_take",
    "shard_done",
    "queue_join",
    "queue_poll",
    "queue_tick",
    "queue_control",
    "budget_take",
    "budget_give",
    "budget_void",
    "extend",
    "cart",
    "cart_settle",
    "budget_restore",
    "progress_read",
    "tally_add",
    "queue_stats",
)


@dataclass(frozen=True)
class Script:
    name: str
    sha: str
    calls: Coalescer

    async def __call__(self, keys: Sequence[str], args: Args) -> Any:
        return await self.calls.evalsha(self.sha, keys, args)


@dataclass(frozen=True)
class Scripts:
    calls: Coalescer
    sale_create: Script
    reserve: Script
    settle: Script
    sale_control: Script
    restock: Script
    sale_update: Script
    sale_view: Script
    retire: Script
    recover_hold: Script
    shard_create: Script
    shard_sync: Script
    shard_give: Script
    shard_take: Script
    shard_done: Script
    queue_join: Script
    queue_poll: Script
    queue_tick: Script
    queue_control: Script
    budget_take: Script
    budget_give: Script
    budget_void: Script
    extend: Script
    cart: Script
    cart_settle: Script
    budget_restore: Script
    progress_read: Script
    tally_add: Script
    queue_stats: Script

    @classmethod
    def load(cls, redis: Client, lua_dir: Path, calls: Coalescer | None = None) -> Scripts:
        calls = calls or Coalescer(redis)
        found: dict[str, Script] = {}
        for name in NAMES:
            path = lua_dir / f"{name}.lua"
            if not path.is_file():
                raise FileNotFoundError(f"Lua script {path} is missing: is FLASHSALE lua_dir right?")
            source = path.read_text()
            sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324  (Redis names scripts by SHA-1)
            calls.sources[sha] = source
            found[name] = Script(name, sha, calls)
        return cls(calls=calls, **found)

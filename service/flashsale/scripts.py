"""The Lua scripts in ``lua/``, each registered once and called by SHA.

redis-py's ``AsyncScript`` sends EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis),
loads the source and retries, so a script cache flush never fails a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

NAMES = ("sale_create", "reserve", "settle", "sale_control", "restock", "sale_update", "sale_view", "retire")


@dataclass(frozen=True)
class Scripts:
    sale_create: AsyncScript
    reserve: AsyncScript
    settle: AsyncScript
    sale_control: AsyncScript
    restock: AsyncScript
    sale_update: AsyncScript
    sale_view: AsyncScript
    retire: AsyncScript

    @classmethod
    def load(cls, redis: Redis, lua_dir: Path) -> Scripts:
        found: dict[str, Any] = {}
        for name in NAMES:
            path = lua_dir / f"{name}.lua"
            if not path.is_file():
                raise FileNotFoundError(f"Lua script {path} is missing: is FLASHSALE lua_dir right?")
            found[name] = redis.register_script(path.read_text())
        return cls(**found)

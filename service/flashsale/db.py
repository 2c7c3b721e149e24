"""Postgres: the connection pool and the migrations."""

from __future__ import annotations

import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("flashsale.db")

# Any session holding this advisory lock is migrating; others wait for it.
MIGRATE_LOCK = 7_362_514


async def create_pool(dsn: str, size: int) -> asyncpg.Pool:
    """min_size 0: the pool opens no connection until one is needed, so a process can start
    while Postgres is down and begin writing when it returns."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=size, command_timeout=30)
    assert pool is not None
    return pool


def load(directory: Path) -> list[tuple[str, str]]:
    """The ``NNN_name.sql`` files, in order, as (name, sql)."""
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no migrations in {directory}")
    return [(f.name, f.read_text()) for f in files]


async def migrate(conn: asyncpg.Connection, directory: Path) -> list[str]:
    """Applies each migration not yet recorded, in order, each in its own transaction."""
    files = load(directory)
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in files:
            if name in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            log.info("applied migration %s", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
    return applied

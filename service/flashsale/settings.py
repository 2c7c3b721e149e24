"""One typed settings object, read from the environment once and passed down."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it and what it should be."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _level(env: Mapping[str, str], name: str, default: str) -> str:
    level = (env.get(name) or default).upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"{name}={env.get(name)!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _seconds(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        values = tuple(float(v) for v in raw.split(","))
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a comma-separated list of seconds (e.g. 5,30,120)") from None
    if any(not 0 < v <= 86_400 for v in values):
        raise SettingsError(f"{name}={raw!r}: every wait must be more than 0 and at most 86400 seconds")
    return values


def _keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in env.get(name, "").split(",") if k.strip())


@dataclasses.dataclass(frozen=True)
class Settings:
    redis_url: str = ""
    database_url: str = ""
    ops_keys: tuple[str, ...] = ()
    storefront_keys: tuple[str, ...] = ()
    # Signs the waiting rooms' admission tokens; the same in every API process. Unset: a key
    # derived from the ops keys, which a deployment gives every process alike.
    secret: str = ""
    # Every Redis key starts with this; tests give each run its own.
    key_prefix: str = "fs"
    # Attempts one user may make on one sale per second; 0 turns the limit off.
    user_rate_per_s: int = 20
    # Requests one API process works on at once before it answers 503.
    max_in_flight: int = 2000
    redis_pool_size: int = 64
    db_pool_size: int = 8
    # How long a refusal the reserve script gave (sold out, not started, paused, ended) may be
    # repeated from memory, at most; the changes channel usually ends it sooner. 0: never.
    verdict_ttl_ms: int = 200
    # How often answers given from memory are added to the progress counters in Redis.
    tally_interval_ms: int = 250
    sweep_interval_ms: int = 250
    sweep_batch: int = 200
    persist_batch: int = 500
    persist_block_ms: int = 200
    # A pending stream entry idle this long is taken over by another consumer.
    claim_idle_ms: int = 5000
    # Deliveries after which an entry that keeps failing is dead-lettered.
    max_deliveries: int = 5
    # Webhooks (dispatch.py): the waits before each retry of a delivery not answered 2xx, in
    # seconds (each drawn within +-20%; about two hours in all), then it is dead-lettered; how long
    # an endpoint has to answer; how many deliveries one endpoint has in flight at once.
    webhook_retry_s: tuple[float, ...] = (5, 30, 120, 300, 600, 1200, 1800, 3600)
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 8
    log_level: str = "INFO"
    # One access-log line in this many of the 2xx and 409 answers (every other status always).
    access_log_sample: int = 1
    lua_dir: Path = ROOT / "lua"
    migrations_dir: Path = ROOT / "migrations"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        return cls(
            redis_url=env.get("REDIS_URL", ""),
            database_url=env.get("DATABASE_URL", ""),
            ops_keys=_keys(env, "FLASHSALE_OPS_KEYS"),
            storefront_keys=_keys(env, "FLASHSALE_STOREFRONT_KEYS"),
            secret=env.get("FLASHSALE_SECRET", ""),
            key_prefix=env.get("FLASHSALE_KEY_PREFIX", d.key_prefix) or d.key_prefix,
            user_rate_per_s=_int(env, "FLASHSALE_USER_RATE", d.user_rate_per_s),
            max_in_flight=_int(env, "FLASHSALE_MAX_IN_FLIGHT", d.max_in_flight, 1),
            redis_pool_size=_int(env, "FLASHSALE_REDIS_POOL", d.redis_pool_size, 1),
            db_pool_size=_int(env, "FLASHSALE_DB_POOL", d.db_pool_size, 1),
            verdict_ttl_ms=_int(env, "FLASHSALE_VERDICT_TTL_MS", d.verdict_ttl_ms),
            tally_interval_ms=_int(env, "FLASHSALE_TALLY_MS", d.tally_interval_ms, 10),
            sweep_interval_ms=_int(env, "FLASHSALE_SWEEP_MS", d.sweep_interval_ms, 10),
            persist_batch=_int(env, "FLASHSALE_PERSIST_BATCH", d.persist_batch, 1),
            claim_idle_ms=_int(env, "FLASHSALE_CLAIM_IDLE_MS", d.claim_idle_ms, 100),
            max_deliveries=_int(env, "FLASHSALE_MAX_DELIVERIES", d.max_deliveries, 1),
            webhook_retry_s=_seconds(env, "FLASHSALE_WEBHOOK_RETRY_S", d.webhook_retry_s),
            webhook_timeout_s=float(_int(env, "FLASHSALE_WEBHOOK_TIMEOUT_S", int(d.webhook_timeout_s), 1)),
            webhook_concurrency=_int(env, "FLASHSALE_WEBHOOK_CONCURRENCY", d.webhook_concurrency, 1),
            log_level=_level(env, "LOG_LEVEL", d.log_level),
            access_log_sample=_int(env, "FLASHSALE_ACCESS_LOG_SAMPLE", d.access_log_sample, 1),
        )

    @property
    def signing_secret(self) -> str:
        return self.secret or "derived from the ops keys\n" + "\n".join(sorted(self.ops_keys))

    def require_servers(self) -> None:
        missing = [n for n, v in (("REDIS_URL", self.redis_url), ("DATABASE_URL", self.database_url)) if not v]
        if missing:
            raise SettingsError(
                f"{' and '.join(missing)} not set: export it (e.g. REDIS_URL=redis://127.0.0.1:6379/0), "
                "or run `flashsale dev` to start throwaway servers"
            )

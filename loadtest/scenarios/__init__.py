"""The scenarios, one locustfile each. This registry is plain data (no locust import), so the
runner can read it without gevent's monkey-patching."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Scenario:
    name: str
    spawn_seconds: float  # how fast the crowd arrives: users / spawn_seconds per second
    about: str

    @property
    def locustfile(self) -> Path:
        return HERE / f"{self.name}.py"


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("flash_crowd", 3, "everyone arrives within seconds of the opening; demand 20x stock"),
        Scenario("retry_storm", 5, "clients time out and resend with the same Idempotency-Key, doubles in flight"),
        Scenario("abandon", 5, "most winners never pay; 3 s holds expire and later buyers get the units"),
        Scenario("browse_and_buy", 10, "10 sale reads per reservation attempt, confirms and cancels mixed in"),
        Scenario("abuse", 5, "a few users hammer far above the per-user limit and rate among normal shoppers"),
        Scenario("waiting_room", 4, "a crowd queues before and after the start, a third leaves, sneaks try no token"),
    )
}

"""What the load-test clients saw, as plain data: written by the locust process at test stop,
read by the verdict. No locust or gevent import here, so any process can load it."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

FINAL = ("confirmed", "released", "expired")
FOREVER = 2**62


def ms(instant: str) -> int:
    """An ISO 8601 instant as the service writes it, in milliseconds since the epoch."""
    return round(datetime.fromisoformat(instant).timestamp() * 1000)


@dataclass
class Acked:
    """A reservation acknowledged to a client (201, or 200 for a replay), as the client last saw it.

    ``status`` is ``unknown`` when the client asked to confirm or cancel and never got an answer:
    the change may or may not have happened."""

    rid: str
    user: str
    sku: str
    qty: int
    key: str
    created_ms: int
    expires_ms: int
    status: str = "held"
    final_ms: int | None = None

    def interval(self) -> tuple[int, int] | None:
        """A part of the time the units were surely out of stock, from what the client saw."""
        if self.status == "confirmed":
            return self.created_ms, FOREVER
        if self.status == "released" and self.final_ms is not None:
            return self.created_ms, self.final_ms
        if self.status in ("held", "expired"):  # a hold lasts at least until expires_at
            return self.created_ms, self.expires_ms
        return None  # unknown: a cancel may have ended it at any time


@dataclass
class Records:
    scenario: str
    sale: dict[str, Any]
    base_url: str
    users: int = 0
    duration_s: float = 0.0
    started_at: float = 0.0
    attempts: int = 0  # reservation requests sent, retries included
    answers: Counter[str] = field(default_factory=Counter)  # "reserve 409 sold_out" -> n
    acked: dict[str, Acked] = field(default_factory=dict)
    by_key: dict[str, set[str]] = field(default_factory=dict)  # "user key" -> reservation ids
    abusers: set[str] = field(default_factory=set)
    anomalies: list[str] = field(default_factory=list)  # answers no contract allows (kept short)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # endpoint -> n, p50, p95, p99, errors
    error_rate: float = 0.0
    server_errors: int = 0  # 5xx other than 503: the contract allows none
    expectations: list[str] = field(default_factory=list)  # what the scenario must show, unmet ones
    notes: list[str] = field(default_factory=list)

    def answer(self, endpoint: str, status: int, code: str = "") -> None:
        self.answers[f"{endpoint} {status} {code}".rstrip()] += 1
        if status >= 500 and status != 503:
            self.server_errors += 1

    def anomaly(self, text: str) -> None:
        if len(self.anomalies) < 50:
            self.anomalies.append(text)

    def ack(self, body: dict[str, Any], key: str) -> Acked:
        """Records a reservation the service acknowledged; returns the record of it."""
        rid = body["reservation_id"]
        self.by_key.setdefault(f"{body['user_id']} {key}", set()).add(rid)
        known = self.acked.get(rid)
        if known is None:
            known = self.acked[rid] = Acked(
                rid=rid,
                user=body["user_id"],
                sku=body["sku"],
                qty=int(body["quantity"]),
                key=key,
                created_ms=ms(body["created_at"]),
                expires_ms=ms(body["expires_at"]),
            )
        self.saw(rid, body)
        return known

    def saw(self, rid: str, body: dict[str, Any]) -> None:
        """A reservation's status as an answer showed it; a final status is never taken back."""
        known = self.acked.get(rid)
        if known is None:
            return
        status = body.get("status", "held")
        if known.status in FINAL and status != known.status:
            if status in FINAL:
                self.anomaly(f"{rid} seen {known.status} then {status}")
            return
        known.status = status
        if status in FINAL and body.get("updated_at"):
            known.final_ms = ms(body["updated_at"])

    def unsure(self, rid: str) -> None:
        """A confirm or cancel got no answer: whether it happened is unknown."""
        known = self.acked.get(rid)
        if known is not None and known.status == "held":
            known.status = "unknown"

    def units_won(self) -> dict[str, int]:
        """Units each user won and still had as the client last saw it (held, confirmed or unknown)."""
        won: Counter[str] = Counter()
        for a in self.acked.values():
            if a.status not in ("released", "expired"):
                won[a.user] += a.qty
        return dict(won)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["units_won_by_user"] = self.units_won()  # derived, for a reader of the file
        out["answers"] = dict(self.answers)
        out["by_key"] = {k: sorted(v) for k, v in self.by_key.items()}
        out["abusers"] = sorted(self.abusers)
        return out

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> Records:
        raw = json.loads(path.read_text())
        raw.pop("units_won_by_user", None)
        raw["answers"] = Counter(raw["answers"])
        raw["acked"] = {rid: Acked(**a) for rid, a in raw["acked"].items()}
        raw["by_key"] = {k: set(v) for k, v in raw["by_key"].items()}
        raw["abusers"] = set(raw["abusers"])
        return cls(**raw)


def peak(intervals: Iterable[tuple[int, int, int]]) -> int:
    """The largest sum of ``units`` over (start, end, units) intervals open at one instant.

    Intervals are half-open; at equal times ends go before starts, so two events in the same
    millisecond never count as overlapping (the check may miss an overlap, never invent one)."""
    events = sorted(e for start, end, units in intervals if end > start for e in ((start, 1, units), (end, 0, -units)))
    level = best = 0
    for _, _, delta in events:
        level += delta
        best = max(best, level)
    return best


def percentiles(samples: list[float]) -> dict[str, float]:
    """n, p50, p95, p99 (nearest rank) of response times in ms."""
    if not samples:
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 1)

    return {"n": len(ordered), "p50": rank(50), "p95": rank(95), "p99": rank(99)}

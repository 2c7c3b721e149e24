"""What the load-test clients saw, as plain data: written by the locust process at test stop,
read by the verdict. No locust or gevent import here, so any process can load it.

With ``locust --processes N`` each worker process writes its own :class:`Part` and the master
joins them with :func:`merge` into the one :class:`Records` the verdict reads."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
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
    # A waiting room's side (loadtest/queue_verdict.py): one dict per ticket a client followed
    # (user, sent_ms, joined_ms, admitted_ms, last_waiting_ms, final, reason), and the
    # sale's /progress read twice a second (at_ms, waiting, admitted, expired, available, held, closed).
    tickets: list[dict[str, Any]] = field(default_factory=list)
    queue_samples: list[dict[str, Any]] = field(default_factory=list)

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

    def merge_acked(self, a: Acked) -> None:
        """Adds a reservation another process acknowledged: the most telling status wins (a final
        one over ``unknown`` over ``held``); two different final statuses, or one reservation
        acknowledged for two different requests, are anomalies."""
        known = self.acked.get(a.rid)
        if known is None:
            self.acked[a.rid] = dataclasses.replace(a)
            return
        if (known.user, known.sku, known.qty) != (a.user, a.sku, a.qty):
            self.anomaly(
                f"{a.rid} acknowledged for {known.user} {known.sku} x{known.qty} and {a.user} {a.sku} x{a.qty}"
            )
        if known.status in FINAL and a.status in FINAL and a.status != known.status:
            self.anomaly(f"{a.rid} seen {known.status} then {a.status}")
        elif _rank(a.status) > _rank(known.status):
            known.status, known.final_ms = a.status, a.final_ms

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
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Records:
        raw = dict(raw)
        raw.pop("units_won_by_user", None)
        raw["answers"] = Counter(raw["answers"])
        raw["acked"] = {rid: Acked(**a) for rid, a in raw["acked"].items()}
        raw["by_key"] = {k: set(v) for k, v in raw["by_key"].items()}
        raw["abusers"] = set(raw["abusers"])
        return cls(**raw)


def _rank(status: str) -> int:
    return 2 if status in FINAL else 1 if status == "unknown" else 0


@dataclass
class Part:
    """The records of one locust worker process, with the raw response times behind them (so the
    merged percentiles are exact: percentiles of percentiles would not be)."""

    pids: list[int]
    records: Records
    samples: dict[str, list[float]] = field(default_factory=dict)  # endpoint -> response times, ms
    failures: dict[str, int] = field(default_factory=dict)  # endpoint -> failed requests

    def save(self, path: Path) -> None:
        """Whole or not at all (written aside, then renamed): the master polls for these files."""
        body = {
            "pids": self.pids,
            "records": self.records.to_json(),
            "samples": self.samples,
            "failures": self.failures,
        }
        aside = path.with_name(path.name + ".tmp")
        aside.write_text(json.dumps(body))
        aside.replace(path)

    @classmethod
    def load(cls, path: Path) -> Part:
        raw = json.loads(path.read_text())
        return cls(raw["pids"], Records.from_json(raw["records"]), raw["samples"], raw["failures"])


def merge(parts: Sequence[Part]) -> Part:
    """The parts of one run as if one process had seen every answer. Counts add up; acknowledged
    reservations and the reservations per Idempotency-Key are unions, so a key answered with one
    reservation in one process and another in a second is still a duplicate; response times are
    put together. Latency, error rate and expectations are left to compute from the result."""
    if not parts:
        raise ValueError("no records to merge")
    first = parts[0].records
    rec = Records(
        scenario=first.scenario,
        sale=first.sale,
        base_url=first.base_url,
        users=first.users,
        duration_s=first.duration_s,
    )
    rec.started_at = min(p.records.started_at for p in parts)
    samples: dict[str, list[float]] = defaultdict(list)
    failures: Counter[str] = Counter()
    for part in parts:
        one = part.records
        if one.sale.get("id") != first.sale.get("id"):
            raise ValueError(f"records of two sales: {first.sale.get('id')} and {one.sale.get('id')}")
        rec.attempts += one.attempts
        rec.answers.update(one.answers)
        rec.server_errors += one.server_errors
        rec.abusers |= one.abusers
        for key, rids in one.by_key.items():
            rec.by_key.setdefault(key, set()).update(rids)
        for a in one.acked.values():
            rec.merge_acked(a)
        for text in one.anomalies:
            rec.anomaly(text)
        rec.notes += [n for n in one.notes if n not in rec.notes]
        rec.tickets += one.tickets
        rec.queue_samples += one.queue_samples
        for name, times in part.samples.items():
            samples[name] += times
        failures.update(part.failures)
    return Part([pid for p in parts for pid in p.pids], rec, dict(samples), dict(failures))


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

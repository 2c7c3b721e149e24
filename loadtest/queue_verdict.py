"""The waiting room's part of a load-test verdict (scenario ``waiting_room``), from what the
clients saw of their tickets, the sale's progress read twice a second, and Postgres's rows.

Each check can fail, and says what it saw:

- **shuffle**: pre-start joiners are admitted in an order unrelated to their join order: the rank
  correlation (Spearman) of join time and admission time, FAIL above 0.3 in size (100 at least);
- **fifo**: a later joiner whose join was answered before another's was sent is admitted no later;
- **stall**: progress never shows the line waiting, a unit free and nobody admitted for 2 s
  (the leavers' tickets must expire, not hold the line up);
- **rate**: no second with more admissions than ``admit_per_s`` (and a tick's worth of slack);
- **pause**: nobody admitted after every unit had been held for half a second (the rows' own
  times: two ticks of slack for the read that decides a tick);
- **closed**: once the stock is sold out, no ticket is admitted and none told "waiting" 1.5 s later;
- **token**: no reservation without a valid Admission-Token (the sneaks' tries, and every row's
  user had been admitted).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from loadtest.records import FOREVER, Records

SHUFFLE_MAX = 0.3
SHUFFLE_MIN_N = 100  # a fair shuffle of 100 fails the 0.3 bound by chance 0.3% of the time (z = 0.3 * sqrt(n - 1))
STALL_MS = 2000
PAUSE_SLACK_MS = 500
CLOSE_SLACK_MS = 1500


def _ms(at: datetime | None) -> int:
    return FOREVER if at is None else round(at.timestamp() * 1000)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The rank correlation of two equally long series (Pearson's of their ranks)."""
    rx, ry = ranks(xs), ranks(ys)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else 0.0


def fifo_inversions(late: Sequence[Mapping[str, Any]]) -> int:
    """Pairs where one join was answered before the other was sent, yet admitted after it."""
    by_sent = sorted(late, key=lambda t: t["sent_ms"])
    return sum(
        1 for a in by_sent for b in by_sent if a["joined_ms"] < b["sent_ms"] and a["admitted_ms"] > b["admitted_ms"]
    )


def levels(spans: Iterable[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Units out (held or sold) after each change: (instants, levels), ends before starts at one ms."""
    events = sorted(e for start, end, units in spans if end > start for e in ((start, 1, units), (end, 0, -units)))
    times: list[int] = []
    out: list[int] = []
    level = 0
    for at, _, delta in events:
        level += delta
        if times and times[-1] == at:
            out[-1] = level
        else:
            times.append(at)
            out.append(level)
    return times, out


def all_out_throughout(times: list[int], out: list[int], start: int, end: int, stock: int) -> bool:
    """Whether every unit was held or sold at every instant of [start, end]."""
    i = bisect.bisect_right(times, start) - 1
    if i < 0 or out[i] < stock:
        return False
    j = bisect.bisect_right(times, end)
    return min(out[i:j], default=out[i]) >= stock


def all_out_ms(times: list[int], out: list[int], stock: int, until: int) -> int:
    """How long, in all, every unit was held or sold (up to ``until``)."""
    total = 0
    for k, at in enumerate(times):
        if out[k] >= stock:
            total += min(times[k + 1] if k + 1 < len(times) else until, until) - at
    return max(total, 0)


def stalls(samples: Sequence[Mapping[str, Any]], opens_ms: int) -> list[tuple[int, int]]:
    """(from ms, for ms) of each stretch of 2 s or more with the line waiting, a unit free, the
    queue open and the admitted count not moving, in the progress samples."""
    found: list[tuple[int, int]] = []
    begun: Mapping[str, Any] | None = None
    for s in sorted(samples, key=lambda s: s["at_ms"]):
        stuck = s["at_ms"] > opens_ms + 500 and s["waiting"] > 0 and s["available"] > 0 and not s["closed"]
        if not stuck or begun is None or s["admitted"] != begun["admitted"]:
            begun = s if stuck else None
            continue
        span = s["at_ms"] - begun["at_ms"]
        if span >= STALL_MS and found and found[-1][0] == begun["at_ms"]:
            found[-1] = (begun["at_ms"], span)
        elif span >= STALL_MS:
            found.append((begun["at_ms"], span))
    return found


def judge(rec: Records, rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """(the numbers for the report, the breaches)."""
    room = rec.sale["waiting_room"]
    rate = int(room["admit_per_s"])
    stock = int(rec.sale["items"][0]["stock"])
    opens = round(datetime.fromisoformat(rec.sale["starts_at"]).timestamp() * 1000)
    breaches: list[str] = []
    admitted = [t for t in rec.tickets if t.get("admitted_ms") is not None]
    # Before the start for sure: answered before it. After it for sure: sent after it. A join sent
    # just before the start and answered after it may have been placed either way: left out.
    early = [t for t in admitted if t["joined_ms"] < opens]
    late = [t for t in admitted if t["sent_ms"] >= opens]
    summary: dict[str, Any] = {
        "tickets followed": len(rec.tickets),
        "left without polling": sum(1 for t in rec.tickets if t["final"] == "left"),
        "expired, never polled (progress)": max((s["expired"] for s in rec.queue_samples), default=0),
        "admitted (seen)": len(admitted),
        "admitted pre-start joiners": len(early),
        "admitted later joiners": len(late),
    }

    if len(early) >= SHUFFLE_MIN_N:
        rho = spearman([t["sent_ms"] for t in early], [t["admitted_ms"] for t in early])
        summary["shuffle: Spearman, join vs admission"] = round(rho, 3)
        if abs(rho) > SHUFFLE_MAX:
            breaches.append(f"waiting room: pre-start joiners admitted in their join order (Spearman {rho:.2f})")
    else:
        breaches.append(f"waiting room: only {len(early)} pre-start joiners admitted, {SHUFFLE_MIN_N} needed to judge")

    inversions = fifo_inversions(late)
    summary["fifo: later pairs out of order"] = inversions
    if inversions:
        breaches.append(f"waiting room: {inversions} pairs of later joiners admitted out of their order")

    stuck = stalls(rec.queue_samples, opens)
    summary["stall: 2 s waiting, unit free, none in"] = len(stuck)
    for at, span in stuck[:3]:
        breaches.append(f"waiting room: admission stalled for {span / 1000:.1f} s from {(at - opens) / 1000:+.1f} s")

    moments = sorted(t["admitted_ms"] for t in admitted)
    busiest = max((bisect.bisect_left(moments, m + 1000) - i for i, m in enumerate(moments)), default=0)
    summary["rate: most admitted in 1 s (seen)"] = f"{busiest} of {rate}"
    if busiest > rate * 1.25 + 1:
        breaches.append(f"waiting room: {busiest} admissions in one second, admit_per_s is {rate}")

    spans = [(_ms(r["created_at"]), _ms(r["released_at"] or r["expired_at"]), int(r["quantity"])) for r in rows]
    times, out = levels(spans)
    end = max((t.get("last_waiting_ms") or t["joined_ms"] for t in rec.tickets), default=opens)
    summary["pause: s with every unit out"] = round(all_out_ms(times, out, stock, end) / 1000, 1)
    paused_wrong = [m for m in moments if all_out_throughout(times, out, m - PAUSE_SLACK_MS, m, stock)]
    summary["pause: admitted while all out"] = len(paused_wrong)
    if paused_wrong:
        breaches.append(f"waiting room: {len(paused_wrong)} admitted after every unit had been held for 0.5 s")

    confirmed = sorted(_ms(r["confirmed_at"]) for r in rows if r["status"] == "confirmed")
    sold_units = sum(int(r["quantity"]) for r in rows if r["status"] == "confirmed")
    if sold_units >= stock and confirmed:
        sold_out = confirmed[-1]
        late_admits = [m for m in moments if m > sold_out + PAUSE_SLACK_MS]
        told_waiting = [t for t in rec.tickets if (t.get("last_waiting_ms") or 0) > sold_out + CLOSE_SLACK_MS]
        told = [t for t in rec.tickets if t["final"] == "closed" and t.get("reason") == "sold_out"]
        closed = sum(1 for t in told if t.get("last_waiting_ms") is not None)  # in line when it closed
        summary["closed: sold out at"] = f"{(sold_out - opens) / 1000:+.1f} s"
        summary["closed: waiting tickets told sold_out"] = closed
        summary["closed: joins told sold_out"] = len(told) - closed
        summary["closed: told waiting after it"] = len(told_waiting)
        if late_admits:
            breaches.append(f"waiting room: {len(late_admits)} admitted after the stock sold out")
        if told_waiting:
            breaches.append(f"waiting room: {len(told_waiting)} tickets told 'waiting' after the sell-out")
        if not told and not any(s["closed"] == "sold_out" for s in rec.queue_samples):
            breaches.append("waiting room: the queue did not close when the stock sold out")
    else:
        summary["closed: sold out at"] = "not in the run (close not tested)"

    sneaked = {
        k: n
        for k, n in rec.answers.items()
        if k.startswith("sneak reserve") and k.split()[2] not in ("403", "503", "0")
    }
    let_in = {t["user"] for t in admitted}
    strangers = sorted({r["user_id"] for r in rows} - let_in)
    summary["token: tries let through"] = sum(sneaked.values())
    summary["token: rows of users not admitted"] = len(strangers)
    if sneaked:
        breaches.append(f"waiting room: reserve without a valid token answered {sorted(sneaked)}")
    if strangers:
        breaches.append(f"waiting room: reservations of users never admitted: {strangers[:5]}")
    return summary, breaches

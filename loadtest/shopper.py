"""The locust side every scenario shares: the sale each run creates at test start, a storefront
client that records every answer, a progress line, and at test stop the verdict.

A scenario module calls :func:`install` with a function that builds its sale and defines its
users as subclasses of :class:`Shopper`. By default everything lives in one locust process.

With ``locust --processes N`` (``python -m loadtest.run --processes N``) the master creates the
sale, once, at its test_start and sends it to every worker in a custom message (``loadtest_sale``);
each worker records what its own users see and at its test_stop writes ``PREFIX.records.<pid>.json``
(a :class:`~loadtest.records.Part`); the master waits for one such file per worker, merges them
(:func:`~loadtest.records.merge`) into ``PREFIX.records.json`` and runs the verdict once.

Why a message for the sale, not a file: it travels on locust's own connection, on which the master
sends it before any spawn message (test_start fires before the spawn jobs are sent, and messages to
one worker keep their order), so a worker knows the sale before its first user starts; there is no
path to agree on, no polling, no stale file of an earlier run, and it works for workers on other
machines too. Belt and braces: a worker that has no sale at its test_start asks for it
(``loadtest_sale_please``), and users wait for it. The records come back as files instead, one per
worker (megabytes, written aside then renamed), which also leaves them for a reader to audit.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import requests
from gevent.event import Event
from gevent.pool import Group
from locust import FastHttpUser, events
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.rpc import Message
from locust.runners import MasterRunner, WorkerRunner

from loadtest.records import Part, Records, merge, percentiles

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("loadtest")

SaleFactory = Callable[[int, float], dict[str, Any]]  # (users, run seconds) -> the sale body
Expectations = Callable[[Records], list[str]]  # unmet scenario expectations
GIVES_UP = "[gives up]"  # endpoint names with this suffix are expected to time out
SALE_MESSAGE = "loadtest_sale"  # master -> workers: the sale and the run's settings
ASK_MESSAGE = "loadtest_sale_please"  # worker -> master: a worker with no sale at its test_start
SALE_WAIT_S = 30.0  # how long a user waits for the sale to reach its worker


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (connection error or client timeout)
    body: dict[str, Any] | None
    code: str = ""  # the error code of a refusal
    retry_after: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in (200, 201)

    @property
    def unanswered(self) -> bool:
        """No answer, or the service asked to come back: worth sending the same request again."""
        return self.status == 0 or self.status == 503


@dataclass
class Run:
    """The state of this locust process's run: one scenario, one sale. ``role`` is ``local`` (one
    process), ``master`` (creates the sale, merges and judges; has no users) or ``worker``."""

    scenario: str
    make_sale: SaleFactory
    expect: Expectations | None
    ops_key: str = field(default_factory=lambda: os.environ.get("OPS_KEY", ""))
    store_key: str = field(default_factory=lambda: os.environ.get("STORE_KEY", ""))
    out: Path = field(default_factory=lambda: Path(os.environ.get("LOADTEST_OUT", "")))
    records: Records | None = None
    helpers: Group = field(default_factory=Group)  # greenlets users spawn for requests in flight together
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stopped: bool = False
    ticker: gevent.Greenlet | None = None
    role: str = "local"
    sale_known: Event = field(default_factory=Event)
    workers: set[str] = field(default_factory=set)  # master: the workers told the sale
    reports: dict[str, dict[str, int]] = field(default_factory=dict)  # master: each worker's counts
    finisher: gevent.Greenlet | None = None  # master: waits for the workers' records, then judges

    def wait_records(self) -> Records:
        if self.records is None:
            self.sale_known.wait(SALE_WAIT_S)
        assert self.records is not None, "no sale: test_start did not run or the sale never reached this worker"
        return self.records

    @property
    def sale(self) -> dict[str, Any]:
        return self.wait_records().sale


RUN: Run | None = None
_numbers = itertools.count(1)


def run() -> Run:
    assert RUN is not None, "loadtest.shopper.install() was not called by the locustfile"
    return RUN


def install(scenario: str, make_sale: SaleFactory, expect: Expectations | None = None) -> None:
    """Hooks this scenario into locust's events; call once, at the top of the locustfile."""
    global RUN
    RUN = Run(scenario, make_sale, expect)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)
    events.test_stop.add_listener(_on_test_stop)
    events.request.add_listener(_on_request)
    events.report_to_master.add_listener(_on_report_to_master)
    events.worker_report.add_listener(_on_worker_report)
    events.quitting.add_listener(_on_quitting)


def sale_window(opens_in: float = 0.0, hours: int = 2) -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "starts_at": (now + timedelta(seconds=opens_in)).isoformat(),
        "ends_at": (now + timedelta(hours=hours)).isoformat(),
    }


def new_sale_id(scenario: str) -> str:
    return f"lt-{scenario.replace('_', '-')}-{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"


def _options(environment: Environment) -> tuple[int, float]:
    opts = environment.parsed_options
    users = int(getattr(opts, "num_users", None) or 1)
    seconds = float(getattr(opts, "run_time", None) or 60)
    return users, seconds


def _on_init(environment: Environment, **_: Any) -> None:
    """Runs in each process once its runner exists (after locust's fork, if any)."""
    r = run()
    r.helpers, r.sale_known = Group(), Event()  # this process's own, not the ones inherited over fork
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        r.role = "master"
        runner.register_message(ASK_MESSAGE, _on_sale_asked)
    elif isinstance(runner, WorkerRunner):
        r.role = "worker"
        runner.register_message(SALE_MESSAGE, _on_sale_told)


def _sale_message(r: Run) -> dict[str, Any]:
    rec = r.wait_records()
    return {
        "sale": rec.sale,
        "host": rec.base_url,
        "users": rec.users,
        "seconds": rec.duration_s,
        "started_at": rec.started_at,
        "out": str(r.out),
    }


def _on_sale_asked(environment: Environment, msg: Message, **_: Any) -> None:
    """Master: a worker had no sale at its test_start (it connected late, say): tell it."""
    r = run()
    if r.records is not None and environment.runner is not None:
        r.workers.add(msg.node_id)
        environment.runner.send_message(SALE_MESSAGE, _sale_message(r), msg.node_id)


def _on_sale_told(environment: Environment, msg: Message, **_: Any) -> None:
    """Worker: the sale the master created, and the run's settings its records need."""
    r = run()
    d = msg.data
    if r.records is not None and r.records.sale["id"] == d["sale"]["id"]:
        return
    r.out = Path(d["out"])
    r.records = Records(
        scenario=r.scenario,
        sale=d["sale"],
        base_url=d["host"],
        users=int(d["users"]),
        duration_s=float(d["seconds"]),
        started_at=float(d["started_at"]),
    )
    r.stopped = False
    r.sale_known.set()


def _on_test_start(environment: Environment, **_: Any) -> None:
    r = run()
    if r.role == "worker":  # the sale comes from the master, before this (see the module's docstring)
        if r.records is None and environment.runner is not None:
            environment.runner.send_message(ASK_MESSAGE)
        return
    if not r.ops_key or not r.store_key:
        _abort(environment, "OPS_KEY and STORE_KEY must be set (python -m loadtest.run sets them)")
        return
    users, seconds = _options(environment)
    body = r.make_sale(users, seconds)
    try:
        resp = requests.post(
            f"{environment.host}/v1/sales", json=body, timeout=30, headers={"Authorization": f"Bearer {r.ops_key}"}
        )
    except requests.RequestException as exc:
        _abort(environment, f"could not create the sale: {exc!r}")
        return
    if resp.status_code != 201:
        _abort(environment, f"could not create the sale: {resp.status_code} {resp.text[:300]}")
        return
    r.records = Records(
        scenario=r.scenario,
        sale=body,
        base_url=str(environment.host),
        users=users,
        duration_s=seconds,
        started_at=time.time(),
    )
    if not r.out.name:
        reports = ROOT / "loadtest" / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        r.out = reports / f"{r.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    log.info(
        "sale %s created: %s",
        body["id"],
        ", ".join(f"{i['sku']} stock {i['stock']} limit {i['per_user_limit']}" for i in body["items"]),
    )
    r.sale_known.set()
    if r.role == "master" and environment.runner is not None:
        assert isinstance(environment.runner, MasterRunner)
        r.workers = {c.id for c in environment.runner.clients.all}
        environment.runner.send_message(SALE_MESSAGE, _sale_message(r))
        log.info("sale %s sent to %d worker processes", body["id"], len(r.workers))
    r.ticker = gevent.spawn(_progress, environment, seconds)


def _abort(environment: Environment, why: str) -> None:
    log.error(why)
    environment.process_exit_code = 1
    if environment.runner is not None:
        gevent.spawn_later(0.1, environment.runner.quit)


def _on_request(
    request_type: str, name: str, response_time: float | None, exception: Exception | None, **_: Any
) -> None:
    r = run()
    r.latency[name].append(float(response_time or 0.0))
    if exception is not None:
        r.failures[name] += 1


def _counts(rec: Records) -> dict[str, int]:
    return {"attempts": rec.attempts, "won": len(rec.acked), "units": sum(a.qty for a in rec.acked.values())}


def _on_report_to_master(client_id: str, data: dict[str, Any], **_: Any) -> None:
    """Worker: its counts ride along with locust's stats reports, for the master's progress line."""
    rec = run().records
    if rec is not None:
        data["loadtest"] = _counts(rec)


def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if isinstance(data.get("loadtest"), dict):
        run().reports[client_id] = data["loadtest"]


def _progress(environment: Environment, seconds: float) -> None:
    """One line every few seconds, so a long run shows it is alive and how it goes."""
    every = float(os.environ.get("LOADTEST_PROGRESS_S", "5"))
    r = run()
    begun = time.monotonic()
    while True:
        gevent.sleep(every)
        rec = r.records
        if rec is None or environment.runner is None:
            continue
        stats = environment.runner.stats.total
        counts = _counts(rec)
        if r.role == "master":  # the users are in the workers: add up what they last reported
            counts = {k: sum(c.get(k, 0) for c in r.reports.values()) for k in counts}
        print(
            f"[{r.scenario}] {time.monotonic() - begun:5.0f}s/{seconds:.0f}s users {environment.runner.user_count}"
            f"  requests {stats.num_requests} ({stats.current_rps:.0f}/s, failed {stats.num_failures})"
            f"  reserve attempts {counts['attempts']}, won {counts['won']} ({counts['units']} units)",
            flush=True,
        )


def part_path(out: Path, pid: int) -> Path:
    """Where a worker process writes its records: ``PREFIX.records.<pid>.json``."""
    return out.with_name(f"{out.name}.records.{pid}.json")


def _on_test_stop(environment: Environment, **_: Any) -> None:
    r = run()
    if r.stopped or r.records is None:
        return
    r.stopped = True
    if r.ticker is not None:
        r.ticker.kill(block=False)
    r.helpers.kill(block=True, timeout=5)
    if r.role == "worker":
        path = part_path(r.out, os.getpid())
        Part([os.getpid()], r.records, dict(r.latency), dict(r.failures)).save(path)
        print(
            f"[{r.scenario}] worker {os.getpid()}: {r.records.attempts} reserve attempts, records in {path}", flush=True
        )
    elif r.role == "master":
        # On a --run-time quit the master's test_stop comes before the workers are told to stop:
        # wait for their records in a greenlet of its own; the quitting listener waits for it.
        r.finisher = gevent.spawn(_merge_and_judge, environment)
    else:
        _judge(environment, r.records, r.latency, r.failures)


def _merge_and_judge(environment: Environment) -> None:
    r = run()
    rec = r.wait_records()
    patience = float(os.environ.get("LOADTEST_RECORDS_TIMEOUT", "60"))
    deadline = time.monotonic() + patience
    paths: list[Path] = []
    while time.monotonic() < deadline:
        paths = sorted(r.out.parent.glob(f"{r.out.name}.records.[0-9]*.json"))
        if len(paths) >= len(r.workers):
            break
        gevent.sleep(0.2)
    try:
        parts = [p for p in map(Part.load, paths) if p.records.sale.get("id") == rec.sale["id"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        parts = []
        log.error("unreadable worker records: %r", exc)
    if len(parts) < len(r.workers):
        log.error(
            "records of %d of %d worker processes did not come in %.0f s: no verdict",
            len(r.workers) - len(parts),
            len(r.workers),
            patience,
        )
        environment.process_exit_code = 1
        return
    merged = merge([Part([], rec), *parts])  # the master's own: the sale and the run's settings
    merged.records.notes.append(
        f"records of {len(parts)} locust worker processes merged; reservation attempts by pid: "
        + ", ".join(f"{p.pids[0]} {p.records.attempts}" for p in sorted(parts, key=lambda p: p.pids))
    )
    _judge(environment, merged.records, merged.samples, merged.failures)


def _on_quitting(environment: Environment, **_: Any) -> None:
    """Master: locust's exit code is read after this returns; the verdict has to be in by then."""
    r = run()
    if r.finisher is not None:
        timeout = float(os.environ.get("LOADTEST_RECORDS_TIMEOUT", "60"))
        r.finisher.join(timeout + float(os.environ.get("LOADTEST_VERDICT_TIMEOUT", "240")) + 30)
        if not r.finisher.successful():
            environment.process_exit_code = 1


def _judge(environment: Environment, rec: Records, samples: dict[str, list[float]], failures: dict[str, int]) -> None:
    """Latency, error rate and expectations from all the records; then the verdict, in a plain process."""
    r = run()
    total = failed = 0
    for name, times in sorted(samples.items()):
        rec.latency[name] = {**percentiles(times), "errors": failures.get(name, 0)}
        if not name.endswith(GIVES_UP):
            total += len(times)
            failed += failures.get(name, 0)
    rec.error_rate = failed / total if total else 0.0
    if r.expect is not None:
        rec.expectations = r.expect(rec)
    records_path = r.out.with_suffix(".records.json")
    rec.save(records_path)
    print(f"[{r.scenario}] load done; waiting for the queue to drain, then checking the invariants", flush=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "loadtest.verdict", str(records_path), "--out", str(r.out)],
            cwd=ROOT,
            timeout=float(os.environ.get("LOADTEST_VERDICT_TIMEOUT", "240")),
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        verdict = json.loads(r.out.with_suffix(".json").read_text())
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        log.error("no verdict: %r", exc)
        environment.process_exit_code = 1
        return
    if not os.environ.get("LOADTEST_RUNNER"):
        print(r.out.with_suffix(".txt").read_text(), flush=True)
    environment.process_exit_code = 0 if verdict["pass"] else 1


def _json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class Shopper(FastHttpUser):
    """A storefront client for one shopper (one ``user_id``) that records every answer it gets."""

    abstract = True
    network_timeout = 30.0
    connection_timeout = 10.0
    concurrency = 4  # requests of one shopper may be in flight together (double clicks)
    user_prefix = "u"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.user_id = self.new_user_id()
        self.client.auth_header = f"Bearer {run().store_key}"
        self.done = False

    def new_user_id(self) -> str:
        """A user id no other shopper of the run has (a scenario may give one locust user several)."""
        user_id = f"{self.user_prefix}{next(_numbers)}"
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):  # each worker counts from 1: tell them apart
            user_id += f"-w{runner.worker_index if runner.worker_index >= 0 else os.getpid()}"
        return user_id

    @property
    def records(self) -> Records:
        return run().wait_records()

    @property
    def sale(self) -> dict[str, Any]:
        return run().sale

    def impatient(self, timeout: float) -> FastHttpSession:
        """A second connection pool for this shopper whose requests give up after ``timeout`` s."""
        session = FastHttpSession(
            self.host,
            self.environment.events.request,
            self,
            network_timeout=timeout,
            connection_timeout=timeout,
            max_retries=0,
            concurrency=4,
        )
        session.auth_header = self.client.auth_header
        return session

    def _send(
        self,
        method: str,
        path: str,
        name: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        client: FastHttpSession | None = None,
        expected: tuple[int, ...] = (200, 201),
    ) -> Answer:
        session = client or self.client
        with session.request(method, path, name=name, json=body, headers=headers, catch_response=True) as resp:
            status = int(resp.status_code or 0)
            data = _json(resp.text) if status else None
            error = (data or {}).get("error")
            code = str(error.get("code", "")) if isinstance(error, dict) else ""
            retry = float(error.get("retry_after") or 0) if isinstance(error, dict) else 0.0
            if status in expected:
                resp.success()
            else:
                resp.failure(f"{status} {code}".strip() if status else f"no answer: {resp.error!r}")
        return Answer(status, data, code, retry)

    def reserve(
        self,
        sku: str,
        qty: int,
        key: str | None = None,
        client: FastHttpSession | None = None,
        token: str | None = None,
        end_user: dict[str, str] | None = None,
        name: str = "reserve",
    ) -> Answer:
        """One reservation request; the answer is recorded whatever it is. ``token``: the
        Admission-Token of a waiting room; ``end_user``: the body's ``client`` (ip, device)."""
        key = key or secrets.token_urlsafe(12)
        rec = self.records
        rec.attempts += 1
        endpoint = "POST reserve" + (f" {GIVES_UP}" if client is not None else "")
        headers = {"Idempotency-Key": key} | ({"Admission-Token": token} if token is not None else {})
        body: dict[str, Any] = {"user_id": self.user_id, "sku": sku, "quantity": qty}
        if end_user:
            body["client"] = end_user
        a = self._send(
            "POST",
            f"/v1/sales/{self.sale['id']}/reservations",
            endpoint,
            body,
            headers,
            client,
            expected=(200, 201, 403, 409, 410, 429),
        )
        rec.answer("abuser reserve" if self.user_id in rec.abusers else name, a.status, a.code)
        if a.ok and a.body is not None:
            if a.body.get("user_id") != self.user_id or a.body.get("sku") != sku or a.body.get("quantity") != qty:
                rec.anomaly(f"reserve for {self.user_id} {sku} x{qty} answered with {a.body}")
            else:
                rec.ack(a.body, key)
        elif a.status and a.status not in (409, 429, 503) and not (a.status == 403 and a.code == "not_admitted"):
            rec.anomaly(f"reserve {a.status} {a.code}")
        return a

    def join(self, end_user: dict[str, str] | None = None) -> Answer:
        """Joins the sale's waiting room (201 new, 200 the ticket this user had)."""
        body: dict[str, Any] = {"user_id": self.user_id} | ({"client": end_user} if end_user else {})
        a = self._send("POST", f"/v1/sales/{self.sale['id']}/queue", "POST queue", body)
        self.records.answer("join", a.status, a.code)
        return a

    def poll(self, ticket: str) -> Answer:
        a = self._send("GET", f"/v1/sales/{self.sale['id']}/queue/{ticket}?user_id={self.user_id}", "GET ticket")
        self.records.answer("poll", a.status, a.code)
        return a

    def reserve_until_answered(
        self, sku: str, qty: int, key: str | None = None, tries: int = 6, token: str | None = None
    ) -> Answer:
        """Sends the same request (same Idempotency-Key) again while there is no answer."""
        key = key or secrets.token_urlsafe(12)
        a = Answer(0, None)
        for n in range(tries):
            a = self.reserve(sku, qty, key, token=token)
            if not a.unanswered:
                return a
            gevent.sleep(max(a.retry_after, 0.2 * 2**n) * random.uniform(0.8, 1.2))
        return a

    def settle(self, rid: str, action: str) -> Answer:
        """Confirm (pay) or cancel; the reservation's status is recorded from the answer."""
        body: dict[str, Any] = {"user_id": self.user_id}
        if action == "confirm":
            body["payment_ref"] = f"psp-{secrets.token_hex(6)}"
        a = self._send("POST", f"/v1/reservations/{rid}/{action}", f"POST {action}", body, expected=(200, 409, 410))
        rec = self.records
        rec.answer(action, a.status, a.code)
        if a.ok and a.body is not None:
            rec.saw(rid, a.body)
        elif a.status == 410:
            rec.saw(rid, {"status": "expired"})
        elif a.status == 409:
            self.look(rid)  # invalid_state: ask what it is now
        else:
            rec.unsure(rid)
            if a.status:
                rec.anomaly(f"{action} {a.status} {a.code}")
        return a

    def settle_until_answered(self, rid: str, action: str, tries: int = 6) -> Answer:
        a = Answer(0, None)
        for n in range(tries):
            a = self.settle(rid, action)
            if not a.unanswered:
                return a
            gevent.sleep(max(a.retry_after, 0.2 * 2**n) * random.uniform(0.8, 1.2))
        return a

    def look(self, rid: str) -> Answer:
        """GET the reservation and record the status it has now."""
        a = self._send("GET", f"/v1/reservations/{rid}?user_id={self.user_id}", "GET reservation")
        self.records.answer("get_reservation", a.status, a.code)
        if a.ok and a.body is not None:
            self.records.saw(rid, a.body)
        return a

    def browse(self) -> dict[str, Any] | None:
        """GET the sale page; returns the sale or None."""
        a = self._send("GET", f"/v1/sales/{self.sale['id']}", "GET sale")
        self.records.answer("get_sale", a.status, a.code)
        return a.body if a.ok else None

    def together(self, *calls: Callable[[], Answer]) -> list[Answer]:
        """Runs the calls at once (a double click) and waits for all of them."""
        lets = [run().helpers.spawn(c) for c in calls]
        gevent.joinall(lets, timeout=120)
        return [g.value if g.successful() and g.value is not None else Answer(0, None) for g in lets]

    def idle(self) -> None:
        """A shopper who is done: no more requests until the run ends."""
        self.done = True
        gevent.sleep(1.0)

    @staticmethod
    def pause(low: float, high: float) -> None:
        gevent.sleep(random.uniform(low, high))

    def wait_for_opening(self) -> None:
        """Shoppers who arrive early keep the page open and click at the opening (with a little jitter)."""
        opens = datetime.fromisoformat(self.sale["starts_at"]).timestamp()
        gevent.sleep(max(0.0, opens - time.time()) + random.uniform(0.0, 0.3))


def item(sale: dict[str, Any] | None, sku: str) -> dict[str, Any]:
    for i in (sale or {}).get("items", []):
        if i["sku"] == sku:
            found: dict[str, Any] = i
            return found
    return {}

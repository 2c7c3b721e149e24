"""Reservation decisions per second for one hot item with 1, 2 and 3 shards on a 3-master
cluster, side by side in one run: the reserve script driven straight at the masters, not
through the API (one API process is far slower than one Redis).

    python -m loadtest.cluster_bench [--requests 400000] [--connections 48] [--pipeline 16]

A throwaway cluster (EmbeddedCluster: three Valkey masters on loopback) holds one sale per row,
its item sharded N ways by the service's own code (Sales.load, shards.choose: the shards on
distinct masters). For each shard, one ``redis-benchmark`` process sends lua/reserve.lua by SHA
to the master that owns the shard's slot, exactly the KEYS and ARGV the API sends, a random user
and reservation id on every call (its ``__rand_int__``), the connections split evenly over the
shards. Every call is a full decision: the sale's state and window, stock, the user's units, the
hold, its due-time index, its event. After each row the shards' counters must add up
(available + held == stock_total) and count as many reservations as calls were answered.

redis-benchmark is C: a few microseconds of CPU per call, far less than a Python client, so that
the generator is not what is measured. It comes with Redis (apt-get install redis-tools).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from flashsale import connection, shards
from flashsale.coalesce import Coalescer
from flashsale.embedded import EmbeddedCluster
from flashsale.keys import Keys
from flashsale.reservations import fingerprint, reserve_keys
from flashsale.sales import Sales
from flashsale.schemas import MAX_STOCK, ItemIn, SaleIn
from flashsale.scripts import Scripts
from flashsale.settings import ROOT

SKU = "hot"


@dataclass
class Row:
    shards: int
    masters: int
    requests: int
    seconds: float
    per_shard: list[float]  # each generator's own rate
    p99_ms: float
    server_us: float  # the masters' own time per reserve call (INFO commandstats), mean over them

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def command(keys: Keys, slot: str, sha: str, mode: str) -> list[str]:
    """One reserve call as the API makes it (reservations.py), a random user and id each time."""
    rid = f"{slot}.__rand_int__"
    user = "u__rand_int__"
    return [
        "EVALSHA",
        sha,
        "12",
        *reserve_keys(keys, slot, rid, user, SKU, "", ""),
        rid,
        user,
        SKU,
        "1",
        fingerprint(SKU, 1),
        "",
        "0",
        mode,
        "",
        "",
        "",
    ]


def generate(
    host: str, port: int, cmd: list[str], requests: int, connections: int, pipeline: int
) -> subprocess.Popen[str]:
    args = ["redis-benchmark", "-h", host, "-p", str(port), "-n", str(requests), "-c", str(connections)]
    args += ["-P", str(pipeline), "-r", "1000000000", "--csv", *cmd]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parse(out: str) -> tuple[float, float]:
    """(requests per second, p99 ms) from redis-benchmark's --csv output."""
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no result: {out!r}")
    return float(rows[-1]["rps"]), float(rows[-1]["p99_latency_ms"])


async def row(redis: Any, n: int, args: argparse.Namespace) -> Row:
    keys = Keys(f"bench{n}")
    scripts = Scripts.load(redis, ROOT / "lua", Coalescer(redis))
    now = datetime.now(UTC)
    sale = SaleIn(
        id=f"hot{n}",
        name="bench",
        starts_at=now - timedelta(seconds=1),
        ends_at=now + timedelta(hours=1),
        items=[ItemIn(sku=SKU, name="hot", price_cents=1, stock=MAX_STOCK, per_user_limit=1_000_000, shards=n)],
    )
    await Sales(redis, keys, scripts).load(sale)
    slots = [sale.id, *(await redis.hget(keys.sale(sale.id), "slots") or "").split(",")][:n]
    await redis.script_load((ROOT / "lua" / "reserve.lua").read_text())  # on every master
    nodes = [redis.get_node_from_key(keys.sale(slot)) for slot in slots]
    mode = "shard" if n > 1 else ""
    each = args.requests // n
    for node in nodes:
        await redis.config_resetstat(target_nodes=node)
    started = time.monotonic()
    procs = [
        generate(
            node.host,
            node.port,
            command(keys, slot, scripts.reserve.sha, mode),
            each,
            args.connections // n,
            args.pipeline,
        )
        for slot, node in zip(slots, nodes, strict=True)
    ]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"redis-benchmark failed: {err.strip()}")
        results.append(parse(out))
    seconds = time.monotonic() - started
    made = 0
    for slot in slots:
        h = await redis.hgetall(keys.item(slot, SKU))
        assert int(h["available"]) + int(h["held"]) == int(h["stock_total"]), f"{slot}: units do not add up: {h}"
        made += int(h["reservations"])
    assert made <= each * n and made >= each * n * 0.99, f"{made} reservations for {each * n} calls"
    spent = []
    for node in nodes:
        stats = await redis.info("commandstats", target_nodes=node)
        spent.append(float(stats["cmdstat_evalsha"]["usec_per_call"]))
    masters = len({node.name for node in nodes})
    per = [r for r, _ in results]
    return Row(n, masters, each * n, seconds, per, max(p for _, p in results), sum(spent) / len(spent))


async def main(args: argparse.Namespace) -> None:
    if shutil.which("redis-benchmark") is None:
        sys.exit("cluster_bench needs redis-benchmark: apt-get install redis-tools")
    print("starting a 3-master cluster ...", flush=True)
    cluster = EmbeddedCluster(masters=3).start()
    try:
        redis = await connection.connect(cluster.url)
        rows = []
        for n in args.shards:
            print(f"shards {n}: {args.requests:,} reserve calls ...", flush=True)
            rows.append(await row(redis, n, args))
        await redis.aclose()
    finally:
        cluster.stop()
    base = rows[0].rate
    print()
    head = f"{'shards':>6} {'masters':>7} {'decisions/s':>12} {'vs 1 shard':>10} {'per generator':>28}"
    print(f"{head} {'p99 ms':>7} {'us/call in Redis':>17}")
    for r in rows:
        per = ", ".join(f"{x:,.0f}" for x in r.per_shard)
        line = f"{r.shards:>6} {r.masters:>7} {r.rate:>12,.0f} {r.rate / base:>9.2f}x {per:>28}"
        print(f"{line} {r.p99_ms:>7.1f} {r.server_us:>17.1f}")
    print(f"\nconnections {args.connections} in all, pipeline {args.pipeline}; {shards.__name__} placed the shards")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400_000, help="reserve calls per row, split over its shards")
    parser.add_argument("--connections", type=int, default=48, help="in all, split over the shards")
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--shards", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    asyncio.run(main(parser.parse_args()))

"""uvicorn against granian under `flashsale serve`, side by side on the same servers in one run:
the reserve route and GET sale in alternating rounds, then a soak of each server under a steady
reserve load with its memory sampled every slice.

    .venv/bin/python bench/granian_soak.py [--rounds 3] [--duration 10] [--soak 600] [--interleave]

Both servers run at once, one worker each (`flashsale serve --server uvicorn|granian --workers 1`,
the service as production runs it: loadtest.bench.SERVICE_ENV), on one Redis and one Postgres
(throwaway ones unless REDIS_URL / DATABASE_URL are set, as loadtest.services.stack does), with
the persister running. Each has sales of its own (loadtest.bench.Sales).

Rounds: for each of (b) POST /v1/sales/{id}/reservations while stock lasts (loadtest/wrk/reserve.lua,
a new user and Idempotency-Key per request) and (d) GET /v1/sales/{id}, each server measured in
turn (loadtest.bench.measure: a warm-up, then `--duration` s of wrk -t1 -c64), the order reversed
from one round to the next. The machine is shared: compare within a run, by ratio.

Soak: `--soak` seconds of the reserve load on each server, as back-to-back wrk runs of `--slice`
seconds (granian's first, then uvicorn's; with --interleave the slices alternate between the two
instead), and after each slice the RSS of the process that runs the app (uvicorn: the one
process; granian: its worker, beside its main process) and of the whole process tree. Memory is
"flat" when the app process grew by at most 5% from the end of the first minute to the end.

Prints a line per slice, then markdown tables (also in loadtest/reports/granian-soak-*.md). Every
process started here is stopped at the end, on an error and on Ctrl-C / SIGTERM too.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/granian_soak.py`
    sys.path.insert(0, str(ROOT))

from loadtest.bench import REPORTS, RESERVE_LUA, SERVICE_ENV, SKU, Result, Sales, wrk  # noqa: E402
from loadtest.services import Stack, interrupt_on_signals, stack, wait_ready  # noqa: E402

from flashsale.embedded import free_port  # noqa: E402

SERVERS = ("uvicorn", "granian")
ROUTES = {"b": "(b) reserve", "d": "(d) GET sale"}
BAR = 1.2  # granian becomes the default only at this many times uvicorn's reserve rate, memory flat
FLAT = 0.05  # at most this growth of the app process's RSS after the first minute of the soak
MB = 1024 * 1024


@dataclass
class Served:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    sales: Sales

    def memory(self) -> tuple[int, int]:
        """(RSS of the process that runs the app, RSS of the whole process tree), in bytes."""
        top = psutil.Process(self.proc.pid)
        tree = [top, *top.children(recursive=True)]
        rss = {p.pid: p.memory_info().rss for p in tree if p.is_running()}
        app = max(rss, key=rss.__getitem__)  # granian: its worker; its main process is far smaller
        return rss[app], sum(rss.values())


@dataclass
class Soak:
    server: str
    seconds: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    errors: int = 0  # wrk's socket errors and timeouts
    rps: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    app_rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds of load so far, bytes)
    tree_rss: list[int] = field(default_factory=list)

    def growth(self) -> float:
        """Growth of the app process's RSS from the first sample past 60 s of load to the last."""
        settled = next((rss for t, rss in self.app_rss if t >= 60), self.app_rss[0][1])
        return self.app_rss[-1][1] / settled - 1

    def slope_mb_per_min(self) -> float:
        """Least-squares slope of the app process's RSS over the second half of the soak."""
        half = [(t, rss / MB) for t, rss in self.app_rss if t >= self.seconds / 2]
        if len(half) < 2:
            return 0.0
        return float(statistics.linear_regression([t for t, _ in half], [r for _, r in half]).slope) * 60


def serve(s: Stack, server: str) -> Served:
    port = free_port()
    argv = s.flashsale("serve", "--server", server, "--port", str(port), "--workers", "1")
    proc = s.spawn(server, argv, SERVICE_ENV)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/readyz", proc)
    return Served(server, url, proc, Sales(s, url, f"{server}-{secrets.token_hex(3)}"))


def rounds(servers: dict[str, Served], args: argparse.Namespace) -> list[tuple[int, str, str, Result]]:
    """(round, route, server, result), each route's servers in turn, the order reversed each round."""
    out: list[tuple[int, str, str, Result]] = []
    for n in range(1, args.rounds + 1):
        order = SERVERS if n % 2 else SERVERS[::-1]
        print(f"round {n} of {args.rounds}", flush=True)
        for route, title in ROUTES.items():
            for name in order:
                r = servers[name].sales.row(route, args, f"{title}, {name}, round {n}")
                out.append((n, route, name, r))
    return out


def soak_slice(s: Stack, one: Served, args: argparse.Namespace, soak: Soak, started: float) -> None:
    path = f"/v1/sales/{one.sales.big}/reservations"
    users = f"s{one.name[0]}{secrets.token_hex(3)}-"  # new users in every slice
    r = wrk(
        f"soak {one.name}",
        one.url + path,
        args,
        args.slice,
        script=(str(RESERVE_LUA), path, SKU, s.store_key, users),
    )
    soak.seconds += args.slice
    soak.requests += r.requests
    soak.non_2xx += r.non_2xx
    soak.errors += r.socket_errors
    soak.rps.append(r.rps)
    soak.p99.append(r.p99_ms)
    app, tree = one.memory()
    soak.app_rss.append((soak.seconds, app))
    soak.tree_rss.append(tree)
    print(
        f"  [{time.monotonic() - started:6.0f} s] {one.name:<7} {soak.seconds:5.0f} s of load: {r.rps:7,.0f} req/s,"
        f" p99 {r.p99_ms:6.1f} ms, non-2xx {r.non_2xx}, app RSS {app / MB:6.1f} MB, tree {tree / MB:6.1f} MB",
        flush=True,
    )


def soaks(s: Stack, servers: dict[str, Served], args: argparse.Namespace) -> dict[str, Soak]:
    order = ("granian", "uvicorn")  # the candidate first: it gets its soak even if the run is cut short
    out = {name: Soak(name) for name in order}
    slices = max(1, round(args.soak / args.slice))
    started = time.monotonic()
    print(f"soak: {slices} slices of {args.slice:g} s of reserves on each server", flush=True)
    if args.interleave:
        for _ in range(slices):
            for name in order:
                soak_slice(s, servers[name], args, out[name], started)
    else:
        for name in order:
            for _ in range(slices):
                soak_slice(s, servers[name], args, out[name], started)
    return out


def round_table(results: list[tuple[int, str, str, Result]], args: argparse.Namespace) -> tuple[str, float]:
    """The rounds' table, and the median of the per-round granian/uvicorn ratios of the reserve route."""
    lines = [
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s after a {args.warmup:g} s warm-up,"
        " one worker each, both servers up, the persister running; the order alternates by round",
        "",
        "| round | route | uvicorn req/s | uvicorn p99 ms | granian req/s | granian p99 ms | granian / uvicorn |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    got = {(n, route, name): r for n, route, name, r in results}
    medians: dict[str, float] = {}
    for route, title in ROUTES.items():
        ratios = []
        for n in range(1, args.rounds + 1):
            u, g = got[(n, route, "uvicorn")], got[(n, route, "granian")]
            ratio = g.rps / (u.rps or 1)
            ratios.append(ratio)
            errs = "".join(
                f" ({x.label.split(',')[1].strip()}: {x.non_2xx} non-2xx, {x.socket_errors} socket errors)"
                for x in (u, g)
                if x.non_2xx or x.socket_errors
            )
            lines.append(
                f"| {n} | {title} | {u.rps:,.0f} | {u.p99_ms:.1f} | {g.rps:,.0f} | {g.p99_ms:.1f} |"
                f" {ratio:.2f}x{errs} |"
            )
        medians[route] = statistics.median(ratios)
        u_med = statistics.median(got[(n, route, "uvicorn")].rps for n in range(1, args.rounds + 1))
        g_med = statistics.median(got[(n, route, "granian")].rps for n in range(1, args.rounds + 1))
        lines.append(f"| median | {title} | {u_med:,.0f} | | {g_med:,.0f} | | {medians[route]:.2f}x |")
    return "\n".join(lines), medians["b"]


def soak_table(done: dict[str, Soak], args: argparse.Namespace) -> str:
    how = "alternating slices" if args.interleave else "granian's soak, then uvicorn's"
    lines = [
        f"Soak: {args.soak:g} s of reserves on each server ({how}), wrk -t{args.threads} -c{args.connections}"
        f" in {args.slice:g} s slices, RSS after every slice",
        "",
        "| server | load s | requests | mean req/s | worst slice p99 ms | non-2xx / errors | app RSS first"
        " / at 60 s / last / max MB | growth after 60 s | last-half slope MB/min | tree RSS first / last MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for soak in done.values():
        if not soak.app_rss:
            continue
        app = [rss for _, rss in soak.app_rss]
        at60 = next((rss for t, rss in soak.app_rss if t >= 60), app[0])
        lines.append(
            f"| {soak.server} | {soak.seconds:.0f} | {soak.requests:,} | {statistics.mean(soak.rps):,.0f} |"
            f" {max(soak.p99):.1f} | {soak.non_2xx} / {soak.errors} |"
            f" {app[0] / MB:.1f} / {at60 / MB:.1f} / {app[-1] / MB:.1f} / {max(app) / MB:.1f} |"
            f" {soak.growth():+.1%} | {soak.slope_mb_per_min():+.2f} |"
            f" {soak.tree_rss[0] / MB:.1f} / {soak.tree_rss[-1] / MB:.1f} |"
        )
    return "\n".join(lines)


def verdict(reserve_ratio: float, done: dict[str, Soak]) -> str:
    g = done.get("granian")
    flat = g is not None and bool(g.app_rss) and g.growth() <= FLAT
    fast = reserve_ratio >= BAR
    memory = "not soaked" if g is None or not g.app_rss else f"{g.growth():+.1%} after the first minute"
    decision = "granian can become the default" if fast and flat else "uvicorn stays the default"
    return (
        f"Verdict: reserve route granian/uvicorn {reserve_ratio:.2f}x (bar {BAR:.1f}x: {'met' if fast else 'not met'}),"
        f" granian's memory {memory} ({'flat' if flat else 'not flat'}, bar {FLAT:.0%}): {decision}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/granian_soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1 leaves the other core to the server)")
    parser.add_argument("--soak", type=float, default=600.0, help="seconds of reserve load on each server; 0: none")
    parser.add_argument("--slice", type=float, default=10.0, help="seconds of each wrk run of the soak")
    parser.add_argument("--interleave", action="store_true", help="alternate the soak's slices between the servers")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk")
        return 1
    try:
        import granian  # noqa: F401
    except ImportError:
        print("granian is not installed: pip install 'flashsale[granian]'")
        return 1
    interrupt_on_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPORTS / f"granian-soak-{stamp}.md"
    done: dict[str, Soak] = {}
    try:
        with stack(REPORTS / f"granian-soak-{stamp}.service.log") as s:
            s.start_worker()
            servers = {name: serve(s, name) for name in SERVERS}
            print("  ".join(f"{one.name} on {one.url}" for one in servers.values()), flush=True)
            results = rounds(servers, args)
            if args.soak > 0:
                done = soaks(s, servers, args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything started here is stopped")
        return 130
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError, httpx.HTTPError, psutil.Error) as exc:
        print(f"bench failed: {exc}")
        return 1
    text, reserve_ratio = round_table(results, args)
    if done:
        text += "\n\n" + soak_table(done, args)
    text += "\n\n" + verdict(reserve_ratio, done)
    out.write_text(text + "\n")
    print()
    print(text)
    print(f"\n(also in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

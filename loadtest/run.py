"""Runs one load-test scenario against the whole service and says PASS or FAIL.

    python -m loadtest.run --scenario flash_crowd --duration 60s --users 2000

Brings up Redis, Postgres (throwaway ones unless REDIS_URL / DATABASE_URL are set), the API and
the persister; runs the scenario's locustfile headless, in one process or with ``--processes N``
in N worker processes and a master; the locustfile creates its sale, records every answer, waits
for the queue to drain and checks the invariants (over the records of every process). Writes
``loadtest/reports/<scenario>-<time>.{html,json,txt,records.json,locust.log,service.log}`` (and
``.records.<pid>.json`` per worker process). The last line
printed is ``PASS`` or ``FAIL: <reasons>``; the exit code agrees (0, 1; 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadtest.scenarios import SCENARIOS
from loadtest.services import ROOT, interrupt_on_signals, stack, stop_process

REPORTS = ROOT / "loadtest" / "reports"


def seconds(span: str) -> float:
    """A locust time span ("90", "60s", "2m", "1h30m") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", span.strip())
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"{span!r} is not a time span like 60s, 2m or 1h30m")
    h, m, s = (int(g or 0) for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="flash_crowd")
    parser.add_argument("--duration", default="60s", help="how long the load runs (locust -t), e.g. 60s, 2m")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--spawn-rate", type=float, default=0.0, help="users started per second (default: scenario)")
    parser.add_argument("--serve-workers", type=int, default=int(os.environ.get("LOADTEST_SERVE_WORKERS", "1")))
    parser.add_argument(
        "--processes",
        type=int,
        default=int(os.environ.get("LOADTEST_PROCESSES", "1")),
        help="locust worker processes making the load (locust --processes; default 1: no master, no workers)",
    )
    parser.add_argument("--reports", type=Path, default=REPORTS)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be 1 or more")
    scenario = SCENARIOS[args.scenario]
    run_s = seconds(args.duration)
    rate = args.spawn_rate or max(1.0, args.users / scenario.spawn_seconds)
    prefix = args.reports.resolve() / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    interrupt_on_signals()
    load = f"{args.users} users at {rate:.0f}/s for {run_s:.0f} s"
    load += f" in {args.processes} locust worker processes" if args.processes > 1 else ""
    print(f"{scenario.name}: {scenario.about}; {load}", flush=True)
    locust_exit: int | None = None
    try:
        with stack(prefix.with_suffix(".service.log")) as s:
            s.start_worker()
            s.serve(args.serve_workers)
            print(f"service ready at {s.base_url} (log: {prefix.with_suffix('.service.log')})", flush=True)
            proc = s.spawn(
                "locust",
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(scenario.locustfile),
                    "--headless",
                    "-u",
                    str(args.users),
                    "-r",
                    f"{rate:g}",
                    "-t",
                    f"{run_s:.0f}s",
                    "--host",
                    s.base_url,
                    "--html",
                    str(prefix.with_suffix(".html")),
                    "--only-summary",
                    *(["--processes", str(args.processes)] if args.processes > 1 else []),
                ],
                {"LOADTEST_OUT": str(prefix), "LOADTEST_RUNNER": "1"},
                pipe=True,
            )
            # the load, then drain and checks: bounded all the same
            watchdog = threading.Timer(run_s + 420, stop_process, (proc, 5.0))
            watchdog.start()
            try:
                assert proc.stdout is not None
                with prefix.with_suffix(".locust.log").open("wb") as log:
                    for line in proc.stdout:  # locust's lines carry the progress: show them as they come
                        log.write(line)
                        sys.stdout.write(line.decode(errors="replace"))
                        sys.stdout.flush()
                locust_exit = proc.wait()
            finally:
                watchdog.cancel()
    except KeyboardInterrupt:
        print("\ninterrupted; everything started here is stopped", flush=True)
        print("FAIL: interrupted")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"FAIL: the service could not be run: {exc}")
        return 1
    return _report(prefix, locust_exit, args.processes)


def _report(prefix: Path, locust_exit: int | None, processes: int = 1) -> int:
    verdict_path = prefix.with_suffix(".json")
    if not verdict_path.exists():
        print(f"FAIL: no verdict (locust exited {locust_exit}); see {prefix.with_suffix('.service.log')}")
        return 1
    verdict = json.loads(verdict_path.read_text())
    print()
    print(prefix.with_suffix(".txt").read_text().rstrip().rsplit("\n", 1)[0])
    parts = ",records.<pid>.json" if processes > 1 else ""
    print(f"  reports: {prefix}.{{html,json,txt,records.json{parts},locust.log,service.log}}")
    if verdict["pass"] and locust_exit != 0:
        print(f"FAIL: locust exited {locust_exit} although every invariant held")
        return 1
    print(verdict["last_line"])
    return 0 if verdict["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""`flashsale dev` (what `make run` runs): starts everything, the README's examples work against it
as written, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from flashsale.embedded import free_port
from flashsale.settings import ROOT


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- try-it -->\n```sh\n(.*?)```\n<!-- /try-it -->", text, re.S)
    assert match, "README.md lost its try-it block"
    return match.group(1)


def start_dev(folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`flashsale dev` in ``folder`` (with a .venv there, as after `make run`), once it is up."""
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    dev = subprocess.Popen(
        [sys.executable, "-m", "flashsale", "dev", "--port", str(free_port())],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (folder / ".flashsale-dev.env").exists():
        if dev.poll() is not None or time.monotonic() > deadline:
            os.killpg(dev.pid, signal.SIGINT)
            raise AssertionError("flashsale dev did not come up in 60 s")
        time.sleep(0.2)
    return dev


def run_readme_block(folder: Path, env: dict[str, str]) -> str:
    run = subprocess.run(
        ["bash", "-e", "-c", readme_block()], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_dev_runs_the_readme_examples_and_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    dev = start_dev(tmp_path, env)
    try:
        descendants = psutil.Process(dev.pid).children(recursive=True)
        data_dir = re.search(r"host=(\S+?)'", (tmp_path / ".flashsale-dev.env").read_text())
        assert data_dir, "DATABASE_URL of the embedded Postgres not in .flashsale-dev.env"
        # Postgres is started by pg_ctl and is not our child: find it by its data directory.
        pg = [p for p in psutil.process_iter(["cmdline"]) if data_dir.group(1) in " ".join(p.info["cmdline"] or [])]
        assert pg, "the embedded Postgres is not running"
        out = run_readme_block(tmp_path, env)
        assert '"status":"confirmed"' in out and '"status":"released"' in out and "no differences" in out
        assert out.count('"reservation_id"') >= 4
    finally:
        os.killpg(dev.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        dev.wait(30)
    time.sleep(0.5)
    alive = [p for p in descendants + pg if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"left behind: {[p.cmdline() for p in alive]}"
    assert dev.stdout is not None
    with dev.stdout:
        assert "flashsale is running" in dev.stdout.read()

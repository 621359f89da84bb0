"""Locust, headless, in a process of its own (bench/locustfile.py has the users), and what it
reports: its per-name figures and failures, and the per-request samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


@dataclass
class Entry:
    """locust's figures for one request name (or TTFT / ITL) over the whole run."""

    requests: int
    failures: int
    average_ms: float
    max_ms: float
    percentiles_ms: dict[str, float]  # p50, p95, p99 (locust rounds: 2 significant digits above 100 ms)


@dataclass
class LoadRun:
    exit_code: int
    entries: dict[str, Entry]
    failures: list[dict[str, Any]]  # name, error, occurrences
    samples: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""

    def requests(self, name: str) -> int:
        entry = self.entries.get(name)
        return entry.requests if entry else 0

    @property
    def failure_count(self) -> int:
        return sum(e.failures for e in self.entries.values())


def read_report(path: Path) -> tuple[dict[str, Entry], list[dict[str, Any]], list[dict[str, Any]]]:
    """The --report JSON of bench/locustfile.py: entries by name, failures, samples."""
    data = json.loads(path.read_text())
    entries = {
        name: Entry(**{k: v for k, v in e.items() if k != "method"}) for name, e in data["entries"].items()
    }
    return entries, data["failures"], data["samples"]


def run_locust(
    host: str,
    users: list[str],
    count: int,
    out_dir: Path,
    options: dict[str, str | int | float],
    env: dict[str, str] | None = None,
    run_seconds: float | None = None,
    stop_timeout: int = 60,
) -> LoadRun:
    """`locust --headless` with the user classes `users`, `count` users spawned at once, for
    `run_seconds` (None: until the users quit the run themselves, as JobUser does)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "locust.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host]
    cmd += ["--users", str(count), "--spawn-rate", str(count), "--only-summary"]
    cmd += ["--stop-timeout", f"{stop_timeout}s", "--exit-code-on-error", "1", "--report", str(report)]
    if run_seconds is not None:
        cmd += ["--run-time", f"{int(run_seconds)}s"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += users
    log = out_dir / "locust.log"
    limit = (run_seconds or 3600) + stop_timeout + 120
    with open(log, "wb") as out:
        # LOCUST_* options (keys) come through `env`, not argv: ps shows argv to every local user
        proc = subprocess.run(
            cmd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=limit,
            check=False,
        )
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    if not report.is_file():
        raise RuntimeError(f"locust wrote no report (exit {proc.returncode}):\n{tail}")
    entries, failures, samples = read_report(report)
    return LoadRun(proc.returncode, entries, failures, samples, tail)

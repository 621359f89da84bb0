"""What every benchmark prints and records: a table of ratios, and JSON in bench/results/ with the
machine, the date and the command that produced it."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from server import cpuinfo

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = cpuinfo.field("model name") or platform.processor() or platform.machine()
    import bitsandbytes
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def command() -> str:
    return " ".join([".venv/bin/python -m", sys.modules["__main__"].__spec__.name, *sys.argv[1:]])  # type: ignore[union-attr]


def save(name: str, results: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json: the results plus machine, UTC date and command."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command(),
        "machine": machine(),
        **results,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {path.relative_to(RESULTS.parent.parent)}")
    return path


def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    """A plain text table; floats get 2 decimals (ratios) unless already formatted."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    out = "\n".join(lines)
    print(out)
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def alternated(ways: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each way, the ways alternated round by round after one warm-up call each, so
    that a shared machine's slow spells fall on all of them alike."""
    for fn in ways.values():
        fn()
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(rounds):
        for way, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - t)
    return {w: 1e3 * statistics.median(v) for w, v in times.items()}

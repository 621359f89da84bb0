"""End to end over HTTP: the real `loraplex serve` with 16 imported rank-16 adapters, hit by 64
concurrent streaming chat clients (locust users, bench/locustfile.py's JobUser: request i on adapter
i % 16). Baseline of the same run: a prefix of the same requests sent one at a time (one user).

    .venv/bin/python -m bench.http_e2e [--requests 64 --adapters 16 --max-tokens 64 --sequential 16
                                        --max-num-seqs N --max-loras N --server-threads N]
    .venv/bin/python -m bench.http_e2e --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import live_server, report
from bench.adapters import adapter_set, default_shapes
from bench.loadgen import run_locust

TOPICS = ("dragons", "tea", "rivers", "chess", "volcanoes", "bicycles", "owls", "the moon", "bread")
ASKS = ("Tell me a story about", "Explain", "Write a short poem about", "List three facts about")


def adapter_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("loraplex:adapter_") and ("slot" in line or "cpu_cache" in line)
    }


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency percentiles from locust's per-request samples (bench/locustfile.py):
    wall time from the first request's start to the last one's end."""
    ok = [s for s in samples if s["error"] is None]
    wall = (
        max(s["start"] + s["total"] for s in samples) - min(s["start"] for s in samples) if samples else 0.0
    )
    ttft = [s["ttft"] for s in ok if s["ttft"] is not None] or [0.0]
    gaps = [g for s in ok for g in s["gaps"]] or [0.0]
    totals = [s["total"] for s in ok] or [0.0]
    tokens = sum(s["tokens"] for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_messages": sorted({s["error"] for s in samples if s["error"]})[:5],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **{f"ttft_p{q}_ms": report.percentile(ttft, q) * 1000 for q in (50, 95)},
        **{f"itl_p{q}_ms": report.percentile(gaps, q) * 1000 for q in (50, 95)},
        **{f"total_p{q}_s": report.percentile(totals, q) for q in (50, 95)},
    }


def run(url: str, jobs: list[tuple[str, str]], max_tokens: int, sequential: int, tmp: Path) -> dict[str, Any]:
    # One short request per adapter first, so neither phase pays the disk -> CPU parse.
    for model in sorted({m for m, _ in jobs}):
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).raise_for_status()
    phases: dict[str, Any] = {}
    for name, users, batch in (("sequential", 1, jobs[:sequential]), ("concurrent", len(jobs), jobs)):
        (tmp / f"{name}.json").write_text(json.dumps(batch))
        before = adapter_counters(url)
        load = run_locust(
            url,
            ["JobUser"],
            users,
            tmp / name,
            {"jobs": str(tmp / f"{name}.json"), "max_tokens": max_tokens, "temperature": 0.0},
        )
        phases[name] = summarize(load.samples)
        after = adapter_counters(url)
        phases[name]["adapter_counters"] = {k: after[k] - before.get(k, 0.0) for k in after}
        if len(load.samples) != len(batch):
            raise RuntimeError(f"{name}: {len(load.samples)} of {len(batch)} requests ran:\n{load.log}")
    return phases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=16, help="baseline: this many, one at a time")
    ap.add_argument(
        "--max-num-seqs", type=int, default=64, help="server flag: all 64 clients decode together"
    )
    ap.add_argument(
        "--max-loras", type=int, default=16, help="server flag: every adapter of the run resident"
    )
    ap.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.adapters, args.max_tokens, args.sequential = 8, 4, 8, 4
    extra = ["--max-model-len", "1024", "--kv-cache-tokens", "16384"]
    for flag in ("max_num_seqs", "max_loras"):
        if getattr(args, flag) is not None:
            extra += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    dirs = adapter_set(default_shapes(), args.adapters, args.rank)
    names = [f"p{i:02d}" for i in range(args.adapters)]
    jobs = [
        (names[i % args.adapters], f"{ASKS[i % len(ASKS)]} {TOPICS[i % len(TOPICS)]} (#{i}).")
        for i in range(args.requests)
    ]
    with tempfile.TemporaryDirectory(prefix="loraplex-http-e2e-") as t:
        tmp = Path(t)
        (tmp / "import").mkdir()
        for name, d in zip(names, dirs, strict=True):
            (tmp / "import" / name).symlink_to(d)
        t0 = time.perf_counter()
        server_args = ["--adapters-dir", str(tmp / "store"), "--import-adapters", str(tmp / "import"), *extra]
        server = live_server.start(server_args, tmp, threads=args.server_threads)
        print(f"server ready in {time.perf_counter() - t0:.0f}s (pid {server.pid}, {server.url})")
        try:
            phases = run(server.url, jobs, args.max_tokens, args.sequential, tmp)
        except BaseException:
            print(server.log_tail(), file=sys.stderr)
            raise
        finally:
            server.stop()
    seq, con = phases["sequential"], phases["concurrent"]
    rows: list[list[Any]] = []
    for key, label in (
        ("tokens_per_s", "throughput tok/s"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("ttft_p95_ms", "TTFT p95 ms"),
        ("itl_p50_ms", "ITL p50 ms"),
        ("itl_p95_ms", "ITL p95 ms"),
        ("total_p50_s", "request p50 s"),
        ("total_p95_s", "request p95 s"),
    ):
        rows.append([label, f"{seq[key]:.1f}", f"{con[key]:.1f}", con[key] / seq[key] if seq[key] else "-"])
    for key in ("requests", "tokens", "errors"):
        rows.append([key, seq[key], con[key], "-"])
    report.table(
        f"HTTP streaming chat, {args.adapters} adapters (rank {args.rank}), max_tokens {args.max_tokens}: "
        f"{args.requests} concurrent vs the first {args.sequential} one at a time (ITL: gaps between "
        "content chunks)",
        ["metric", "sequential", "concurrent", "conc/seq"],
        rows,
    )
    print(f"errors: {seq['errors'] + con['errors']}")
    for msg in seq["error_messages"] + con["error_messages"]:
        print(f"  {msg}")
    report.save(
        "http_e2e_quick" if args.quick else "http_e2e",
        {
            "settings": {k: v for k, v in vars(args).items()},
            "server_flags": extra,
            "sequential": seq,
            "concurrent": con,
            "throughput_ratio": con["tokens_per_s"] / seq["tokens_per_s"] if seq["tokens_per_s"] else None,
        },
    )


if __name__ == "__main__":
    main()

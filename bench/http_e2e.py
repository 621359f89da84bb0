"""End to end over HTTP: the real `loraplex serve` with 16 imported rank-16 adapters, hit by 64
concurrent streaming chat clients (the official `openai` AsyncOpenAI client, request i on adapter
i % 16). Baseline of the same run: a prefix of the same requests sent one at a time.

    .venv/bin/python -m bench.http_e2e [--requests 64 --adapters 16 --max-tokens 64 --sequential 16
                                        --max-num-seqs N --max-loras N --server-threads N]
    .venv/bin/python -m bench.http_e2e --quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import torch
from openai import AsyncOpenAI

from bench import report
from bench.adapters import adapter_set
from server.config import default_cache_dir
from server.lora.adapter import LinearShape

TOPICS = ("dragons", "tea", "rivers", "chess", "volcanoes", "bicycles", "owls", "the moon", "bread")
ASKS = ("Tell me a story about", "Explain", "Write a short poem about", "List three facts about")


def model_shapes() -> dict[str, LinearShape]:
    """The LoRA target shapes without loading weights (meta device), named as load_base names them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.model.loader import target_linears
    from server.model.source import resolve_model

    path, _ = resolve_model(None, default_cache_dir())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return {n: LinearShape(m.in_features, m.out_features) for n, m in target_linears(model).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(tmp: Path, port: int, extra: list[str], threads: int | None) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--adapters-dir", str(tmp / "store")]
    cmd += ["--import-adapters", str(tmp / "import"), "--log-level", "warning", *extra]
    # Keys from the caller's environment would close the server to our key-less client.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_") or k == "LORAPLEX_CACHE_DIR"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(tmp / "server.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited during start-up:\n{server_log(tmp)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server did not become ready:\n{server_log(tmp)}")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_log(tmp: Path) -> str:
    return "\n".join((tmp / "server.log").read_text(errors="replace").splitlines()[-30:])


def adapter_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("loraplex:adapter_") and ("slot" in line or "cpu_cache" in line)
    }


@dataclass
class Sample:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between content chunks, after the first
    total: float = 0.0
    tokens: int = 0
    error: str | None = None


async def one(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    s = Sample()
    start = last = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                s.tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if s.ttft == 0.0:
                    s.ttft = now - start
                else:
                    s.gaps.append(now - last)
                last = now
    except openai.APIError as e:
        s.error = f"{type(e).__name__}: {e}"
    s.total = time.perf_counter() - start
    return s


def summarize(samples: list[Sample], wall: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ttft = [s.ttft for s in ok] or [0.0]
    gaps = [g for s in ok for g in s.gaps] or [0.0]
    totals = [s.total for s in ok] or [0.0]
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_messages": sorted({s.error for s in samples if s.error})[:5],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **{f"ttft_p{q}_ms": report.percentile(ttft, q) * 1000 for q in (50, 95)},
        **{f"itl_p{q}_ms": report.percentile(gaps, q) * 1000 for q in (50, 95)},
        **{f"total_p{q}_s": report.percentile(totals, q) for q in (50, 95)},
    }


async def run(url: str, jobs: list[tuple[str, str]], max_tokens: int, sequential: int) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1800)
    try:
        # One short request per adapter first, so neither phase pays the disk -> CPU parse.
        await asyncio.gather(*(one(client, m, "Hi", 1) for m in sorted({m for m, _ in jobs})))
        phases: dict[str, Any] = {}
        for name in ("sequential", "concurrent"):
            before = adapter_counters(url)
            start = time.perf_counter()
            if name == "sequential":
                samples = [await one(client, m, p, max_tokens) for m, p in jobs[:sequential]]
            else:
                samples = list(await asyncio.gather(*(one(client, m, p, max_tokens) for m, p in jobs)))
            phases[name] = summarize(samples, time.perf_counter() - start)
            after = adapter_counters(url)
            phases[name]["adapter_counters"] = {k: after[k] - before.get(k, 0.0) for k in after}
        return phases
    finally:
        await client.close()


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
    dirs = adapter_set(model_shapes(), args.adapters, args.rank)
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
        port = free_port()
        t0 = time.perf_counter()
        proc = start_server(tmp, port, extra, args.server_threads)
        print(f"server ready in {time.perf_counter() - t0:.0f}s (pid {proc.pid}, port {port})")
        try:
            phases = asyncio.run(run(f"http://127.0.0.1:{port}", jobs, args.max_tokens, args.sequential))
        except BaseException:
            print(server_log(tmp), file=sys.stderr)
            raise
        finally:
            stop(proc)
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

"""Adapter churn in-process: many registered adapters, a Zipf-distributed request stream, few device
slots. Measures cold loads (disk -> CPU parse, CPU -> device slot copy, and miss -> resident as a
request sees it), CPU cache and slot hit rates, and throughput against a baseline of the same
stream (same prompts, same token counts) mapped onto max_loras adapters already resident.

    .venv/bin/python -m bench.churn [--adapters 200 --requests 256 --max-tokens 32 --zipf-s 1.1
                                     --max-loras 8 --max-cpu-loras 32 --waves 1 --threads N]
    .venv/bin/python -m bench.churn --quick
"""

from __future__ import annotations

import argparse
import gc
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import report
from bench.adapters import adapter_set
from server.config import EngineConfig, default_cache_dir
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.lora.adapter import AdapterWeights
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import BaseModel, load_base
from server.model.source import resolve_model

TOPICS = ("dragons", "tea", "rivers", "chess", "volcanoes", "bicycles", "owls", "the moon", "bread")
STALL_S = 300.0  # no output for this long means a request is stuck, not slow


class Probe:
    """Wraps one engine's cache and slot table (instance attributes only, server code untouched)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.parse: list[float] = []
        self.write: list[float] = []
        self.cold: list[float] = []  # first cache miss -> written into a slot
        self.missed_at: dict[str, float] = {}
        self.activated = 0  # adapter-steps: every adapter of every step
        cache, slots = engine.cache, engine.slots
        cache.observe_load = self.parse.append
        get, activate, write = cache.get, slots.activate, slots._write
        sync: Callable[[], None] = (
            torch.cuda.synchronize if engine.base.device.type == "cuda" else lambda: None
        )

        def timed_get(record: AdapterRecord) -> AdapterWeights | None:
            weights = get(record)
            if weights is None:
                self.missed_at.setdefault(record.version, time.perf_counter())
            return weights

        def timed_write(slot: int, weights: AdapterWeights) -> None:
            start = time.perf_counter()
            write(slot, weights)
            sync()  # the copy is asynchronous on CUDA
            self.write.append(time.perf_counter() - start)

        def timed_activate(needed: dict[str, AdapterWeights]) -> dict[str, int]:
            self.activated += len(needed)
            result = activate(needed)
            now = time.perf_counter()
            for key in needed:
                if key in self.missed_at:
                    self.cold.append(now - self.missed_at.pop(key))
            return result

        setattr(cache, "get", timed_get)  # noqa: B010 - mypy refuses assigning to a method
        setattr(slots, "activate", timed_activate)  # noqa: B010
        setattr(slots, "_write", timed_write)  # noqa: B010


def zipf_stream(n_adapters: int, n_requests: int, s: float, seed: int) -> list[int]:
    weights = [1.0 / (k + 1) ** s for k in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n_requests)


def drive(engine: LLMEngine, waves: list[list[Sequence]]) -> tuple[float, int, int, int]:
    """Submit each wave once the previous one drained; returns (seconds, tokens, errors, steps)."""
    tokens = errors = 0
    steps0 = engine.step_count  # forward passes only; idle turns while loads run are not steps
    wake = threading.Event()
    engine.cache.on_loaded = wake.set
    start = last_progress = time.perf_counter()
    for wave in waves:
        for seq in wave:
            engine.add_request(seq)
        while engine.has_work():
            wake.clear()
            outputs = engine.step()
            if not outputs and not engine.scheduler.running:
                # As the server's engine loop does: sleep until any one load lands, not all of them.
                wake.wait(timeout=0.5)
            for o in outputs:
                errors += o.error is not None
                tokens += len(o.token_ids)
            now = time.perf_counter()
            if outputs:
                last_progress = now
            elif now - last_progress > STALL_S:
                stuck = [
                    (s.request_id, s.adapter.name if s.adapter else None) for s in engine.scheduler.waiting
                ]
                raise RuntimeError(f"no progress for {STALL_S:.0f}s; waiting: {stuck[:10]}")
    return time.perf_counter() - start, tokens, errors, engine.step_count - steps0


def run(
    base: BaseModel,
    registry: AdapterRegistry,
    args: argparse.Namespace,
    adapters: list[AdapterRecord],
    prompts: list[list[int]],
    preload: dict[str, AdapterWeights] | None = None,
) -> dict[str, Any]:
    config = EngineConfig(
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=args.rank,
        max_num_seqs=args.max_num_seqs,
        max_model_len=base.max_model_len,
        kv_cache_tokens=max(8192, base.max_model_len),
    )
    engine = LLMEngine(base, registry, config)
    if preload:
        for key, weights in preload.items():
            engine.cache.put(key, weights)
        engine.slots.activate(preload)
    probe = Probe(engine)
    engine.slots.loads = 0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    seqs = [
        Sequence(f"r{i}", list(p), params, adapter=a, eos_token_ids=base.eos_token_ids)
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    ]
    per_wave = -(-len(seqs) // args.waves)
    seconds, tokens, errors, steps = drive(
        engine, [seqs[i : i + per_wave] for i in range(0, len(seqs), per_wave)]
    )
    lookups = engine.cache.hits + engine.cache.misses
    result = {
        "seconds": seconds,
        "tokens": tokens,
        "errors": errors,
        "steps": steps,
        "tokens_per_s": tokens / seconds,
        "step_ms": seconds / max(steps, 1) * 1000,
        "distinct_adapters": len({a.version for a in adapters}),
        "cpu_hits": engine.cache.hits,
        "cpu_misses": engine.cache.misses,
        "cpu_hit_rate": engine.cache.hits / lookups if lookups else 1.0,
        "slot_loads": engine.slots.loads,
        "slot_evictions": engine.slots.evictions,
        "slot_hit_rate_per_request": 1 - engine.slots.loads / len(seqs),
        "slot_hit_rate_per_adapter_step": 1 - engine.slots.loads / max(probe.activated, 1),
        "latency_ms": {k: stats_ms(getattr(probe, k)) for k in ("parse", "write", "cold")},
    }
    engine.cache.close()
    return result


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), **{f"p{q}": report.percentile(values, q) * 1000 for q in (50, 95)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=None, help="registered adapters (200; quick 20)")
    ap.add_argument("--requests", type=int, default=None, help="requests in the stream (256; quick 24)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (32; quick 8)")
    ap.add_argument("--max-loras", type=int, default=None, help="device slots (8; quick 4)")
    ap.add_argument("--max-cpu-loras", type=int, default=None, help="CPU LRU size (32; quick 8)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--waves", type=int, default=1, help="1 = every request arrives at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args()
    full = {"adapters": 200, "requests": 256, "max_tokens": 32, "max_loras": 8, "max_cpu_loras": 32}
    quick = {"adapters": 20, "requests": 24, "max_tokens": 8, "max_loras": 4, "max_cpu_loras": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, spinning OpenMP threads cost far more
    path, model_id = resolve_model(None, default_cache_dir())
    base = load_base(path, model_id, device=args.device, max_loras=args.max_loras, max_lora_rank=args.rank)
    registry = AdapterRegistry(base.linear_shapes, args.rank)
    t0 = time.perf_counter()
    # bf16 on disk halves the files (the loader casts to the compute dtype anyway).
    dirs = adapter_set(base.linear_shapes, args.adapters, args.rank, dtype=torch.bfloat16)
    records: list[AdapterRecord] = []
    resident: dict[str, AdapterWeights] = {}
    for i, d in enumerate(dirs):
        record, weights = registry.add_dir(f"a{i:04d}", d)
        records.append(record)
        if i < args.max_loras:  # the Zipf head: the baseline serves the whole stream from these
            resident[record.version] = weights
        del weights  # 200 parsed fp32 adapters would not fit next to the model
    print(f"{len(records)} adapters ready in {time.perf_counter() - t0:.0f}s")

    ranks = zipf_stream(args.adapters, args.requests, args.zipf_s, args.seed)
    prompts = [
        base.chat_ids([{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}, part {i}."}])
        for i in range(args.requests)
    ]
    # Warm-up on the resident set: first-call costs must not land on either measured run.
    warm = argparse.Namespace(**{**vars(args), "max_tokens": 2, "waves": 1})
    run(base, registry, warm, [records[r % args.max_loras] for r in ranks[:8]], prompts[:8], resident)
    baseline = run(base, registry, args, [records[r % args.max_loras] for r in ranks], prompts, resident)
    resident.clear()
    gc.collect()
    churn = run(base, registry, args, [records[r] for r in ranks], prompts)

    rows: list[list[Any]] = []
    for key, label in (("tokens_per_s", "throughput tok/s"), ("seconds", "wall s"), ("step_ms", "step ms")):
        rows.append([label, f"{baseline[key]:.1f}", f"{churn[key]:.1f}", churn[key] / baseline[key]])
    for key in ("tokens", "errors", "steps", "distinct_adapters", "slot_loads", "cpu_misses"):
        rows.append([key, baseline[key], churn[key], "-"])
    for key in ("cpu_hit_rate", "slot_hit_rate_per_request", "slot_hit_rate_per_adapter_step"):
        rows.append([key, f"{baseline[key]:.3f}", f"{churn[key]:.3f}", "-"])
    report.table(
        f"adapter churn: {args.requests} requests x {args.max_tokens} tokens, Zipf s={args.zipf_s} over "
        f"{args.adapters} adapters (rank {args.rank}, bf16 on disk), max_loras {args.max_loras}, "
        f"max_cpu_loras {args.max_cpu_loras}, max_num_seqs {args.max_num_seqs}, {args.waves} wave(s); "
        f"baseline: same stream on {args.max_loras} resident adapters",
        ["metric", "baseline", "churn", "churn/base"],
        rows,
    )
    labels = {"parse": "disk -> CPU (parse)", "write": "CPU -> slot (copy)", "cold": "miss -> in slot"}
    lat = churn["latency_ms"]
    report.table(
        "cold loads in the churn run (ms; last column: p50 over the baseline's mean step time)",
        ["stage", "n", "p50 ms", "p95 ms", "p50/step"],
        [
            [
                label,
                lat[k]["n"],
                f"{lat[k]['p50']:.1f}",
                f"{lat[k]['p95']:.1f}",
                lat[k]["p50"] / baseline["step_ms"],
            ]
            if lat[k]["n"]
            else [label, 0, "-", "-", "-"]
            for k, label in labels.items()
        ],
    )
    report.save(
        "churn_quick" if args.quick else "churn",
        {
            "settings": vars(args),
            "baseline": baseline,
            "churn": churn,
            "throughput_ratio": churn["tokens_per_s"] / baseline["tokens_per_s"],
        },
    )


if __name__ == "__main__":
    main()

"""Decode-step cost at batch 16 on the default model in NF4: base only vs 1, 4 and 16 distinct
rank-16 adapters on all seven projections. Prints ratios against the base-only step of the same run.

    .venv/bin/python bench/step_overhead.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from server.config import EngineConfig, default_cache_dir
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.lora.adapter import AdapterWeights, ConfigReport, LinearShape, ModuleLoRA
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import load_base
from server.model.source import resolve_model

BATCH = 16
RANK = 16


def random_adapter(shapes: dict[str, LinearShape], seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: ModuleLoRA(
            A=torch.randn(RANK, s.in_features, generator=g) * 0.01,
            B=torch.randn(s.out_features, RANK, generator=g) * 0.01,
            scale=2.0,
        )
        for name, s in shapes.items()
    }
    return AdapterWeights(modules=modules, report=ConfigReport())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    path, model_id = resolve_model(None, default_cache_dir())
    base = load_base(path, model_id, quantization="nf4", device="cpu", max_loras=16, max_lora_rank=RANK)
    registry = AdapterRegistry(base.linear_shapes, RANK)
    records = [AdapterRecord(f"a{i}", f"v{i}", Path("."), RANK, (), 0, ConfigReport()) for i in range(16)]
    prompt = base.tokenizer.encode("Tell me a long story about a dragon and a knight.")
    results: dict[str, float] = {}
    for distinct in (0, 1, 4, 16):
        engine = LLMEngine(
            base,
            registry,
            EngineConfig(max_loras=16, max_lora_rank=RANK, max_model_len=1024, kv_cache_tokens=16384),
        )
        for i, r in enumerate(records):
            engine.cache.put(r.version, random_adapter(base.linear_shapes, i))
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        for i in range(BATCH):
            adapter = records[i % distinct] if distinct else None
            engine.add_request(Sequence(f"r{i}", list(prompt), params, adapter=adapter))
        for _ in range(3):  # prefill + warm-up
            engine.step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        results[f"{distinct} adapters"] = statistics.median(times)
    base_t = results["0 adapters"]
    print(f"decode step, batch {BATCH}, NF4, rank {RANK}, all 7 projections (median of {args.steps})")
    print(f"{'':<12} {'ms':>8} {'x base':>8}")
    for k, v in results.items():
        print(f"{k:<12} {v * 1000:8.1f} {v / base_t:8.2f}")
    out = Path(__file__).parent / "results" / "step_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({k: {"ms": v * 1000, "ratio": v / base_t} for k, v in results.items()}, indent=2)
    )


if __name__ == "__main__":
    main()

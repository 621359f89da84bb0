"""The workload both throughput benchmarks share: the default model in NF4 as the server loads it,
real chat prompts through the chat template, random rank-16 adapters on all seven projections,
and a synchronous driver of the engine with optional arrival times."""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.adapters import adapter_set
from server.config import EngineConfig, default_cache_dir
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.lora.adapter import AdapterWeights
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import BaseModel, load_base, load_stock
from server.model.source import resolve_model

RANK = 16

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for a good night's sleep.",
    "How does a bicycle stay upright?",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "Why is the sky blue?",
    "How do I make a cup of green tea?",
    "Summarize the plot of Romeo and Juliet.",
    "What are prime numbers? Give a few examples.",
    "Suggest a name for a friendly robot.",
    "How do vaccines work?",
    "What should I pack for a weekend hiking trip?",
    "Explain what a black hole is.",
    "Tell me a fun fact about octopuses.",
    "How can I improve my handwriting?",
    "What is the Pythagorean theorem?",
    "Describe a typical day of a medieval blacksmith.",
    "Why do cats purr?",
    "What is recursion in programming?",
    "How do airplanes fly?",
    "Recommend a hobby for someone who likes puzzles.",
    "What causes the seasons on Earth?",
    "Write a two-sentence story about a lost key.",
]


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def model_path() -> tuple[Path, str]:
    return resolve_model(None, default_cache_dir())


def load(
    max_loras: int,
    lora_dtype: torch.dtype = torch.float32,
    lora_backend: str = "auto",
    dequant: str | None = None,
) -> BaseModel:
    """The base exactly as the server loads it, with `max_loras` device slots of rank RANK (factors
    in `lora_dtype`: --lora-dtype) and the LoRA backend `lora_backend` (auto: the server's default
    for this device, resolved by select_backends); `dequant` None: the server's NF4 dequantization."""
    from transformers.utils import logging

    from server.engine.backends import select_backends

    if lora_backend == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        lora_backend = select_backends(device).lora
    logging.disable_progress_bar()  # one bar per load would bury the tables
    path, model_id = model_path()
    return load_base(
        path, model_id, quantization="nf4", device="auto", max_loras=max_loras, max_lora_rank=RANK,
        lora_dtype=lora_dtype, lora_backend=lora_backend, dequant=dequant,
    )  # fmt: skip


def kernel_base() -> tuple[BaseModel, list[torch.nn.Linear], torch.nn.Linear]:
    """The base as the server loads it with our CPU kernels (`dequant` cpp), its NF4 projections
    and its lm_head; exits where those kernels do not take them (no AVX2 build, not NF4/fp32)."""
    from server.model.base_gemm import CPP_DENSE, CPP_MATMUL

    base = load(max_loras=1, dequant="cpp")
    linears: list[torch.nn.Linear] = [layer.base for layer in base.lora_layers.values()]
    head = base.model.lm_head
    if not all(getattr(m, CPP_MATMUL, False) for m in linears):
        raise SystemExit("nf4_cpu.matmul does not take this base here (no AVX2 build, or not NF4 on CPU)")
    if not getattr(head, CPP_DENSE, False):
        raise SystemExit("dense_cpu.matmul does not take this lm_head here (no AVX2 build, or not fp32)")
    return base, linears, head


def chat_ids(base: BaseModel, count: int) -> list[list[int]]:
    """`count` chat prompts cycling through QUESTIONS, rendered by the model's chat template."""
    return [base.chat_ids([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(count)]


def register(
    base: BaseModel, count: int, rank: int = RANK
) -> tuple[AdapterRegistry, list[AdapterRecord], list[AdapterWeights], list[Path]]:
    """`count` random adapters registered the way the server does (add_dir: validated, versioned)."""
    registry = AdapterRegistry(base.linear_shapes, rank, factor_dtype=base.lora_dtype)
    dirs = adapter_set(base.linear_shapes, count, rank)
    records, weights = [], []
    for i, d in enumerate(dirs):
        record, w = registry.add_dir(f"a{i}", d)
        records.append(record)
        weights.append(w)
    return registry, records, weights, dirs


def engine(
    base: BaseModel,
    registry: AdapterRegistry,
    *,
    max_loras: int,
    max_num_seqs: int,
    preload: Sequence_[tuple[AdapterRecord, AdapterWeights]] = (),
    kv_cache_tokens: int = 8192,
) -> LLMEngine:
    """A fresh engine whose CPU tier already holds `preload`: the benchmarks time batching, not disk
    reads (the PEFT baselines also have every adapter in memory before timing starts)."""
    gc.collect()
    config = EngineConfig(
        max_loras=max_loras,
        max_cpu_loras=max(32, max_loras, len(preload)),
        max_lora_rank=RANK,
        max_num_seqs=max_num_seqs,
        max_model_len=1024,
        kv_cache_tokens=kv_cache_tokens,
    )
    eng = LLMEngine(base, registry, config)
    for record, weights in preload:
        eng.cache.put(record.version, weights)
    return eng


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def decoding(eng: LLMEngine, prompt: list[int], adapters: Sequence_[AdapterRecord | None]) -> None:
    """One greedy request of `prompt` per entry of `adapters` (None: the base), that never ends,
    stepped through its prefill: every step after this is a decode step of them all."""
    for i, adapter in enumerate(adapters):
        eng.add_request(Sequence(f"r{i}", list(prompt), greedy(10_000), adapter=adapter))
    while len(eng.scheduler.running) < len(adapters) or any(
        s.num_uncomputed > 1 for s in eng.scheduler.running
    ):
        eng.step()


@dataclass
class Run:
    seconds: float
    tokens: dict[str, list[int]]
    latency: dict[str, float] = field(default_factory=dict)  # arrival -> last token

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens.values())


Job = tuple[str, AdapterRecord | None, list[int]]


def drive(eng: LLMEngine, jobs: Sequence_[Job], max_tokens: int, arrivals: list[float] | None = None) -> Run:
    """Run every job to completion. With `arrivals` (seconds from the start, ascending), a job is
    added once the wall clock passes its time, checked between steps, as the server's engine loop
    drains its inbox between steps."""
    times = arrivals or [0.0] * len(jobs)
    pending = sorted(zip(times, jobs, strict=True), key=lambda p: p[0])
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in jobs}
    arrived: dict[str, float] = {}
    latency: dict[str, float] = {}
    start = time.perf_counter()
    while pending or eng.has_work():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, (rid, adapter, ids) = pending.pop(0)
            arrived[rid] = at
            seq = Sequence(rid, list(ids), greedy(max_tokens), adapter, eos_token_ids=eng.base.eos_token_ids)
            eng.add_request(seq)
        if not eng.has_work():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        outputs = eng.step()
        if not outputs and not eng.scheduler.running:
            eng.cache.wait_for_loads(timeout=0.05)
        for o in outputs:
            if o.error is not None:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            tokens[o.request_id].extend(o.token_ids)
            if o.finished:
                latency[o.request_id] = time.perf_counter() - start - arrived[o.request_id]
    seconds = time.perf_counter() - start
    short = [rid for rid, t in tokens.items() if len(t) != max_tokens]
    assert not short, f"requests without exactly {max_tokens} tokens: {short}"
    return Run(seconds, tokens, latency)


def peft_model(dirs: list[Path], pad_id: int) -> Any:
    """PEFT on the same NF4 base (stock transformers) with every adapter of `dirs` loaded as a0, a1, ..."""
    from peft import PeftModel

    path, _ = model_path()
    stock = load_stock(path, "nf4")
    # generate() fills an unset eos_token_id from the model's config; clearing it there is the only
    # way to get exactly max_new_tokens per request, like ignore_eos on our side.
    stock.generation_config.eos_token_id = None
    stock.generation_config.pad_token_id = pad_id
    model = PeftModel.from_pretrained(stock, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model.eval()

"""Greedy generation through our own engine, driven synchronously (no server, no engine thread):
the base model (and registered adapters) answer many prompts in shared batches."""

from __future__ import annotations

from collections.abc import Sequence as Sequence_
from pathlib import Path

from server.config import EngineConfig, Settings
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import BaseModel, load_base
from server.model.source import resolve_model

Job = tuple[str, AdapterRecord | None, list[dict[str, str]]]


def build_engine(settings: Settings, max_loras: int = 8, max_rank: int = 16) -> LLMEngine:
    """The base as the server loads it, with a store-less registry (adapters served in place)."""
    path, model_id = resolve_model(settings.model, settings.cache_dir)
    base: BaseModel = load_base(
        path,
        model_id,
        quantization=settings.quantization,
        device=settings.device,
        dtype=settings.dtype,
        max_loras=max_loras,
        max_lora_rank=max_rank,
        max_model_len=2048,
    )
    config = EngineConfig(
        max_loras=max_loras,
        max_cpu_loras=max(32, max_loras),
        max_lora_rank=max_rank,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=base.max_model_len,
    )
    return LLMEngine(
        base, AdapterRegistry(base.linear_shapes, max_rank, factor_dtype=base.lora_dtype), config
    )


def register_dir(engine: LLMEngine, name: str, directory: Path) -> AdapterRecord:
    return engine.registry.add_dir(name, directory)[0]


def generate(engine: LLMEngine, jobs: Sequence_[Job], max_tokens: int) -> dict[str, str]:
    """Greedy chat completions for every job (request id, adapter or None, messages), all submitted
    at once so requests for different adapters share decode steps. Returns id -> text."""
    for rid, adapter, messages in jobs:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.add_request(
            Sequence(
                rid, engine.base.chat_ids(messages), params, adapter, eos_token_ids=engine.base.eos_token_ids
            )
        )
    text: dict[str, list[str]] = {rid: [] for rid, _, _ in jobs}
    while engine.has_work():
        outputs = engine.step()
        if not outputs and not engine.scheduler.running:
            engine.cache.wait_for_loads(timeout=60)  # waiting requests need an adapter from disk
        for o in outputs:
            if o.error is not None:
                raise RuntimeError(f"request {o.request_id} failed: {o.error}")
            text[o.request_id].append(o.text)
    return {rid: "".join(parts).strip() for rid, parts in text.items()}

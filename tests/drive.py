"""Driving an LLMEngine synchronously in tests."""

from __future__ import annotations

from collections.abc import Sequence as Sequence_

from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.lora.registry import AdapterRecord


def greedy(
    engine: LLMEngine, jobs: Sequence_[tuple[str, AdapterRecord | None, list[int]]], max_tokens: int = 32
) -> dict[str, list[int]]:
    """Submit every job at once, run to completion, return each request's tokens."""
    for rid, adapter, ids in jobs:
        engine.add_request(
            Sequence(
                rid,
                list(ids),
                SamplingParams(max_tokens=max_tokens, temperature=0.0),
                adapter=adapter,
                eos_token_ids=engine.base.eos_token_ids,
            )
        )
    out: dict[str, list[int]] = {rid: [] for rid, _, _ in jobs}
    finished: set[str] = set()
    while engine.has_work():
        outputs = engine.step()
        if not outputs and not engine.scheduler.running:
            engine.cache.wait_for_loads(timeout=60)  # waiting requests need an adapter from disk
        for o in outputs:
            assert o.error is None, o.error
            out[o.request_id].extend(o.token_ids)
            if o.finished:
                finished.add(o.request_id)
    assert finished == set(out), f"unfinished: {set(out) - finished}"
    return out

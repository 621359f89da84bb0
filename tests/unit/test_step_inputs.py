"""StepInputs (numpy, context slots kept between steps) against a plain Python reference built from
the block tables every step, through chunked prefill, decode, finishing and preemption."""

from __future__ import annotations

import types

import numpy as np
import torch

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.engine.step_inputs import StepInputBuilder, decode_contexts, slots_of


class Gate:
    def ready(self, seq: Sequence) -> bool:
        return True

    def saved_bytes(self, seq: Sequence) -> int:
        return 0

    def acquire(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


def reference(step: SchedulerOutput, blocks: BlockManager, slot_of: dict[str, int]) -> dict[str, object]:
    """What the model runner used to build: every list from the block table, token by token."""
    ids, positions, mapping, decode_context, prefill_context, decode_slots = [], [], [], [], [], []
    for seq in step.decode:
        pos = seq.num_computed_tokens
        ids.append(seq.token_ids[pos])
        positions.append(pos)
        mapping += blocks.slots(seq, pos, pos + 1)
        decode_context.append(blocks.slots(seq, 0, pos + 1))
        decode_slots.append(slot_of.get(seq.adapter_key or "", 0))
    for seq, n in step.prefill:
        pos = seq.num_computed_tokens
        ids += seq.token_ids[pos : pos + n]
        positions += range(pos, pos + n)
        mapping += blocks.slots(seq, pos, pos + n)
        prefill_context.append(blocks.slots(seq, 0, pos + n))
    return {
        "ids": ids,
        "positions": positions,
        "mapping": mapping,
        "decode_context": decode_context,
        "prefill_context": prefill_context,
        "decode_slots": decode_slots,
    }


def test_slots_of_matches_block_manager() -> None:
    blocks = BlockManager(64, 4)
    seq = Sequence("s", list(range(1, 30)), SamplingParams())
    seq.block_table = [9, 3, 27, 1, 40, 8, 2, 5]
    for start, end in [(0, 29), (5, 6), (12, 17), (28, 29)]:
        assert slots_of(seq.block_table, 4, start, end).tolist() == blocks.slots(seq, start, end)


def test_step_inputs_match_reference_through_preemption() -> None:
    cfg = EngineConfig(
        max_num_batched_tokens=12, prefill_chunk_tokens=8, max_model_len=64, kv_cache_tokens=4096
    )
    blocks = BlockManager(14, 4)  # tight: long sequences preempt each other
    sched = Scheduler(cfg, blocks, Gate())
    builder = StepInputBuilder(4)
    lean = StepInputBuilder(4, contexts=False)  # flex's: block tables only, no context slot lists
    # a prompt-tuned adapter: its sequences carry 3 virtual positions (placeholder id 0) first
    adapter = types.SimpleNamespace(name="a", version="a", virtual_tokens=3)
    seqs = [
        Sequence(
            f"r{i}",
            list(range(1, n + 1)),
            SamplingParams(max_tokens=16, ignore_eos=True),
            adapter=adapter if i % 2 else None,  # type: ignore[arg-type]
        )
        for i, n in enumerate([19, 5, 11, 3])
    ]
    for s in seqs:
        sched.add(s)
    slot_of: dict[str, int] = {"a": 3}
    preempted = steps = 0
    while sched.has_work() and steps < 500:
        out = sched.schedule()
        preempted += len(out.preempted)
        for seq in out.preempted:
            if steps % 2:  # forgotten or not, a preempted sequence's slots must be rebuilt
                builder.forget(seq.request_id)
        got = builder.build(out, slot_of)
        want = reference(out, blocks, slot_of)
        assert got.input_ids.tolist() == want["ids"]
        assert got.positions.tolist() == want["positions"]
        assert got.slot_mapping.tolist() == want["mapping"]
        assert [c.tolist() for c in got.decode_context] == want["decode_context"]
        assert [p.context.tolist() for p in got.prefills] == want["prefill_context"]
        assert got.decode_adapter_slots == want["decode_slots"]
        assert got.segments == [(p.start, p.start + p.length, 3) for p in got.prefills if p.seq.adapter]
        rows = list(range(len(out.decode)))
        for p in got.prefills:
            if p.seq.num_computed_tokens + p.length == p.seq.num_tokens:
                rows.append(p.start + p.length - 1)
        assert got.sample_rows == rows
        thin = lean.build(out, slot_of)
        for name in ("input_ids", "positions", "slot_mapping"):
            assert getattr(thin, name).tolist() == getattr(got, name).tolist(), name
        assert (thin.decode_context, thin.num_decode) == ((), len(out.decode))
        assert [(p.start, p.length, p.context.size) for p in thin.prefills] == [
            (p.start, p.length, 0) for p in got.prefills
        ]
        assert (thin.decode_adapter_slots, thin.segments) == (got.decode_adapter_slots, got.segments)
        assert (thin.sample_rows, thin.sampling) == (got.sample_rows, got.sampling)
        # what the engine does after the forward
        for seq in out.decode:
            seq.num_computed_tokens += 1
        for seq, n in out.prefill:
            seq.num_computed_tokens += n
        for seq in got.sampling:
            seq.output_token_ids.append(7)
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
                builder.forget(seq.request_id)
        steps += 1
    assert not sched.has_work()
    assert preempted > 0, "the scenario never preempted"
    assert seqs[1].token_ids[:4] == [0, 0, 0, 1] and seqs[1].num_tokens == 3 + 5 + 16
    assert builder.contexts == {} and lean.contexts == {}
    assert isinstance(got.slot_mapping, np.ndarray)


def test_decode_contexts_concatenate_with_each_rows_bounds() -> None:
    contexts = [np.array([5, 6, 7]), np.array([1]), np.array([9, 2])]
    got = decode_contexts(contexts, torch.device("cpu"))
    assert got is not None and len(got.groups) == 1
    slots, bounds = got.groups[0]
    assert slots.tolist() == [5, 6, 7, 1, 9, 2]
    assert bounds == ((0, 3), (3, 4), (4, 6))
    assert decode_contexts([], torch.device("cpu")) is None


def test_decode_contexts_groups_stay_under_the_cap() -> None:
    """Groups of at most max_slots slots, in row order; a longer context is a group of its own."""
    rng = np.random.default_rng(3)
    contexts = [rng.integers(0, 1000, n) for n in (3, 4, 2, 9, 1, 1, 5)]
    got = decode_contexts(contexts, torch.device("cpu"), max_slots=6)
    assert got is not None
    rows = [slots[lo:hi].tolist() for slots, bounds in got.groups for lo, hi in bounds]
    assert rows == [c.tolist() for c in contexts]
    sizes = [len(slots) for slots, _ in got.groups]
    assert sizes == [3, 6, 9, 2, 5]

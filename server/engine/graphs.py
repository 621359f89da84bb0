"""Decode steps over padded batch-size buckets, captured as CUDA graphs (`--cuda-graphs`).

A decode-only step of D sequences runs as a step of B >= D rows, B the smallest bucket (1, 2, 4,
8, then multiples of 8 up to max_num_seqs), so a few graphs cover every batch size. Padding rows
carry token 0 at position 0, adapter slot 0 (outside every SGMV segment), no KV blocks (Flex masks
them out) and write their K/V into a scratch slot past the blocks the block manager hands out, so
they touch nothing real; the row-invariant kernels make a real row's output the same bits padded
or not.

On CUDA each bucket's forward is captured once, from static input tensors that every step
refills in place (token ids, positions, slot mapping, SGMV segments with a fixed capacity, Flex's
block tables) and replayed. Elsewhere (the CPU tests) the same padded step runs eagerly, from
fresh tensors or (capture asked for) from the refilled static ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.engine.attention import AttentionMetadata, FlexPlan
from server.engine.attn_flex import FlexAttention
from server.engine.step_inputs import StepInputs
from server.lora.ops import LoRABatch
from server.lora.segments import SEGMENT, Segments, build_segments, segment_arrays
from server.transfer import copy_into


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += range(8 if max_num_seqs > 8 else max_num_seqs, max_num_seqs, 8)
    return tuple(sorted({*sizes, max_num_seqs}))


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclass
class PaddedDecode:
    """A decode step's host inputs padded to `bucket` rows."""

    bucket: int
    input_ids: np.ndarray  # [B]
    positions: np.ndarray  # [B]
    slot_mapping: np.ndarray  # [B]; padding rows -> the scratch slot
    adapter_slots: np.ndarray  # [B]; padding rows -> 0
    contexts: list[np.ndarray]  # [B] cache slots each row attends (padding: scratch); [] under flex
    tables: list[tuple[list[int], int]]  # [B] (block table, query position); padding: ([], 0)


def pad_decode(
    inputs: StepInputs, tables: list[tuple[list[int], int]], bucket: int, scratch_slot: int
) -> PaddedDecode:
    d = inputs.num_decode
    pad = bucket - d

    def padded(a: np.ndarray, fill: int) -> np.ndarray:
        return np.concatenate([a[:d], np.full(pad, fill, dtype=np.int64)])

    scratch = np.array([scratch_slot], dtype=np.int64)
    return PaddedDecode(
        bucket=bucket,
        input_ids=padded(inputs.input_ids, 0),
        positions=padded(inputs.positions, 0),
        slot_mapping=padded(inputs.slot_mapping, scratch_slot),
        adapter_slots=padded(np.asarray(inputs.decode_adapter_slots, dtype=np.int64), 0),
        contexts=[*inputs.decode_context, *([scratch] * pad)] if inputs.decode_context else [],
        tables=[*tables, *([([], 0)] * pad)],
    )


@dataclass
class _Static:
    """One bucket's device tensors, refilled in place every step (a captured graph reads them)."""

    input_ids: torch.Tensor  # [1, B]
    positions: torch.Tensor  # [1, B]
    slot_mapping: torch.Tensor  # [B]
    segments: Segments  # capacity-padded
    meta: AttentionMetadata
    batch: LoRABatch
    logits: torch.Tensor | None = None  # [B, V], the captured graph's output
    graph: Any = None


class DecodeGraphs:
    def __init__(self, runner: Any, capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.buckets = decode_buckets(runner.config.max_num_seqs)
        self.scratch_slot = runner.config.num_kv_blocks * runner.config.block_size
        self.static: dict[int, _Static] = {}
        self.steps = 0  # decode steps run padded (replayed on CUDA)

    def run(self, inputs: StepInputs, tables: list[tuple[list[int], int]]) -> torch.Tensor | None:
        """Logits [D, V] of a decode-only step, or None when it has no bucket (too many rows)."""
        d = inputs.num_decode
        bucket = bucket_for(d, self.buckets)
        if bucket is None:
            return None
        padded = pad_decode(inputs, tables, bucket, self.scratch_slot)
        self.steps += 1
        if not self.capture:
            return self.runner.forward_padded(padded)[:d]
        st = self.static.get(bucket) or self._make(padded)
        self._fill(st, padded)
        if st.graph is None and self.runner.base.device.type == "cuda":
            self._capture(st)
        if st.graph is None:  # no CUDA (tests): what the graph would replay, run on the same tensors
            return self.runner.forward_static(st.input_ids, st.positions, st.meta, st.batch)[:d]
        st.graph.replay()
        assert st.logits is not None
        return st.logits[:d]

    # -- CUDA: static tensors, capture, replay -------------------------------------------------------
    def _capacity(self, bucket: int) -> int:
        return bucket // SEGMENT + min(bucket, self.runner.config.max_loras) + 1

    def _make(self, p: PaddedDecode) -> _Static:
        dev = self.runner.base.device
        flex: FlexAttention = self.runner.flex
        segments = build_segments(p.adapter_slots, dev, capacity=self._capacity(p.bucket))
        rows = torch.zeros(p.bucket, dtype=torch.int32, device=dev)  # capacity: every row
        segments = Segments(rows, segments.start, segments.length, segments.slot, p.bucket)
        slot_mapping = torch.zeros(p.bucket, dtype=torch.int64, device=dev)
        plan = FlexPlan(flex, flex.static_decode(p.bucket))
        meta = AttentionMetadata(slot_mapping, p.bucket, flex=plan)
        batch = LoRABatch(
            num_decode=p.bucket,
            decode_rows=None,
            decode_slots=torch.zeros(0, dtype=torch.int64, device=dev),
            segments=(),
            active=frozenset(),
            decode_active=frozenset(),
            sgmv=segments,
            always=True,
        )
        st = _Static(
            input_ids=torch.zeros(1, p.bucket, dtype=torch.int64, device=dev),
            positions=torch.zeros(1, p.bucket, dtype=torch.int64, device=dev),
            slot_mapping=slot_mapping,
            segments=segments,
            meta=meta,
            batch=batch,
        )
        self.static[p.bucket] = st
        return st

    def _fill(self, st: _Static, p: PaddedDecode) -> None:
        """Each step's host arrays copied straight into the static tensors: one pinned copy each,
        no temporary device tensors and no device-to-device copies."""
        copy_into(st.input_ids[0], p.input_ids)
        copy_into(st.positions[0], p.positions)
        copy_into(st.slot_mapping, p.slot_mapping)
        rows, start, length, slot = segment_arrays(p.adapter_slots, capacity=self._capacity(p.bucket))
        copy_into(st.segments.rows, np.pad(rows, (0, p.bucket - len(rows))))  # capacity: every row
        copy_into(st.segments.start, start)
        copy_into(st.segments.length, length)
        copy_into(st.segments.slot, slot)
        self.runner.flex.fill_decode(st.meta.flex.step, p.tables)  # type: ignore[union-attr]

    def _capture(self, st: _Static) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile and autotune outside the capture
                self.runner.forward_static(st.input_ids, st.positions, st.meta, st.batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a bucket is captured on first use, while the adapter loader thread may pin
        # host memory or dequantize (DoRA) on the device; global mode would fail either
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            st.logits = self.runner.forward_static(st.input_ids, st.positions, st.meta, st.batch)
        st.graph = graph

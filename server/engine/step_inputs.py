"""The host side of one step, built once: packed token ids, positions, KV slots and adapter routing.

Cache slots come from block tables with numpy, never a Python loop per token, and each decoding
sequence's context slots are kept between steps and grown by one slot per token, instead of being
rebuilt from the whole block table every step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from server.engine.attention import DecodeContexts
from server.engine.scheduler import SchedulerOutput
from server.engine.sequence import Sequence
from server.transfer import to_device


def slots_of(block_table: list[int], block_size: int, start: int, end: int) -> np.ndarray:
    """Cache slots of token positions [start, end) of a sequence with this block table."""
    pos = np.arange(start, end, dtype=np.int64)
    return np.asarray(block_table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


class ContextSlots:
    """One sequence's cache slots of positions [0, n), grown in place (capacity doubles)."""

    def __init__(self) -> None:
        self.buf = np.empty(64, dtype=np.int64)
        self.n = 0
        self.table_len = 0  # blocks of the table the slots were read from (a preemption empties it)

    def extend(self, new: np.ndarray) -> None:
        need = self.n + len(new)
        if need > len(self.buf):
            grown = np.empty(max(need, 2 * len(self.buf)), dtype=np.int64)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = new
        self.n = need

    def view(self) -> np.ndarray:
        return self.buf[: self.n]


# a chunk's context where the builder keeps none (flex reads block tables)
NO_CONTEXT = np.empty(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class PrefillInput:
    seq: Sequence
    start: int  # first row of the chunk in the packed batch
    length: int
    context: np.ndarray  # [pos + length] cache slots of the context so far, chunk included (or NO_CONTEXT)


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] cache slot of each new token
    # per decode row: cache slots of its context, new token included (empty where none are kept)
    decode_context: tuple[np.ndarray, ...]
    prefills: tuple[PrefillInput, ...]
    decode_adapter_slots: list[int]  # per decode row: device slot of its adapter (0 = base)
    segments: list[tuple[int, int, int]]  # (start, end, slot) of prefill chunks with an adapter
    sample_rows: list[int]  # rows whose logits are sampled, in `sampling` order
    sampling: list[Sequence]  # sequences that sample a token this step

    @property
    def num_decode(self) -> int:
        return len(self.decode_adapter_slots)


class StepInputBuilder:
    """Builds StepInputs; keeps each running sequence's context slots across steps, where the
    attention reads them (`contexts`: the torch backend gathers them; flex reads block tables, so
    a decode row then costs a few integer operations, not numpy calls)."""

    def __init__(self, block_size: int, contexts: bool = True) -> None:
        self.block_size = block_size
        self.keep_contexts = contexts
        self.contexts: dict[str, ContextSlots] = {}

    def _context(self, seq: Sequence, end: int) -> np.ndarray:
        """Slots of positions [0, end), reusing what earlier steps built for this sequence."""
        ctx = self.contexts.get(seq.request_id)
        start = seq.num_computed_tokens
        if ctx is None or ctx.n != start or len(seq.block_table) < ctx.table_len:
            ctx = ContextSlots()  # new, or preempted and recomputing: start over from the table
            ctx.extend(slots_of(seq.block_table, self.block_size, 0, start))
            self.contexts[seq.request_id] = ctx
        ctx.extend(slots_of(seq.block_table, self.block_size, start, end))
        ctx.table_len = len(seq.block_table)
        return ctx.view()

    def build(self, step: SchedulerOutput, slot_of: dict[str, int]) -> StepInputs:
        bs, keep = self.block_size, self.keep_contexts
        ids: list[int] = []
        decode_pos: list[int] = []
        decode_map: list[int] = []
        decode_context: list[np.ndarray] = []
        decode_slots: list[int] = []
        for seq in step.decode:
            pos = seq.num_computed_tokens
            ids.append(seq.token_at(pos))
            decode_pos.append(pos)
            if keep:
                context = self._context(seq, pos + 1)
                decode_map.append(int(context[pos]))
                decode_context.append(context)
            else:
                decode_map.append(seq.block_table[pos // bs] * bs + pos % bs)
            decode_slots.append(slot_of.get(seq.adapter_key or "", 0))
        positions: list[np.ndarray] = [np.array(decode_pos, dtype=np.int64)]
        mapping: list[np.ndarray] = [np.array(decode_map, dtype=np.int64)]
        prefills: list[PrefillInput] = []
        segments: list[tuple[int, int, int]] = []
        for seq, n in step.prefill:
            start, pos = len(ids), seq.num_computed_tokens
            ids += seq.token_ids[pos : pos + n]
            positions.append(np.arange(pos, pos + n, dtype=np.int64))
            if keep:
                context = self._context(seq, pos + n)
                mapping.append(context[pos:])
            else:
                context = NO_CONTEXT
                mapping.append(slots_of(seq.block_table, bs, pos, pos + n))
            prefills.append(PrefillInput(seq, start, n, context))
            slot = slot_of.get(seq.adapter_key or "", 0)
            if slot:
                segments.append((start, start + n, slot))
        sample_rows = list(range(len(step.decode)))
        sampling = list(step.decode)
        for chunk in prefills:
            if chunk.seq.num_computed_tokens + chunk.length == chunk.seq.num_tokens:
                sample_rows.append(chunk.start + chunk.length - 1)
                sampling.append(chunk.seq)
        return StepInputs(
            input_ids=np.asarray(ids, dtype=np.int64),
            positions=np.concatenate(positions),
            slot_mapping=np.concatenate(mapping),
            decode_context=tuple(decode_context),
            prefills=tuple(prefills),
            decode_adapter_slots=decode_slots,
            segments=segments,
            sample_rows=sample_rows,
            sampling=sampling,
        )

    def forget(self, request_id: str) -> None:
        self.contexts.pop(request_id, None)


# slots gathered together at most (a sequence with a longer context is its own group): at 8 KV heads
# of 128 in bf16 that is 128 MB per cache per layer, freed as the layer ends
GATHER_SLOTS = 1 << 16


def decode_contexts(
    contexts: Seq[np.ndarray], device: torch.device, max_slots: int = GATHER_SLOTS
) -> DecodeContexts | None:
    """Every decode row's context slots, copied to the device at once, in groups of at most
    `max_slots` slots (None: no decode row)."""
    if not contexts:
        return None
    slots = to_device(np.concatenate(contexts), device)
    groups: list[tuple[torch.Tensor, tuple[tuple[int, int], ...]]] = []
    first, size = 0, 0  # the current group: where it starts in `slots`, and its slots so far
    bounds: list[tuple[int, int]] = []
    for context in contexts:
        if bounds and size + len(context) > max_slots:
            groups.append((slots[first : first + size], tuple(bounds)))
            first, size, bounds = first + size, 0, []
        bounds.append((size, size + len(context)))
        size += len(context)
    groups.append((slots[first : first + size], tuple(bounds)))
    return DecodeContexts(tuple(groups))

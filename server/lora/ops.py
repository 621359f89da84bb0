"""The grouped low-rank term: a plain-torch reference and the row-invariant products the torch backend uses.

Slot buffers (one set per target projection, slot 0 all zeros = "no adapter"):
    A: [S, R, in]    rows [:r] of slot s hold the adapter's lora_A ([r, in]); the rest are zero.
                     Stored rank-innermost (A.transpose(1, 2) is contiguous [S, in, R]): the CPU
                     path reads it as a table of [R]-rows, the others take it through its strides
    B: [S, R, out]   rows [:r] hold lora_B transposed ([r, out]); the rest are zero
    scale: [S]       lora_alpha / r (or / sqrt(r) with rsLoRA), per projection
R is max_lora_rank; adapters of lower rank are zero-padded, so padding adds exact zeros.

Batch invariance by construction: every token's term is its own pair of products, x[t] @ A[s].T
then @ B[s], whose shapes come from the model and `max_lora_rank` only, never from how many tokens
or adapters share the step, so the order in which each output is summed cannot change with the
batch. (A dense product over the step's slots reduces over (number of slots) * R columns: its
blocking, and so its rounding, changed with the adapter mix, which broke solo == mixed on AVX2.)
Two forms of it, one per device, never mixed in one engine:
- on CPU, lora_bag: each product is one bag of torch's embedding_bag, the weighted sum of the
  factor rows of the token's slot read in place, in index order. A gathered copy of the factors
  per token (lora_rows) wrote and read them twice more: at 16 adapters that was most of the term.
- on CUDA, lora_rows / lora_shared: one `bmm` item per token over gathered or broadcast factors.
  These are not invariant: bmm picks its kernel by the number of items (measured on an H200, and
  on the CPU under MKL's AVX2 path on a Xeon), so the two forms and a row alone vs batched agree
  within rounding only. Under --batch-invariant, CUDA refuses them for the Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from server.lora.segments import Segments, build_segments
from server.transfer import indices, to_device


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """Adapter routing for one forward pass, built once per step and shared by every LoRA layer.

    Tokens are laid out decode first: rows [0, num_decode) hold one token per decoding sequence,
    then come the prefill chunks, each a segment of consecutive rows with one slot.
    """

    num_decode: int
    # Decode rows that use an adapter, and their slots; None when every decode row does (then the
    # rows are the slice [:num_decode] and no gather or scatter is needed).
    decode_rows: torch.Tensor | None  # [D'] int64 row indices
    decode_slots: torch.Tensor  # [D'] int64 slot of each of those rows
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot) of prefill chunks, slot != 0
    active: frozenset[int]  # non-zero slots used anywhere in the step
    decode_active: frozenset[int]  # non-zero slots used by decode rows
    sgmv: Segments | None = None  # every row with an adapter, for the Triton kernels
    # When few adapters serve many decode rows: (slot, its rows; None = all decode rows) per slot,
    # computed with broadcast factors instead of one gathered copy per row (within rounding).
    decode_groups: tuple[tuple[int, torch.Tensor | None], ...] | None = None
    # A captured graph's batch: every layer launches its kernels whatever is loaded at capture time.
    always: bool = False
    # CPU: every row with an adapter, for lora_bag (then the decode and segment fields go unused)
    bag: BagRows | None = None
    # Slot of every row [T], only when a slot of the step uses DoRA or (IA)3 (their per-row vectors
    # are gathered by it); None keeps a plain-LoRA step free of the gather.
    row_slots: torch.Tensor | None = None
    # (slot, its rows) of each slot whose adapter replaces whole modules (modules_to_save)
    saved_rows: tuple[tuple[int, torch.Tensor], ...] = ()

    @staticmethod
    def build(
        decode_slots: list[int],
        segments: list[tuple[int, int, int]],
        device: torch.device,
        sgmv: bool = False,
        extra_slots: frozenset[int] | set[int] = frozenset(),
        num_rows: int = 0,
        saved_slots: frozenset[int] | set[int] = frozenset(),
        bag: bool | None = None,
    ) -> LoRABatch:
        """`num_rows`: rows of the packed batch (at least every decode row and segment).
        `saved_slots` (a subset of `extra_slots`): slots holding modules_to_save copies.
        `bag`: the torch backend's form, lora_bag or the bmm products; None: the device's (the
        bag on CPU). Tests choose it to run the CUDA form on a CPU."""
        rows = [i for i, s in enumerate(decode_slots) if s]
        decode_active = frozenset(decode_slots[i] for i in rows)
        every = len(rows) == len(decode_slots)
        if bag is None:
            bag = device.type == "cpu"
        bag = bag and not sgmv
        active = decode_active | frozenset(s for _, _, s in segments)
        row_slots = (
            _row_slots(decode_slots, segments, num_rows) if bag or sgmv or active & extra_slots else None
        )
        rows_for_bag = BagRows.of(row_slots, device) if bag and row_slots is not None else None
        groups = None
        if rows_for_bag is None and (
            len(decode_active) == 1 or (rows and len(decode_active) * 8 <= len(rows))
        ):
            groups = tuple(
                (slot, None if every and len(decode_active) == 1 else
                 indices([i for i in rows if decode_slots[i] == slot], device))
                for slot in sorted(decode_active)
            )  # fmt: skip
        routed = per_row = None
        saved: list[tuple[int, torch.Tensor]] = []
        if row_slots is not None and (sgmv or active & extra_slots):
            routed = build_segments(row_slots, device) if sgmv else None
            per_row = to_device(row_slots, device) if active & extra_slots else None
            for slot in sorted(active & saved_slots):
                saved.append((slot, to_device(np.flatnonzero(row_slots == slot), device)))
        return LoRABatch(
            num_decode=len(decode_slots),
            decode_rows=None if every else indices(rows, device),
            decode_slots=indices([decode_slots[i] for i in rows], device),
            segments=tuple(segments),
            active=active,
            decode_active=decode_active,
            sgmv=routed,
            decode_groups=groups,
            bag=rows_for_bag,
            row_slots=per_row,
            saved_rows=tuple(saved),
        )


def _row_slots(
    decode_slots: list[int], segments: list[tuple[int, int, int]], num_rows: int = 0
) -> np.ndarray:
    """The slot of every row of the packed batch (0: no adapter): decode rows, then the chunks."""
    n = max([num_rows, len(decode_slots), *(end for _, end, _ in segments)])
    row_slots = np.zeros(n, dtype=np.int64)
    row_slots[: len(decode_slots)] = decode_slots
    for start, end, slot in segments:
        row_slots[start:end] = slot
    return row_slots


def lora_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Semantics: for each token t with slot s = slots[t]:
        out[t] = scale[s] * (x[t] @ A[s].T) @ B[s]
    x: [T, in], slots: [T] -> out: [T, out]. One token at a time, no batching tricks: the oracle
    for the fast paths."""
    out = torch.zeros(x.shape[0], B.shape[2], dtype=x.dtype, device=x.device)
    for t, s in enumerate(slots.tolist()):
        out[t] = ((x[t : t + 1] @ A[s].T) @ B[s])[0] * scale[s]
    return out


def lora_rows(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Semantics: lora_reference, each row with its own slot's factors gathered beside it.
    x: [T, in], slots: [T] -> [T, out]"""
    a = A.transpose(1, 2).index_select(0, slots)  # [T, in, R]
    t = torch.bmm(x.unsqueeze(1), a)  # [T, 1, in] -> [T, 1, R]
    y = torch.bmm(t, B.index_select(0, slots)).squeeze(1)  # [T, 1, R] -> [T, out]
    return y.mul_(scale.index_select(0, slots).unsqueeze(1))


def lora_shared(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slot: int
) -> torch.Tensor:
    """Semantics: lora_reference for rows that all use `slot` (a prefill chunk). The same per-row
    products as lora_rows (within rounding: see the module's note on bmm), but the factors are
    broadcast (stride 0) instead of copied once per row. x: [n, in] -> [n, out]"""
    n = x.shape[0]
    t = torch.bmm(x.unsqueeze(1), A[slot].T.expand(n, -1, -1))  # [n, 1, in] -> [n, 1, R]
    y = torch.bmm(t, B[slot].expand(n, -1, -1)).squeeze(1)  # -> [n, out]
    return y.mul_(scale[slot])


@dataclass(frozen=True, slots=True)
class BagRows:
    """The step's rows with an adapter, for lora_bag: built once per step, shared by every layer,
    with each bag layout (one per factor width) made the first time a layer asks for it."""

    rows: torch.Tensor | None  # [N] rows with an adapter, ascending; None: rows [0, N)
    slots: torch.Tensor  # [N] int64 slot of each
    layouts: dict[int, tuple[torch.Tensor, torch.Tensor]]  # width -> (indices, offsets)

    @staticmethod
    def build(decode_slots: list[int], segments: list[tuple[int, int, int]], device: torch.device) -> BagRows:
        return BagRows.of(_row_slots(decode_slots, segments), device)

    @staticmethod
    def of(row_slots: np.ndarray, device: torch.device) -> BagRows:
        """From the slot of every row of the packed batch (LoRABatch.build's, made once per step)."""
        rows = np.flatnonzero(row_slots)
        every = len(rows) == len(row_slots)
        return BagRows(
            rows=None if every else to_device(rows, device),
            slots=to_device(row_slots[rows], device),
            layouts={},
        )

    @property
    def num_rows(self) -> int:
        return int(self.slots.shape[0])

    def layout(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag t of a [S * width, d] table: rows slot[t] * width + 0 .. width - 1, in that order.
        int32 (embedding_bag takes it): N * width entries per width, 4 bytes each, for the step."""
        if width not in self.layouts:
            first = (self.slots * width).to(torch.int32)
            index = (
                first.unsqueeze(1) + torch.arange(width, dtype=torch.int32, device=first.device)
            ).reshape(-1)
            offsets = torch.arange(self.num_rows, dtype=torch.int32, device=first.device) * width
            self.layouts[width] = (index, offsets)
        return self.layouts[width]


def lora_bag(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, rows: BagRows
) -> torch.Tensor:
    """Semantics: lora_reference over rows.slots. x: [N, in] (the rows, contiguous) -> [N, out]

    x[t] @ A[s].T is sum_k x[t, k] * A[s].T[k]: the weighted sum of `in` rows of A's [S * in, R]
    table (its storage, rank innermost), one bag per token, summed in k order by one thread: the
    same arithmetic whatever else the step holds. Then the same with B's [S * R, out] table and
    the rank-wide result as weights. The factors are read in place, never copied per token."""
    rank = A.shape[1]
    index, offsets = rows.layout(A.shape[2])
    assert A.transpose(1, 2).is_contiguous(), "A must be stored rank-innermost (LoRALinear's buffer)"
    table = A.transpose(1, 2).view(-1, rank)
    t = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=x.reshape(-1))
    index, offsets = rows.layout(rank)
    y = F.embedding_bag(
        index, B.reshape(-1, B.shape[2]), offsets, mode="sum", per_sample_weights=t.reshape(-1)
    )
    return y.mul_(scale.index_select(0, rows.slots).unsqueeze(1))

"""The batched multi-adapter LoRA layer placed around each target projection of the base model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from server.lora.adapter import ModuleIA3, ModuleLoRA
from server.lora.backends import cpp_lora
from server.lora.ops import LoRABatch, lora_bag, lora_rows, lora_shared
from server.model.base_gemm import BaseGemm, base_linear

if TYPE_CHECKING:
    from server.lora.fused import FusedProjections


class LoRAContext:
    """Shared by every LoRA layer: how the base matmul runs (fixed at start-up) and the current
    step's routing (set by the model runner before each forward)."""

    def __init__(self, base_gemm: BaseGemm = BaseGemm.PLAIN, lora_backend: str = "torch") -> None:
        self.base_gemm = base_gemm
        self.lora_backend = lora_backend
        self.batch: LoRABatch | None = None
        # slots whose adapter needs more than the low-rank term (DoRA, (IA)3): kept by the SlotTable,
        # read when a step's routing is built (their rows need a per-row slot index)
        self.extra_slots: set[int] = set()
        # modules_to_save copies on the device: slot -> module -> parameter (kept by the SlotTable)
        self.saved: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        # prompt and P-tuning: slot -> [V, hidden] embeddings; prefix tuning: slot -> [layers, 2, V,
        # kv_heads, head_dim] keys and values (kept by the SlotTable, read by the model runner)
        self.virtual: dict[int, torch.Tensor] = {}
        self.prefix: dict[int, torch.Tensor] = {}
        # the SlotTable whose adapters the slots hold (several engines may share one base model)
        self.owner: object | None = None


class LoRALinear(nn.Module):
    """y = base(x) + scale[s] * B[s] (A[s] x), with s chosen per token; per slot also DoRA's
    magnitude ratio and (IA)3's input or output vector, each 1 where a slot does not use it.

    The base (a bitsandbytes Linear4bit or a plain Linear) runs once for the whole batch; adapters
    are never merged into it. Slot buffers are preallocated for `num_slots` adapters plus the
    all-zero slot 0, so loading an adapter is a copy, never an allocation.
    """

    lora_A: torch.Tensor  # [S + 1, R, in], stored [S + 1, in, R] (see ops.py)
    lora_B: torch.Tensor  # [S + 1, R, out]
    lora_scale: torch.Tensor  # [S + 1]
    lora_rank: torch.Tensor  # [S + 1] int32, each slot's true rank (the Triton kernels skip the padding)
    dora_scale: torch.Tensor  # [S + 1, out] DoRA's g = m / ||W + sBA|| (1: plain LoRA)
    ia3_in: torch.Tensor  # [S + 1, in] (IA)3 vector of a feed-forward module (1: none)
    ia3_out: torch.Tensor  # [S + 1, out] (IA)3 vector of any other module (1: none)

    def __init__(
        self, base: nn.Linear, num_slots: int, max_rank: int, context: LoRAContext, dtype: torch.dtype
    ) -> None:
        """`dtype`: the factors' (--lora-dtype), in which the term is computed. Scales and vectors
        stay fp32 whatever it is: PEFT's scaling is a Python float, its DoRA and (IA)3 math fp32."""
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(base.parameters()).device
        self.register_buffer(
            "lora_A",
            torch.zeros(num_slots + 1, self.in_features, max_rank, dtype=dtype, device=device).transpose(
                1, 2
            ),
            persistent=False,
        )
        self.register_buffer(
            "lora_B",
            torch.zeros(num_slots + 1, max_rank, self.out_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "lora_scale", torch.zeros(num_slots + 1, dtype=torch.float32, device=device), persistent=False
        )
        self.register_buffer(
            "lora_rank", torch.zeros(num_slots + 1, dtype=torch.int32, device=device), persistent=False
        )
        for name, width in (
            ("dora_scale", self.out_features),
            ("ia3_in", self.in_features),
            ("ia3_out", self.out_features),
        ):
            self.register_buffer(
                name, torch.ones(num_slots + 1, width, dtype=torch.float32, device=device), persistent=False
            )
        self.loaded: set[int] = set()  # slots with low-rank factors in this projection
        self.dora_slots: set[int] = set()
        self.ia3_in_slots: set[int] = set()
        self.ia3_out_slots: set[int] = set()
        # q/k/v or gate/up run as one (server/lora/fused.py): the group and this projection's place
        self.group: FusedProjections | None = None
        self.group_index = 0

    def set_slot(self, slot: int, weights: ModuleLoRA | None, ia3: ModuleIA3 | None = None) -> None:
        """Copy one adapter's factors or vector into `slot` (None, None clears it: this projection
        is not targeted)."""
        assert slot != 0, "slot 0 is the permanent no-adapter slot"
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_scale[slot] = 0.0
        self.lora_rank[slot] = 0
        for buffer, slots in self._vectors():
            buffer[slot].fill_(1.0)
            slots.discard(slot)
        self.loaded.discard(slot)
        if ia3 is not None:
            buffer, slots = self._vectors()[1 if ia3.feedforward else 2]
            buffer[slot].copy_(ia3.vector, non_blocking=True)
            slots.add(slot)
        if weights is None:
            return
        if weights.magnitude_scale is not None:
            self.dora_scale[slot].copy_(weights.magnitude_scale, non_blocking=True)
            self.dora_slots.add(slot)
        r = weights.rank
        # non_blocking: from pinned memory on a side stream these overlap the step (see SlotTable)
        self.lora_A[slot, :r].copy_(weights.A, non_blocking=True)
        self.lora_B[slot, :r].copy_(weights.B.T, non_blocking=True)
        self.lora_scale[slot] = weights.scale
        self.lora_rank[slot] = r
        self.loaded.add(slot)

    def _vectors(self) -> tuple[tuple[torch.Tensor, set[int]], ...]:
        return (
            (self.dora_scale, self.dora_slots),
            (self.ia3_in, self.ia3_in_slots),
            (self.ia3_out, self.ia3_out_slots),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            out = self.group.output(self.group_index, x)
            if out is not None:
                return out
        batch = self.context.batch
        rows = batch.row_slots if batch is not None else None  # set when the step has DoRA or (IA)3
        if rows is not None and batch is not None and batch.active & self.ia3_in_slots:
            # (IA)3 feed-forward: base(x * l), l gathered per row (1 for every other row: exact)
            scaled = x.reshape(-1, self.in_features) * self.ia3_in.index_select(0, rows)
            y = base_linear(scaled.to(x.dtype).view_as(x), self.base, self.context.base_gemm)
        else:
            y = base_linear(x, self.base, self.context.base_gemm)
        if batch is None:
            return y
        # x: [1, T, in] (packed batch) -> [T, in]. As PEFT does, the term is computed in the
        # factors' dtype (fp32 unless --lora-dtype says otherwise) and cast before it is added, in
        # place into y's rows (y is this call's own output), sparing a zero-filled delta and a copy
        # per layer.
        y2 = y.view(-1, self.out_features)
        if rows is not None and batch.active & self.ia3_out_slots:
            y2.mul_(self.ia3_out.index_select(0, rows))  # (IA)3: base(x) * l
        if not (batch.always or batch.active & self.loaded):
            return y
        A, B, scale = self.lora_A, self.lora_B, self.lora_scale
        dora = self.dora_scale
        if batch.sgmv is not None:
            from server.lora.backends.triton_sgmv import lora_sgmv

            lora_sgmv(x.reshape(-1, self.in_features), y2, A, B, scale, self.lora_rank, batch.sgmv)
            if rows is not None and batch.active & self.dora_slots:
                # DoRA's output is g * (base + s B A x): one row-wise product after the kernel
                y2.mul_(dora.index_select(0, rows))
            return y
        if batch.bag is not None:  # CPU: every row with an adapter at once
            bag = batch.bag
            dora_rows = bool(self.dora_slots & batch.active)
            if self.context.lora_backend == "cpp" and not dora_rows and y2.dtype == torch.float32:
                # the whole term in one call (lora_cpu.cpp); a step with DoRA rows keeps the bag form
                x32 = x.reshape(-1, self.in_features).float()
                cpp_lora.lora_add_(y2, x32, A, B, scale, self.lora_rank, bag.rows, bag.slots)
                return y
            g = dora.index_select(0, bag.slots) if dora_rows else None
            x2 = x.reshape(-1, self.in_features).to(A.dtype)
            _add_rows(y2, x2, bag.rows, bag.num_rows, partial(lora_bag, A=A, B=B, scale=scale, rows=bag), g)
            return y
        x2 = x.reshape(-1, self.in_features).to(A.dtype)
        d = batch.num_decode
        if batch.decode_groups is not None:
            for slot, group in batch.decode_groups:
                if slot not in self.loaded:
                    continue  # its factors are zero in this projection: the term adds exact zeros
                g = dora[slot] if slot in self.dora_slots else None
                _add_rows(y2, x2, group, d, partial(lora_shared, A=A, B=B, scale=scale, slot=slot), g)
        elif self.loaded & batch.decode_active:
            term = partial(lora_rows, A=A, B=B, scale=scale, slots=batch.decode_slots)
            g = dora.index_select(0, batch.decode_slots) if self.dora_slots & batch.decode_active else None
            _add_rows(y2, x2, batch.decode_rows, d, term, g)
        for start, end, slot in batch.segments:
            if slot in self.loaded:
                t = lora_shared(x2[start:end], A, B, scale, slot)
                if slot in self.dora_slots:
                    t = _dora(t, y2[start:end], dora[slot])
                y2[start:end] += t.to(y2.dtype)
        return y


def _add_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor | None,
    n: int,
    term: Callable[[torch.Tensor], torch.Tensor],
    g: torch.Tensor | None = None,
) -> None:
    """y[rows] += term(x[rows]).to(y.dtype) in place; rows None means the first n rows (a slice:
    no gather or scatter). With DoRA's g ([out], or [rows, out]) the term becomes _dora's."""
    if rows is None:
        t = term(x[:n])
        y[:n] += (t if g is None else _dora(t, y[:n], g)).to(y.dtype)
    else:
        t = term(x.index_select(0, rows))
        if g is not None:
            t = _dora(t, y.index_select(0, rows), g)
        y.index_add_(0, rows, t.to(y.dtype))


def _dora(term: torch.Tensor, base: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA output beside the base: (g - 1) * base(x) + g * (s B A x). Where g is 1 (a
    plain-LoRA row gathered beside DoRA rows) it is exactly the plain term."""
    return (g - 1) * base + g * term

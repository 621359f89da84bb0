"""The batched multi-adapter LoRA layer placed around each target projection of the base model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from server.lora.adapter import ModuleLoRA
from server.lora.ops import LoRABatch, lora_rows, lora_shared
from server.model.base_gemm import BaseGemm, base_linear


class LoRAContext:
    """Shared by every LoRA layer: how the base matmul runs (fixed at start-up) and the current
    step's routing (set by the model runner before each forward)."""

    def __init__(self, base_gemm: BaseGemm = BaseGemm.PLAIN, lora_backend: str = "torch") -> None:
        self.base_gemm = base_gemm
        self.lora_backend = lora_backend
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    """y = base(x) + scale[s] * B[s] (A[s] x), with s chosen per token.

    The base (a bitsandbytes Linear4bit or a plain Linear) runs once for the whole batch; adapters
    are never merged into it. Slot buffers are preallocated for `num_slots` adapters plus the
    all-zero slot 0, so loading an adapter is a copy, never an allocation.
    """

    lora_A: torch.Tensor  # [S + 1, R, in]
    lora_B: torch.Tensor  # [S + 1, R, out]
    lora_scale: torch.Tensor  # [S + 1]
    lora_rank: torch.Tensor  # [S + 1] int32, each slot's true rank (the Triton kernels skip the padding)

    def __init__(
        self, base: nn.Linear, num_slots: int, max_rank: int, context: LoRAContext, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = base.in_features
        self.out_features = base.out_features
        device = next(base.parameters()).device
        self.register_buffer(
            "lora_A",
            torch.zeros(num_slots + 1, max_rank, self.in_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "lora_B",
            torch.zeros(num_slots + 1, max_rank, self.out_features, dtype=dtype, device=device),
            persistent=False,
        )
        self.register_buffer(
            "lora_scale", torch.zeros(num_slots + 1, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "lora_rank", torch.zeros(num_slots + 1, dtype=torch.int32, device=device), persistent=False
        )
        self.loaded: set[int] = set()

    def set_slot(self, slot: int, weights: ModuleLoRA | None) -> None:
        """Copy one adapter's factors into `slot` (None clears it: this projection is not targeted)."""
        assert slot != 0, "slot 0 is the permanent no-adapter slot"
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_scale[slot] = 0.0
        self.lora_rank[slot] = 0
        self.loaded.discard(slot)
        if weights is None:
            return
        r = weights.rank
        # non_blocking: from pinned memory on a side stream these overlap the step (see SlotTable)
        self.lora_A[slot, :r].copy_(weights.A, non_blocking=True)
        self.lora_B[slot, :r].copy_(weights.B.T, non_blocking=True)
        self.lora_scale[slot] = weights.scale
        self.lora_rank[slot] = r
        self.loaded.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = base_linear(x, self.base, self.context.base_gemm)
        batch = self.context.batch
        if batch is None or not (batch.always or batch.active & self.loaded):
            return y
        # x: [1, T, in] (packed batch) -> [T, in]. As PEFT does, the term is computed in the
        # factors' dtype (fp32) and cast before it is added, in place into y's rows (y is this
        # call's own output), sparing a zero-filled delta and a copy per layer.
        y2 = y.view(-1, self.out_features)
        A, B, scale = self.lora_A, self.lora_B, self.lora_scale
        if batch.sgmv is not None:
            from server.lora.backends.triton_sgmv import lora_sgmv

            lora_sgmv(x.reshape(-1, self.in_features), y2, A, B, scale, self.lora_rank, batch.sgmv)
            return y
        x2 = x.reshape(-1, self.in_features).to(A.dtype)
        d = batch.num_decode
        if batch.decode_groups is not None:
            for slot, rows in batch.decode_groups:
                if slot not in self.loaded:
                    continue  # its factors are zero in this projection: the term adds exact zeros
                _add_rows(y2, x2, rows, d, partial(lora_shared, A=A, B=B, scale=scale, slot=slot))
        elif self.loaded & batch.decode_active:
            term = partial(lora_rows, A=A, B=B, scale=scale, slots=batch.decode_slots)
            _add_rows(y2, x2, batch.decode_rows, d, term)
        for start, end, slot in batch.segments:
            if slot in self.loaded:
                y2[start:end] += lora_shared(x2[start:end], A, B, scale, slot).to(y2.dtype)
        return y


def _add_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor | None,
    n: int,
    term: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """y[rows] += term(x[rows]).to(y.dtype) in place; rows None means the first n rows (a slice:
    no gather or scatter)."""
    if rows is None:
        y[:n] += term(x[:n]).to(y.dtype)
    else:
        y.index_add_(0, rows, term(x.index_select(0, rows)).to(y.dtype))

"""The batched multi-adapter LoRA layer placed around each target projection of the base model."""

from __future__ import annotations

import torch
from torch import nn

from server.lora.adapter import ModuleLoRA
from server.lora.ops import MIN_ROWS, LoRABatch, lora_decode, lora_segment


class LoRAContext:
    """The current step's routing, set by the model runner before each forward and read by every layer."""

    def __init__(self) -> None:
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
        self.ranks = [0] * (num_slots + 1)
        self.loaded: set[int] = set()

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """The base output, with the packed batch padded to MIN_ROWS tokens so that each token's
        result does not depend on how many tokens share the step (see ops.pad_rows)."""
        t = x.shape[-2]
        if x.dim() != 3 or x.shape[0] != 1 or t >= MIN_ROWS:
            return self.base(x)
        padded = torch.cat([x, x.new_zeros(1, MIN_ROWS - t, x.shape[2])], dim=1)
        return self.base(padded)[:, :t]

    def set_slot(self, slot: int, weights: ModuleLoRA | None) -> None:
        """Copy one adapter's factors into `slot` (None clears it: this projection is not targeted)."""
        assert slot != 0, "slot 0 is the permanent no-adapter slot"
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_scale[slot] = 0.0
        self.ranks[slot] = 0
        self.loaded.discard(slot)
        if weights is None:
            return
        r = weights.rank
        self.lora_A[slot, :r].copy_(weights.A)
        self.lora_B[slot, :r].copy_(weights.B.T)
        self.lora_scale[slot] = weights.scale
        self.ranks[slot] = r
        self.loaded.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        batch = self.context.batch
        if batch is None or not (batch.active & self.loaded):
            return y
        # x: [1, T, in] (packed batch) -> [T, in]; the low-rank terms are added into y's rows in
        # place (y is this call's own output), sparing a zero-filled delta and a copy per layer.
        x2 = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        y2 = y.view(-1, self.out_features)
        d = batch.num_decode
        if d and self.loaded & batch.decode_active:
            y2[:d] += lora_decode(x2[:d], self.lora_A, self.lora_B, self.lora_scale, batch)
        for start, end, slot in batch.segments:
            if slot in self.loaded:
                y2[start:end] += lora_segment(
                    x2[start:end], self.lora_A, self.lora_B, self.lora_scale, slot, self.ranks[slot]
                )
        return y

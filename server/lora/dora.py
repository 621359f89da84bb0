"""DoRA (`use_dora`): the per-output-feature magnitude ratio, computed once when the adapter loads.

Semantics (PEFT 0.21 `DoraLinearLayer.forward`, NF4 base dequantized with bitsandbytes as PEFT does):
    lora_weight = lora_B(lora_A(I)).T                       # [out, in], through the layers, not B @ A
    g = magnitude / ||W + scaling * lora_weight||_2 per row # [out]
    y = base(x) + (g - 1) * base(x) + g * scaling * B A x
PEFT recomputes g in every forward; it depends only on the adapter and the base, so loraplex keeps it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dense_weight(linear: nn.Linear) -> torch.Tensor:
    """The base projection's weight [out, in] in float32 on the CPU (an NF4 weight dequantized)."""
    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf

        quant_state = getattr(weight, "quant_state", None)
        return bnbf.dequantize_4bit(weight.data, quant_state).to("cpu", torch.float32)
    return weight.detach().to("cpu", torch.float32)


@torch.no_grad()
def magnitude_scale(
    A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """g = m / ||W + scale * B A|| per output feature. A: [r, in], B: [out, r], m: [out], W: [out, in]."""
    eye = torch.eye(A.shape[1], dtype=A.dtype)
    lora_weight = F.linear(F.linear(eye, A), B).T  # [out, in]
    norm = torch.linalg.norm(weight.to(A.dtype) + scale * lora_weight, dim=1).to(A.dtype)
    return magnitude / norm

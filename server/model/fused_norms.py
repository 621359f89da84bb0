"""RMSNorm as one compiled kernel (opt-in, for CUDA graphs; bench/gpu_check.py measures it).

transformers' RMSNorm (Llama's, and Qwen2's and Mistral's, the same code) is eight device ops per
call: cast, pow, mean, add, rsqrt, mul, cast, mul. In a graphed decode step of a small model each
is a graph node of a few microseconds, and there are two norms per layer: for SmolLM2-135M about a
quarter of the step's 2,000 nodes (run 1 of the GPU check left such a step device-bound). Inductor
fuses the formula into one kernel. Each row is reduced by one program, so a row's result does not
depend on the rows beside it; gpu_check's invariant mode verifies this bitwise.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

# classes whose forward is exactly `rms_norm` below (checked against the source in a test)
NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' formula, op for op: the reference of the compiled kernel."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@functools.cache
def _compiled() -> Any:
    return torch.compile(rms_norm, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _compiled()(hidden_states, module.weight, module.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Route every known RMSNorm of `model` through the compiled kernel; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in NORM_CLASSES:
            module.forward = functools.partial(_forward, module)
            count += 1
    return count

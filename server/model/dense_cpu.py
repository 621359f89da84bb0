"""y = x @ W.T for a full-precision fp32 weight by our CPU kernel (dense_cpu.cpp): the base's
lm_head on a CPU computing in fp32, where our NF4 kernels run too (`dequant=cpp`). Row-invariant
by construction, so the batch-invariant mode needs no 16-row tiles for it; within fp32 rounding of
F.linear, its reference (tests/unit/test_dense_cpu.py). Where it applies: base_gemm.dense_matmul.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.cpp_build import CppKernel

KERNEL = CppKernel("loraplex_dense_cpu", Path(__file__).with_name("dense_cpu.cpp"), "cpp dense matmul")
_ops: dict[str, Any] = {}


# build (once per CPU and source) and load it; False, with the reason logged and kept, where this
# machine cannot build it
load, error = KERNEL.load, KERNEL.error


def vectorized() -> bool:
    """Whether this machine's build has a vector path (AVX2 with FMA, or AVX-512); the scalar one
    is there to be correct on any x86-64, not to be fast, so the base does not use it."""
    return lanes() > 1


def takes(weight: torch.Tensor) -> bool:
    """Whether `matmul` multiplies by this weight: fp32, [out, in], contiguous, on CPU."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
    )


def on_a_cache_line(weight: torch.Tensor) -> torch.Tensor:
    """`weight` where it starts on a 64-byte line, else a copy that does (torch's allocator aligns
    to 64). Off a line, every AVX-512 load of `matmul` straddles two: 1.39x the time at 64 rows on an
    AMD EPYC Zen 4. The GGUF reader leaves SmolLM2's tied embeddings 8 bytes off one, and
    safetensors places a tensor at any multiple of 8 bytes."""
    return weight if weight.data_ptr() % 64 == 0 else weight.clone()


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, each row's sums in an order no other row changes. x: [M, in] fp32 -> [M, out]"""
    if "matmul" not in _ops:  # looked up once: torch.ops' name resolution costs microseconds a call
        _ops["matmul"] = torch.ops.loraplex_dense.matmul.default
    return _ops["matmul"](x, weight)


def lanes() -> int:
    """The fp32 lanes of this machine's build: 16 (AVX-512), 8 (AVX2) or 1 (the scalar path)."""
    if "lanes" not in _ops:
        _ops["lanes"] = int(torch.ops.loraplex_dense.vector_lanes())
    return int(_ops["lanes"])

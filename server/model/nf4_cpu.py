"""NF4 weights dequantized to fp32 by our CPU kernel (nf4_cpu.cpp), the same bits as bitsandbytes'
`dequantize_4bit`, its reference, at a fraction of its time. Chosen at start-up with the other
backends (server/engine/backends.py: `dequant=cpp` on a CPU computing in fp32 where it builds);
tests/unit/test_nf4_cpu.py compares it bitwise with bitsandbytes. Its `matmul` multiplies by such
a weight without writing it out (the base's product for a few rows, and for any number of rows in
the batch-invariant mode: server/model/base_gemm.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.cpp_build import CppKernel

KERNEL = CppKernel("loraplex_nf4_cpu", Path(__file__).with_name("nf4_cpu.cpp"), "cpp NF4 dequantization")
_ops: dict[str, Any] = {}


def load() -> bool:
    """Build (once per CPU and source) and load the kernel; False, with the reason logged, where
    this machine cannot build it."""
    return KERNEL.load()


def error() -> str:
    return KERNEL.error()


def takes(packed: torch.Tensor, state: Any) -> bool:
    """Whether the kernel can dequantize this weight (checked once, at load): NF4 on CPU, with
    plain (decoded) fp32 block scales and whole blocks; anything else stays with bitsandbytes."""
    return (
        packed.device.type == "cpu"
        and packed.is_contiguous()
        and packed.dtype == torch.uint8
        and state.quant_type == "nf4"
        and not state.nested
        and state.absmax.dtype == torch.float32
        and state.code is not None
        and state.code.dtype == torch.float32
        and state.code.numel() == 16
        and len(state.shape) == 2
        and (state.shape[0] * state.shape[1]) % state.blocksize == 0
        # QLoRA's 64 (and 32). For larger blocks bitsandbytes 0.50's CPU kernel does not compute
        # code * absmax (measured: twice the round-trip error at 128 and 256), and its bits are
        # the contract here (PEFT computes with them), so those stay with it.
        and state.blocksize in (32, 64)
    )


def multiplies(packed: torch.Tensor, state: Any) -> bool:
    """Whether `matmul` takes this weight (checked once, at load): what `takes` accepts, each weight
    row whole blocks, on a build with the vector path."""
    return takes(packed, state) and state.shape[1] % state.blocksize == 0 and vectorized()


def dequantize(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, state) in fp32, for what `takes` accepts."""
    rows, cols = state.shape
    return _op()(packed, state.absmax, state.code, state.blocksize, rows, cols)


def vectorized() -> bool:
    """Whether this machine's build has a vector path of `matmul` (AVX2 with FMA, or AVX-512);
    the scalar one is there to be correct on any x86-64, not to be fast, so the base does not use
    it."""
    return lanes() > 1


def matmul(x: torch.Tensor, packed: torch.Tensor, state: Any) -> torch.Tensor:
    """x @ dequantize(packed, state).T without the dequantized weight: each weight is decoded in
    registers to the value `dequantize` gives and multiplied there. Row-invariant: a row's output
    is the same bits whatever other rows share the call. For what `takes` accepts. x: [M, in] fp32
    -> [M, out]; only the sums' order differs from dequantize + matmul (within fp32 rounding)."""
    rows, cols = state.shape
    return _op("matmul")(x, packed, state.absmax, state.code, state.blocksize, rows, cols)


def _op(name: str = "dequantize") -> Any:
    """The op's overload, looked up once (torch.ops' name resolution costs microseconds a call)."""
    if name not in _ops:
        _ops[name] = getattr(torch.ops.loraplex_nf4, name).default
    return _ops[name]


def lanes() -> int:
    """The fp32 lanes of this machine's build: 16 (AVX-512), 8 (AVX2) or 1 (the scalar path)."""
    if "lanes" not in _ops:
        _ops["lanes"] = int(torch.ops.loraplex_nf4.vector_lanes())
    return int(_ops["lanes"])

"""The `cpp` LoRA backend: lora_cpu.cpp, built for this CPU the first time it is needed
(server/cpp_build.py: -march=native, cached per CPU), called once per projection as a torch op.

What it computes and why it is batch invariant: see lora_cpu.cpp. Its reference is ops.lora_bag
(the `torch` backend on CPU) and the oracle ops.lora_reference; tests/unit/test_lora_cpp.py
compares them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from server.cpp_build import CppKernel

KERNEL = CppKernel("loraplex_lora_cpu", Path(__file__).with_name("lora_cpu.cpp"), "cpp LoRA backend")
_ops: dict[str, Any] = {}


def load() -> bool:
    """Build (once per CPU and source) and load the kernel; False, with the reason logged and kept
    in `error()`, where this machine cannot build it (no C++ compiler or ninja)."""
    return KERNEL.load()


def error() -> str:
    return KERNEL.error()


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    rows: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    """y[rows] += the term of each row with its slot (semantics: ops.lora_reference, cast to y and
    added). y: [T, out] fp32, x: [T, in] fp32, A/B/scale/rank: a LoRALinear's slot buffers,
    rows: [n] ascending (None: the first n rows), slots: [n] int64."""
    _op()(y, x, A, B, scale, rank, rows, slots)


def _op() -> Any:
    """The op's overload, looked up once: torch.ops' name resolution costs microseconds a call,
    and the engine calls it once per projection per step."""
    if "op" not in _ops:
        _ops["op"] = torch.ops.loraplex_cpu.lora_add_.default
    return _ops["op"]

"""What Triton's CPU interpreter can and cannot show, as test marks."""

from __future__ import annotations

import pytest
import torch

# A row alone vs in a batch, bitwise, through the interpreter: its tl.dot is numpy's OpenBLAS
# matmul, whose AVX2 kernels sum a row in an order that depends on its place in the micro-tile.
# The compiled kernels on a GPU are checked by bench/gpu_check.py (issue 9).
ROW_ORDER_NEEDS_AVX512 = pytest.mark.xfail(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="Triton's interpreter computes tl.dot with numpy's OpenBLAS, whose AVX2 kernels sum a row "
    "in an order that depends on its place in the micro-tile; the compiled kernel on a GPU is "
    "checked by bench/gpu_check.py (issue 9). Seen on an AVX2-only EPYC, 2026-12-02.",
    strict=False,
)

"""x @ W.T for an NF4 weight in one Triton kernel, dequantizing inside, in fixed tiles (opt-in).

The batch-invariant base (`tiled`, base_gemm.py) dequantizes the whole weight with bitsandbytes,
then runs one matmul per 16 rows: at batch 64 that is a dequantization and four GEMM launches per
projection, at 256 seventeen. This kernel is one launch for any batch: each program takes 16 rows
and 64 output columns, walks K in steps of one quantization block (64 weights, one fp32 scale),
decodes the 4-bit codes of its tile (bitsandbytes' layout: two codes per byte, the first in the
high nibble) and multiplies. The tile sizes are constants and every row is computed by exactly
one program, whatever the row count: a row's result is the same bits alone or in any batch, by
construction. It reads the packed weight (half a byte per weight) instead of writing and reading
a dequantized copy (two bytes each way in bf16).

Each weight is decoded as bitsandbytes decodes it (code * block scale in fp32, then the compute
dtype), so the products are the ones the tiled path multiplies; the sums run in another order
(even and odd k apart), so the two agree within rounding, not bitwise. fp32 runs IEEE dots
(Triton's fp32 default is TF32). On a CPU it runs under TRITON_INTERPRET=1 (tests only).

Opt-in (`BaseGemm.NF4_TRITON`), not chosen by any flag until bench/gpu_check.py has timed it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program, as the tiled path's TILE
COLS = 64  # output columns per program
BLOCK = 64  # weights per quantization block: one block per K step


@triton.jit
def _nf4_kernel(
    x_ptr, q_ptr, absmax_ptr, code_ptr, out_ptr, M, N, K, stride_xm, stride_om,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    n = tl.program_id(1) * COLS + tl.arange(0, COLS)
    m_ok, n_ok = m < M, n < N
    j = tl.arange(0, BLOCK // 2)  # byte j of a block row holds weights 2j (high nibble) and 2j + 1
    acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    row_first = n.to(tl.int64) * K  # flat index of each output column's first weight
    for k0 in range(0, K, BLOCK):
        packed = tl.load(q_ptr + (row_first[:, None] + k0) // 2 + j[None, :], mask=n_ok[:, None], other=0)
        scale = tl.load(absmax_ptr + (row_first + k0) // BLOCK, mask=n_ok, other=0.0)  # [COLS]
        w_hi = tl.load(code_ptr + ((packed >> 4) & 0xF).to(tl.int32)) * scale[:, None]  # [COLS, BLOCK/2]
        w_lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale[:, None]
        x_at = x_ptr + m[:, None].to(tl.int64) * stride_xm + k0 + 2 * j[None, :]
        x_even = tl.load(x_at, mask=m_ok[:, None], other=0.0)  # [ROWS, BLOCK/2]
        x_odd = tl.load(x_at + 1, mask=m_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(x_even.to(tl.float32), tl.trans(w_hi), acc, input_precision="ieee")
            acc = tl.dot(x_odd.to(tl.float32), tl.trans(w_lo), acc, input_precision="ieee")
        else:  # the weights rounded to the compute dtype, as bitsandbytes' dequantization stores them
            acc = tl.dot(x_even, tl.trans(w_hi.to(x_even.dtype)), acc)
            acc = tl.dot(x_odd, tl.trans(w_lo.to(x_odd.dtype)), acc)
    out = out_ptr + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@torch.library.custom_op("loraplex::nf4_matmul", mutates_args=("out",))
def nf4_matmul_into(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor
) -> None:
    """out [M, N] <- x [M, K] @ W.T, W the NF4 weight [N, K]: `packed` its bytes (bitsandbytes'
    layout, flat), `absmax` its fp32 block scales (decoded), `code` the 16 NF4 values."""
    m, k = x.shape
    n = out.shape[1]
    grid = (triton.cdiv(m, ROWS), triton.cdiv(n, COLS))
    _nf4_kernel[grid](
        x, packed, absmax, code, out, m, n, k, x.stride(0), out.stride(0),
        ROWS=ROWS, COLS=COLS, BLOCK=BLOCK, IEEE=x.dtype == torch.float32,
    )  # fmt: skip


def fits(k: int, blocksize: int, quant_type: str) -> bool:
    """Whether a weight's format is the one the kernel decodes: NF4 in 64-weight blocks that never
    straddle two output rows."""
    return quant_type == "nf4" and blocksize == BLOCK and k % BLOCK == 0


def nf4_linear(
    x: torch.Tensor, packed: torch.Tensor, state: object, bias: torch.Tensor | None
) -> torch.Tensor:
    """Semantics: F.linear(x, dequantize_4bit(packed, state).to(x.dtype), bias) within rounding, each
    row the same bits in any batch. `state`: a plain (decoded) quant state. x: [..., K] -> [..., N]"""
    n, k = state.shape  # type: ignore[attr-defined]
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    code = state.code  # type: ignore[attr-defined]
    assert code.dtype == torch.float32 and code.device == x.device, "the NF4 code table lives on the device"
    nf4_matmul_into(rows, packed.view(-1), state.absmax, code, out)  # type: ignore[attr-defined]
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*x.shape[:-1], n)

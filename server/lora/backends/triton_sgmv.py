"""Triton SGMV kernels for the grouped low-rank term (our own, after Punica's SGMV, vLLM's
lora_shrink/lora_expand and SGLang's chunked backend).

    shrink: t[row] = x[row] @ A[slot].T          one program per 16-row segment x slice, K looped in BLOCK_K
    expand: y[row] += (t[row] @ B[slot] * scale[slot]).to(y.dtype)   one program per segment x BLOCK_N

Rows come sorted by slot in segments of at most 16 (server/lora/segments.py); a segment with
slot -1 (graph padding) or 0 exits at once. Block sizes come from (K, N, R) only, never from the row
count, every tile has 16 rows, and each row is written by exactly one program: no atomics, no
split-K, so a row's result is the same bits whatever else is in the step.

Two modes, chosen by the factors' dtype:
- fp32 factors (PEFT-faithful): x widened to fp32, `tl.dot(..., input_precision="ieee")` (Triton's
  fp32 default is TF32), scale after the expand, cast, add: what PEFT computes.
- bf16/fp16 factors (fast): x cast to the factors' dtype, fp32 accumulation.

Slices (server/lora/fused.py): projections that read the same input (q/k/v, gate/up) run as one
shrink and one expand over the slices' factors side by side, as vLLM's kernels do over its merged
layers. A slice's programs are the one-slice kernel's, tile for tile (the same block sizes, column
blocks starting at the slice's first column), so a fused row is the same bits as unfused.

On a CPU this runs under TRITON_INTERPRET=1 (tests only; the interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.lora.segments import SEGMENT, Segments


@triton.jit
def _segment(
    rows_ptr, seg_start_ptr, seg_len_ptr, rank_ptr, g, slot, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr
):
    """Segment g's rows (int64, masked past its length), their positions in sorted order, the row
    mask, and the rank mask of its slot."""
    start = tl.load(seg_start_ptr + g)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < tl.load(seg_len_ptr + g)
    rows = tl.load(rows_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    r_ok = tl.arange(0, BLOCK_R) < tl.load(rank_ptr + slot)
    return rows, (start + m).to(tl.int64), m_ok, r_ok


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, rank_ptr,
    K, stride_xm, stride_as, stride_ar, stride_ak, stride_tm, stride_a_slice, stride_rank_slice,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g)
    if slot <= 0:
        return
    sl = tl.program_id(1)  # the slice: its factors, rank and BLOCK_R columns of t
    a_ptr += sl.to(tl.int64) * stride_a_slice
    t_ptr += sl * BLOCK_R
    rows, t_rows, m_ok, r_ok = _segment(
        rows_ptr, seg_start_ptr, seg_len_ptr, rank_ptr + sl * stride_rank_slice, g, slot, BLOCK_M, BLOCK_R
    )
    r = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        a = tl.load(
            a_ptr + slot.to(tl.int64) * stride_as + r[None, :] * stride_ar + k[:, None] * stride_ak,
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]
        if IEEE:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(a.dtype), a, acc)
    tl.store(t_ptr + t_rows[:, None] * stride_tm + r[None, :], acc, mask=m_ok[:, None])


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, scale_ptr, y_ptr, rows_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr, rank_ptr,
    tiles_ptr,
    N, stride_tm, stride_bs, stride_br, stride_ym, stride_rank_slice, stride_scale_slice, num_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    SLICED: tl.constexpr,
):  # fmt: skip
    g = tl.program_id(0)
    slot = tl.load(seg_slot_ptr + g)
    if slot <= 0:
        return
    j = tl.program_id(1)
    if SLICED:  # column block j: its first column, slice and the slice's end (blocks never straddle)
        first = tl.load(tiles_ptr + j)
        sl = tl.load(tiles_ptr + num_tiles + j)
        end = tl.load(tiles_ptr + 2 * num_tiles + j)
    else:
        sl = 0
        first = j * BLOCK_N
        end = N
    t_ptr += sl * BLOCK_R
    rank_ptr += sl * stride_rank_slice
    scale_ptr += sl * stride_scale_slice
    rows, t_rows, m_ok, r_ok = _segment(
        rows_ptr, seg_start_ptr, seg_len_ptr, rank_ptr, g, slot, BLOCK_M, BLOCK_R
    )
    r = tl.arange(0, BLOCK_R)
    cols = first + tl.arange(0, BLOCK_N)
    c_ok = cols < end
    t = tl.load(
        t_ptr + t_rows[:, None] * stride_tm + r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
    )
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + r[:, None] * stride_br + cols[None, :],
        mask=r_ok[:, None] & c_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_N]
    if IEEE:  # noqa: SIM108 (a constexpr branch: Triton compiles only the taken side)
        out = tl.dot(t, b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(t.to(b.dtype), b)
    out = out * tl.load(scale_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    ok = m_ok[:, None] & c_ok[None, :]
    y = tl.load(y_ptrs, mask=ok, other=0.0)
    tl.store(y_ptrs, y + out.to(y.dtype), mask=ok)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def block_sizes(k: int, n: int, r: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, BLOCK_R) from the projection's shape and the buffers' rank, never from M.
    BLOCK_N is 64 whatever N (masked past it): every slice of a fused projection then has its
    unfused tiles (all real projections are at least 64 wide)."""
    del n
    return min(64, _pow2(k)), 64, _pow2(r)


@torch.library.custom_op("loraplex::sgmv_shrink", mutates_args=("t",))
def sgmv_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    t: torch.Tensor,
    rows: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_slot: torch.Tensor,
    ranks: torch.Tensor,
    num_slices: int = 1,
) -> None:
    """x: [T, in], a: [S, n * R, in] (n slices of R rows), ranks: [S] or [n, S],
    t: [T', n * BLOCK_R] fp32 (sorted-row order): t[:, i-th BLOCK_R] <- x[rows] @ a[slot, i-th R].T"""
    r = a.shape[1] // num_slices
    assert t.shape[1] == num_slices * _pow2(r), "t holds whole BLOCK_R-wide tiles per slice"
    block_k, _, block_r = block_sizes(x.shape[1], 1, r)
    _shrink_kernel[(seg_slot.shape[0], num_slices)](
        x, a, t, rows, seg_start, seg_len, seg_slot, ranks,
        x.shape[1], x.stride(0), a.stride(0), a.stride(1), a.stride(2), t.stride(0),
        r * a.stride(1), ranks.stride(0) if ranks.dim() == 2 else 0,
        BLOCK_M=SEGMENT, BLOCK_K=block_k, BLOCK_R=block_r, IEEE=a.dtype == torch.float32,
    )  # fmt: skip


@torch.library.custom_op("loraplex::sgmv_expand", mutates_args=("y",))
def sgmv_expand(
    t: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_slot: torch.Tensor,
    ranks: torch.Tensor,
    tiles: torch.Tensor | None = None,
) -> None:
    """t: [T', n * BLOCK_R] fp32, b: [S, R, out], y: [T, out]:
    y[rows] += (t @ b[slot] * scale[slot]).to(y.dtype). With slices, `tiles` (slice_tiles) maps
    column blocks to slices, whose columns of b and y are side by side; scale and ranks: [n, S]."""
    _, block_n, block_r = block_sizes(1, y.shape[1], b.shape[1])
    num_tiles = triton.cdiv(y.shape[1], block_n) if tiles is None else tiles.shape[1]
    _expand_kernel[(seg_slot.shape[0], num_tiles)](
        t, b, scale, y, rows, seg_start, seg_len, seg_slot, ranks, tiles,
        y.shape[1], t.stride(0), b.stride(0), b.stride(1), y.stride(0),
        ranks.stride(0) if ranks.dim() == 2 else 0, scale.stride(0) if scale.dim() == 2 else 0, num_tiles,
        BLOCK_M=SEGMENT, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=b.dtype == torch.float32,
        SLICED=tiles is not None,
    )  # fmt: skip


def slice_tiles(widths: list[int], device: torch.device) -> torch.Tensor:
    """[3, J] int32: per column block of the slices side by side, its first column, its slice and
    the slice's end column. Made once per fused group, at load (never inside a step or a graph)."""
    block_n = block_sizes(1, 1, 1)[1]
    first: list[int] = []
    owner: list[int] = []
    end: list[int] = []
    lo = 0
    for i, w in enumerate(widths):
        for c in range(lo, lo + w, block_n):
            first.append(c)
            owner.append(i)
            end.append(lo + w)
        lo += w
    return torch.tensor([first, owner, end], dtype=torch.int32, device=device)


def lora_sgmv(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    ranks: torch.Tensor,
    seg: Segments,
    tiles: torch.Tensor | None = None,
    num_slices: int = 1,
) -> None:
    """Semantics: y[t] += (scale[s] * (x[t] @ A[s].T) @ B[s]).to(y.dtype) for every row t with a
    slot s != 0, in place. x: [T, in], y: [T, out] (contiguous rows).

    With n slices (server/lora/fused.py): A [S, n * R, in], B [S, R, sum of widths], scale and
    ranks [n, S], `tiles` from slice_tiles; slice i's columns of y get slice i's term."""
    if seg.num_rows == 0:
        return
    # BLOCK_R columns per slice, not R: the shrink stores whole [16, BLOCK_R] tiles
    t = torch.empty(
        seg.num_rows, num_slices * _pow2(A.shape[1] // num_slices), dtype=torch.float32, device=x.device
    )
    sgmv_shrink(x, A, t, seg.rows, seg.start, seg.length, seg.slot, ranks, num_slices)
    sgmv_expand(t, B, scale, y, seg.rows, seg.start, seg.length, seg.slot, ranks, tiles)

"""The Triton SGMV kernels (in Triton's interpreter on CPU) against the plain-torch reference, rows
alone vs in a batch compared bitwise, and the segment routing they rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.lora.ops import lora_reference
from server.lora.segments import SEGMENT, build_segments
from tests.interpreter import INTERPRETER_ROW_ORDER

triton_sgmv = pytest.importorskip(
    "server.lora.backends.triton_sgmv", reason="the triton extra is not installed"
)
CPU = torch.device("cpu")
RANKS = [0, 12, 8, 4, 12, 3, 1]  # per slot; slot 0 is the no-adapter slot


def _buffers(d_in: int, d_out: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Buffers 12 wide (max_lora_rank 12): narrower than the kernels' 16-wide rank tiles."""
    g = torch.Generator().manual_seed(0)
    s, r = len(RANKS), max(RANKS)
    A = torch.randn(s, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(s, r, d_out, generator=g)
    for slot, rank in enumerate(RANKS):
        A[slot, rank:] = 0.0
        B[slot, rank:] = 0.0
    scale = torch.rand(s, generator=g) + 0.5
    scale[0] = 0.0
    return A.to(dtype), B.to(dtype), scale, torch.tensor(RANKS, dtype=torch.int32)


def _run(
    x: torch.Tensor, y0: torch.Tensor, slots: np.ndarray, bufs: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    A, B, scale, ranks = bufs
    y = y0.clone()
    triton_sgmv.lora_sgmv(x, y, A, B, scale, ranks, build_segments(slots, CPU))
    return y


def test_segments_sorted_by_slot_at_most_16_rows() -> None:
    slots = np.array([3, 0, 1, 3, 3] + [2] * 20 + [0, 1], dtype=np.int64)
    seg = build_segments(slots, CPU)
    rows = seg.rows.tolist()
    assert sorted(rows) == [i for i, s in enumerate(slots) if s]  # every adapter row once, no base row
    assert [slots[r] for r in rows] == sorted(slots[slots > 0].tolist())
    assert [slots[r] for r in rows if slots[r] == 3] == [3, 3, 3] and rows[:2] == [2, 26]  # stable
    for start, length, slot in zip(seg.start.tolist(), seg.length.tolist(), seg.slot.tolist(), strict=True):
        assert 1 <= length <= SEGMENT
        assert {int(slots[r]) for r in rows[start : start + length]} == {slot}
    assert seg.slot.tolist() == [1, 2, 2, 3]  # 20 rows of slot 2: 16 + 4
    padded = build_segments(slots, CPU, capacity=6)
    assert padded.slot.tolist() == [1, 2, 2, 3, -1, -1]
    with pytest.raises(ValueError, match="capacity"):
        build_segments(slots, CPU, capacity=3)
    assert build_segments(np.zeros(5, dtype=np.int64), CPU).num_rows == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("d_in", "d_out"), [(64, 128), (48, 40)])
def test_kernels_match_reference(dtype: torch.dtype, d_in: int, d_out: int) -> None:
    bufs = _buffers(d_in, d_out, dtype)
    A, B, scale, _ = bufs
    g = torch.Generator().manual_seed(1)
    for t in (1, 3, 16, 17, 40):
        slots = torch.randint(0, len(RANKS), (t,), generator=g)
        x = torch.randn(t, d_in, generator=g)
        y0 = torch.randn(t, d_out, generator=g)
        got = _run(x, y0, slots.numpy(), bufs)
        want = y0 + lora_reference(x, A.float(), B.float(), scale, slots)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # fp16 factors: the fast mode's tolerance
        assert torch.allclose(got, want, rtol=tol, atol=tol), f"T={t} {dtype}"
        base_rows = slots == 0
        assert torch.equal(got[base_rows], y0[base_rows])  # rows without an adapter are untouched


@pytest.mark.invariance
@INTERPRETER_ROW_ORDER
def test_rows_alone_equal_batched() -> None:
    bufs = _buffers(64, 128, torch.float32)
    g = torch.Generator().manual_seed(2)
    slots = torch.randint(0, len(RANKS), (37,), generator=g).numpy()
    x, y0 = torch.randn(37, 64, generator=g), torch.randn(37, 128, generator=g)
    batched = _run(x, y0, slots, bufs)
    for i in range(37):
        alone = _run(x[i : i + 1], y0[i : i + 1], slots[i : i + 1], bufs)
        assert torch.equal(alone[0], batched[i]), f"row {i} differs alone vs batched"
    perm = torch.randperm(37, generator=g)
    assert torch.equal(_run(x[perm], y0[perm], slots[perm.numpy()], bufs), batched[perm])


def test_block_sizes_come_from_the_shape_only() -> None:
    assert triton_sgmv.block_sizes(576, 1536, 16) == (64, 64, 16)
    assert triton_sgmv.block_sizes(24, 40, 8) == (32, 64, 16)
    assert triton_sgmv.block_sizes(24, 16, 8) == (32, 64, 16)  # BLOCK_N: the same for every slice

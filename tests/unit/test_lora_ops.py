"""The row-invariant products against their plain references: the LoRA term (per-token products)
and the base matmul (16-row tiles). Tests marked `invariance` also run under other CPU kernel
families in subprocesses (test_kernel_families.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.lora.ops import BagRows, LoRABatch, lora_bag, lora_reference, lora_rows, lora_shared
from server.model.base_gemm import TILE, tiled_linear

CPU = torch.device("cpu")
# (in, out) pairs: the tiny test model's, SmolLM2-135M's attention and MLP, and odd sizes
SHAPES = [(64, 128), (576, 192), (576, 1536), (1536, 576), (24, 40)]
# with outputs at most 64 wide, which MKL's AVX2 path on a Xeon computes differently per tile place
TILED_SHAPES = [*SHAPES, (128, 64), (576, 64)]
ROW_COUNTS = [1, 2, 3, 7, 8, 15, 16, 17, 33, 64, 257]


def _slot_buffers(
    num_slots: int, rank: int, d_in: int, d_out: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A [S, R, in], B [S, R, out], scale [S]; slot 0 zero; slot s has rank ranks[s] (rows above zero)."""
    g = torch.Generator().manual_seed(seed)
    s = num_slots + 1
    A = torch.randn(s, rank, d_in, generator=g)
    B = torch.randn(s, rank, d_out, generator=g)
    scale = torch.rand(s, generator=g) + 0.5
    ranks = [0] + [1 + (i % rank) for i in range(num_slots)]
    for slot, r in enumerate(ranks):
        A[slot, r:] = 0.0
        B[slot, r:] = 0.0
    scale[0] = 0.0
    return A, B, scale, ranks


def test_lora_rows_matches_reference() -> None:
    A, B, scale, _ = _slot_buffers(5, 8, 24, 40)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        slots = torch.randint(0, 6, (t,), generator=g)
        slots[0] = 0
        x = torch.randn(t, 24, generator=g)
        got = lora_rows(x, A, B, scale, slots)
        assert torch.allclose(got, lora_reference(x, A, B, scale, slots), atol=1e-5), f"T={t}"
        assert torch.equal(got[0], torch.zeros(40))  # slot 0 adds nothing


def test_lora_shared_is_lora_rows() -> None:
    """Within rounding, not bitwise: both are `bmm`, whose kernel (on CPU, MKL's batched GEMM) may
    treat broadcast and gathered factors differently (seen under MKL's AVX2 path on a Xeon)."""
    A, B, scale, _ = _slot_buffers(5, 8, 576, 192, seed=3)
    A = stored(A)  # the layer's layout: both products then read [in, R] contiguous
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(4))
    for slot in range(1, 6):
        slots = torch.full((40,), slot)
        got = lora_shared(x, A, B, scale, slot)
        want = lora_reference(x, A, B, scale, slots)
        tol = 1e-5 * float(want.abs().max())  # fp32 rounding of sums of 576 terms, at the output's scale
        assert torch.allclose(got, want, rtol=0, atol=tol)
        assert torch.allclose(got, lora_rows(x, A, B, scale, slots), rtol=0, atol=tol)


def stored(A: torch.Tensor) -> torch.Tensor:
    """A as the layer stores it: [S, R, in] over rank-innermost storage."""
    return A.transpose(1, 2).contiguous().transpose(1, 2)


def bag_rows(slots: list[int]) -> BagRows:
    return BagRows.build(slots, [], CPU)


def test_lora_bag_matches_reference() -> None:
    A, B, scale, _ = _slot_buffers(5, 8, 24, 40)
    g = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        slots = torch.randint(1, 6, (t,), generator=g)
        x = torch.randn(t, 24, generator=g)
        want = lora_reference(x, A, B, scale, slots)
        got = lora_bag(x, stored(A), B, scale, bag_rows(slots.tolist()))
        assert torch.allclose(got, want, atol=1e-5), f"T={t}"
    with pytest.raises(AssertionError, match="rank-innermost"):  # a copy per layer call, refused
        lora_bag(x, A, B, scale, bag_rows(slots.tolist()))


def test_bag_rows_keep_the_rows_with_an_adapter() -> None:
    rows = BagRows.build([0, 2, 1], [(3, 7, 4), (7, 9, 0)], CPU)
    assert rows.rows is not None and rows.rows.tolist() == [1, 2, 3, 4, 5, 6]
    assert rows.slots.tolist() == [2, 1, 4, 4, 4, 4]
    index, offsets = rows.layout(3)
    assert index[:6].tolist() == [6, 7, 8, 3, 4, 5] and offsets.tolist() == [0, 3, 6, 9, 12, 15]
    every = BagRows.build([3, 1], [(2, 4, 2)], CPU)
    assert every.rows is None and every.slots.tolist() == [3, 1, 2, 2]
    assert LoRABatch.build([0, 2, 1], [(3, 7, 4)], CPU).bag is not None  # the CPU's path
    assert LoRABatch.build([0, 2, 1], [], CPU, sgmv=True).bag is None


@pytest.mark.invariance
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
def test_lora_bag_alone_equal_batched(d_in: int, d_out: int) -> None:
    """Each row's term is the same bits alone, in any batch size, in any order, with any mix,
    and in a prefill chunk of its slot."""
    A, B, scale, _ = _slot_buffers(8, 16, d_in, d_out, seed=5)
    A = stored(A)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(max(ROW_COUNTS), d_in, generator=g)
    slots = torch.randint(1, 9, (x.shape[0],), generator=g)

    def term(xs: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return lora_bag(xs, A, B, scale, bag_rows(ss.tolist()))

    alone = torch.cat([term(x[i : i + 1], slots[i : i + 1]) for i in range(64)])
    assert torch.allclose(alone, lora_reference(x[:64], A, B, scale, slots[:64]), rtol=1e-4, atol=1e-3)
    for t in ROW_COUNTS:
        m = min(t, 64)
        assert torch.equal(term(x[:t], slots[:t])[:m], alone[:m]), (
            f"T={t}: a row's term changed with the batch"
        )
    perm = torch.randperm(64, generator=g)
    assert torch.equal(term(x[:64][perm], slots[:64][perm]), alone[perm])
    for slot in (1, 8):  # a prefill chunk on one slot: the same bits as each of its rows alone
        chunk = BagRows.build([], [(0, 64, slot)], CPU)
        each = torch.cat([term(x[i : i + 1], torch.tensor([slot])) for i in range(64)])
        assert torch.equal(lora_bag(x[:64], A, B, scale, chunk), each)


def test_lora_batch_build() -> None:
    batch = LoRABatch.build([0, 2, 1], [(3, 7, 4)], CPU)
    assert batch.num_decode == 3
    assert batch.decode_rows is not None and batch.decode_rows.tolist() == [1, 2]
    assert batch.decode_slots.tolist() == [2, 1]
    assert batch.active == frozenset({1, 2, 4})
    assert batch.decode_active == frozenset({1, 2})
    every = LoRABatch.build([3, 3, 1], [], CPU)
    assert every.decode_rows is None  # all rows carry an adapter: a slice, no gather
    assert every.decode_slots.tolist() == [3, 3, 1]
    none = LoRABatch.build([0, 0], [(2, 5, 1)], CPU)
    assert none.decode_active == frozenset() and none.active == frozenset({1})


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
def test_lora_rows_alone_close_to_batched(d_in: int, d_out: int) -> None:
    """The `bmm` form (the torch backend on CUDA; tests run it on the CPU) is not batch invariant:
    bmm picks its kernel by the number of items (on the H200, and on the CPU under MKL's AVX2 path
    on a Xeon), so a row alone and in a batch agree within rounding only. Under --batch-invariant
    CUDA refuses it for the Triton kernels, and the CPU runs lora_bag (the tests above)."""
    A, B, scale, _ = _slot_buffers(8, 16, d_in, d_out, seed=5)
    A = stored(A)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(max(ROW_COUNTS), d_in, generator=g)
    slots = torch.randint(0, 9, (x.shape[0],), generator=g)
    alone = torch.cat([lora_rows(x[i : i + 1], A, B, scale, slots[i : i + 1]) for i in range(64)])
    for t in ROW_COUNTS:
        got = lora_rows(x[:t], A, B, scale, slots[:t])
        m = min(t, 64)
        assert torch.allclose(got[:m], alone[:m], rtol=1e-5, atol=1e-3), f"T={t}"
    for slot in (1, 8):  # a prefill chunk on one slot
        rows = torch.full((64,), slot)
        each = torch.cat([lora_rows(x[i : i + 1], A, B, scale, rows[:1]) for i in range(64)])
        assert torch.allclose(lora_shared(x[:64], A, B, scale, slot), each, rtol=1e-5, atol=1e-3)


def test_tiled_linear_matches_plain() -> None:
    g = torch.Generator().manual_seed(7)
    w, bias = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    for n in (1, 15, 16, 17, 40):
        x = torch.randn(n, 24, generator=g)
        got = tiled_linear(x, w, bias)
        assert got.shape == (n, 40)
        assert torch.allclose(got, F.linear(x, w, bias), atol=1e-5)
    x = torch.randn(2 * TILE, 24, generator=g)
    assert torch.equal(tiled_linear(x, w), torch.cat([F.linear(x[:TILE], w), F.linear(x[TILE:], w)]))


@pytest.mark.invariance
@pytest.mark.parametrize(("d_in", "d_out"), TILED_SHAPES)
def test_tiled_linear_alone_equal_batched(d_in: int, d_out: int) -> None:
    """A row's base output is the same bits alone (padded to one tile) and at any position of any batch."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(max(ROW_COUNTS), d_in, generator=g)
    alone = torch.cat([tiled_linear(x[i : i + 1], w) for i in range(64)])
    for t in ROW_COUNTS:
        m = min(t, 64)
        assert torch.equal(tiled_linear(x[:t], w)[:m], alone[:m]), f"T={t}: a row's base output changed"
    perm = torch.randperm(64, generator=g)
    assert torch.equal(tiled_linear(x[:64][perm], w), alone[perm])


def test_a_shape_whose_tile_places_differ_runs_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """tile_keeps_rows finds a kernel that rounds each place of a tile its own way (here a stand-in
    for F.linear that does), and tiled_linear then runs that shape one row per call."""
    from server.model import base_gemm

    real = F.linear

    def by_place(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        out = real(x, w, b)
        if x.shape[0] > 1:  # a different last bit for every place but the first
            out = out + torch.arange(x.shape[0]).unsqueeze(1) * out.abs() * 2**-22
        return out

    monkeypatch.setattr(base_gemm, "_TILE_KEEPS_ROWS", {})
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    assert base_gemm.tile_keeps_rows(w)
    monkeypatch.setattr(base_gemm.F, "linear", by_place)
    monkeypatch.setattr(base_gemm, "_TILE_KEEPS_ROWS", {})
    assert not base_gemm.tile_keeps_rows(w)
    x = torch.randn(19, 40, generator=torch.Generator().manual_seed(2))
    got = tiled_linear(x, w)
    assert torch.equal(got, torch.cat([real(x[i : i + 1], w) for i in range(19)]))
    assert torch.equal(tiled_linear(x[5:6], w)[0], got[5])


def test_tiled_rows_and_row_tiled_norms() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from server.model.base_gemm import RowTiled, tiled_rows
    from server.model.loader import tile_norms

    norm = LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 37, 64)
    assert torch.allclose(tiled_rows(x, norm), norm(x), atol=1e-6)
    assert torch.equal(tiled_rows(x[:, 5:6], norm)[0, 0], tiled_rows(x, norm)[0, 5])

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = LlamaRMSNorm(64)
            self.norm = LlamaRMSNorm(64)

    block = Block()
    tile_norms(block)
    assert isinstance(block.input_layernorm, RowTiled) and isinstance(block.norm, RowTiled)
    assert torch.allclose(block.norm(x), block.norm.inner(x), atol=1e-6)


@pytest.mark.invariance
def test_decode_groups_give_the_gathered_bits() -> None:
    """Few adapters over many decode rows run per slot on broadcast factors; a step's routing may
    choose either way, so both must give the same bits for every row."""
    from torch import nn

    from server.lora.adapter import ModuleLoRA
    from server.lora.layer import LoRAContext, LoRALinear
    from server.model.base_gemm import BaseGemm

    ctx = LoRAContext(BaseGemm.TILED)  # the base rows must not differ either
    layer = LoRALinear(nn.Linear(96, 80), 3, 8, ctx, torch.float32)
    g = torch.Generator().manual_seed(9)
    for slot in (1, 2):
        layer.set_slot(
            slot, ModuleLoRA(A=torch.randn(8, 96, generator=g), B=torch.randn(80, 8, generator=g), scale=0.5)
        )
    slots = [1, 0, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]  # 17 adapter rows, 2 adapters
    grouped = LoRABatch.build(slots, [], CPU, bag=False)  # the CUDA form, here on the CPU
    assert grouped.decode_groups is not None and [s for s, _ in grouped.decode_groups] == [1, 2]
    gathered = LoRABatch.build(slots[:9], [], CPU, bag=False)  # 8 adapter rows, 2 adapters: gathered
    assert gathered.decode_groups is None
    only = LoRABatch.build([2, 2, 2], [], CPU, bag=False)
    assert only.decode_groups is not None and only.decode_groups[0][1] is None  # all rows: a slice
    x = torch.randn(1, len(slots), 96, generator=g)
    with torch.no_grad():
        ctx.batch = grouped
        y_grouped = layer(x)
        ctx.batch = gathered
        y_gathered = layer(x[:, :9])
        ctx.batch = only
        y_only = layer(x[:, :3])
    assert torch.equal(y_grouped[0, :9], y_gathered[0])
    ctx.batch = LoRABatch.build([2], [], CPU, bag=False)
    with torch.no_grad():
        assert torch.equal(layer(x[:, 4:5])[0, 0], y_grouped[0, 4])
    assert y_only.shape == (1, 3, 80)

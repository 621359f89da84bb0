"""The `cpp` LoRA backend's kernel (server/lora/backends/lora_cpu.cpp) against its reference, the
torch backend's bag form, and the oracle lora_reference: the same term within rounding, every row
the same bits alone or in any batch (also under the other CPU kernel families), each dtype's
rounding points, and bad input refused before any memory is touched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.lora.backends import cpp_lora
from server.lora.ops import BagRows, lora_bag, lora_reference
from tests.cpu_builds import ARCHES, not_in_a_build, run_built_for

pytestmark = pytest.mark.skipif(not cpp_lora.load(), reason=f"cpp backend not built: {cpp_lora.error()}")

# (in, out): the tiny test model's, SmolLM2-135M's attention and MLP, and sizes off every vector width
SHAPES = [(64, 128), (576, 192), (576, 1536), (1536, 576), (24, 40), (17, 145)]
ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 33, 64, 257]


def _slots(
    num_slots: int, R: int, d_in: int, d_out: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRALinear's buffers: A [S, R, in] stored [S, in, R], B [S, R, out], scale, rank. Slot 0 is
    empty; slot s has rank 1 + (s * 5) % R (rows above it zero), and the last slot rank 0 (an adapter
    that does not target this projection)."""
    g = torch.Generator().manual_seed(seed)
    s = num_slots + 1
    A = torch.randn(s, d_in, R, generator=g).transpose(1, 2) / d_in**0.5
    B = torch.randn(s, R, d_out, generator=g)
    scale = torch.rand(s, generator=g) + 0.5
    ranks = [0] + [1 + (i * 5) % R for i in range(1, num_slots)] + [0]
    for slot, r in enumerate(ranks):
        A[slot, r:] = 0.0
        B[slot, r:] = 0.0
    scale[0] = 0.0
    return A.to(dtype), B.to(dtype), scale, torch.tensor(ranks, dtype=torch.int32)


def _term(
    x: torch.Tensor,
    buffers: tuple[torch.Tensor, ...],
    slots: torch.Tensor,
    rows: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    A, B, scale, rank = buffers
    y = torch.zeros(x.shape[0], B.shape[2]) if y is None else y.clone()
    cpp_lora.lora_add_(y, x, A, B, scale, rank, rows, slots)
    return y


@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
@pytest.mark.parametrize("R", [16, 8, 24, 32])
def test_matches_reference_and_bag(d_in: int, d_out: int, R: int) -> None:
    buffers = _slots(6, R, d_in, d_out)
    A, B, scale, _ = buffers
    g = torch.Generator().manual_seed(1)
    for t in (1, 3, 16, 37):
        slots = torch.randint(0, 7, (t,), generator=g)
        x = torch.randn(t, d_in, generator=g)
        got = _term(x, buffers, slots)
        want = lora_reference(x, A, B, scale, slots)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), f"T={t}"
        used = slots != 0  # the bag takes the rows with an adapter only
        if used.any():
            bag = lora_bag(x[used], A, B, scale, BagRows.of(slots.numpy(), torch.device("cpu")))
            assert torch.allclose(got[used], bag, rtol=1e-5, atol=1e-5 * bag.abs().max().item()), f"T={t}"
        assert torch.equal(got[slots == 0], torch.zeros_like(got[slots == 0])), "slot 0 must add nothing"


def test_adds_into_the_chosen_rows() -> None:
    """rows: only those rows of y change, each by its term (the engine's rows with an adapter)."""
    buffers = _slots(4, 16, 64, 128)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 64, generator=g), torch.randn(10, 128, generator=g)
    rows = torch.tensor([1, 4, 5, 9])
    slots = torch.tensor([2, 1, 3, 2])
    got = _term(x, buffers, slots, rows, y)
    want = y.clone()
    want[rows] += lora_reference(x[rows], *buffers[:3], slots)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    others = torch.tensor([0, 2, 3, 6, 7, 8])
    assert torch.equal(got[others], y[others])


@pytest.mark.invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
def test_rows_alone_equal_batched(d_in: int, d_out: int, dtype: torch.dtype) -> None:
    """Each row's term is the same bits alone, in any batch size, in any order, beside any mix of
    ranks (groups of rows whose ranks differ), with a rank not a multiple of 16 (R = 24: the
    one-by-one ranks), and at any place in y."""
    buffers = _slots(8, 24, d_in, d_out, dtype, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(max(ROW_COUNTS), d_in, generator=g)
    slots = torch.randint(0, 9, (x.shape[0],), generator=g)
    alone = torch.cat([_term(x[i : i + 1], buffers, slots[i : i + 1]) for i in range(64)])
    for t in ROW_COUNTS:
        m = min(t, 64)
        assert torch.equal(_term(x[:t], buffers, slots[:t])[:m], alone[:m]), f"T={t}: a row changed"
    perm = torch.randperm(64, generator=g)
    assert torch.equal(_term(x[perm], buffers, slots[perm]), alone[perm]), "order changed a row"
    rows = torch.arange(3, 3 + 2 * 64, 2)  # every other row of a larger y
    xs = torch.zeros(3 + 2 * 64, d_in)
    xs[rows] = x[:64]
    assert torch.equal(_term(xs, buffers, slots[:64], rows)[rows], alone), "a row's place changed it"


@pytest.mark.invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d_in", "d_out"), [(576, 1536), (1536, 576), (17, 145)])
def test_rows_sharing_a_slot_equal_alone(d_in: int, d_out: int, dtype: torch.dtype) -> None:
    """Rows with one slot (a batch with few adapters, a prompt's rows) run four at a time on each
    load of their factors: each row still the same bits as alone, whether its slot's rows fill
    such groups or leave some over, beside rows of other slots, and at any place in y."""
    buffers = _slots(4, 24, d_in, d_out, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, d_in, generator=g)
    patterns = {
        "one slot": torch.full((40,), 2),
        "two slots in runs": torch.tensor([1] * 9 + [3] * 6 + [1] * 3 + [3] * 22),
        "interleaved": torch.arange(40) % 3 + 1,
        "mostly one": torch.tensor([2] * 30 + [1, 3, 4, 0, 2, 2, 1, 3, 2, 4]),
    }
    for name, slots in patterns.items():
        alone = torch.cat([_term(x[i : i + 1], buffers, slots[i : i + 1]) for i in range(40)])
        for t in (4, 5, 8, 13, 40):
            assert torch.equal(_term(x[:t], buffers, slots[:t]), alone[:t]), f"{name}, T={t}: a row changed"
        rows = torch.arange(1, 81, 2)
        xs = torch.zeros(81, d_in)
        xs[rows] = x
        assert torch.equal(_term(xs, buffers, slots, rows)[rows], alone), f"{name}: a row's place changed it"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_factors_round_where_peft_rounds(dtype: torch.dtype) -> None:
    """Factors in bf16/fp16 (--lora-dtype): what PEFT's `lora_B(lora_A(x.to(dtype))) * scaling` gives
    with its adapter in that dtype (each product rounded to it, then the scaled term), cast to fp32."""
    A, B, scale, rank = _slots(4, 16, 576, 192, dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 576, generator=g)
    slots = torch.tensor([1, 2, 3, 4, 1, 2, 3, 0, 1])
    got = _term(x, (A, B, scale, rank), slots)
    want = torch.stack(
        [
            (F.linear(F.linear(x[i : i + 1].to(dtype), A[s]), B[s].T) * scale[s].item()).float()[0]
            for i, s in enumerate(slots.tolist())
        ]
    )
    # PEFT's dtype linears accumulate in fp32 and round once, as the kernel does; their sums run in
    # another order, so a few values land one rounding step away
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    exact = (got == want).float().mean().item()
    assert exact > 0.5, f"only {exact:.0%} of the values are PEFT's bits"
    fp32 = _term(x, (A.float(), B.float(), scale, rank), slots)
    assert not torch.equal(got, fp32), "the term was not computed in the factors' dtype"


def test_refuses_bad_input() -> None:
    A, B, scale, rank = _slots(3, 16, 64, 128)
    x, y = torch.randn(4, 64), torch.zeros(4, 128)
    slots = torch.tensor([1, 2, 3, 1])
    with pytest.raises(RuntimeError, match="bad slot"):
        cpp_lora.lora_add_(y, x, A, B, scale, rank, None, torch.tensor([1, 2, 9, 1]))
    with pytest.raises(RuntimeError, match="ascending"):
        cpp_lora.lora_add_(y, x, A, B, scale, rank, torch.tensor([0, 2, 2, 3]), slots)
    with pytest.raises(RuntimeError, match="ascending rows"):
        cpp_lora.lora_add_(y, x, A, B, scale, rank, torch.tensor([0, 1, 2, 4]), slots)
    with pytest.raises(RuntimeError, match="rank-innermost"):
        cpp_lora.lora_add_(y, x, A.contiguous(), B, scale, rank, None, slots)
    with pytest.raises(RuntimeError, match="fp32"):
        cpp_lora.lora_add_(y.half(), x, A, B, scale, rank, None, slots)
    assert torch.equal(y, torch.zeros(4, 128)), "a refused call wrote into y"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_is_the_dtype_conversion_in_every_lane(dtype: torch.dtype) -> None:
    """With one input and rank 1 every sum is a single product, so the kernel's result can be
    written out in torch: x, the shrink, the expand and the scaled term each rounded to the
    factors' dtype by torch's own conversion (round to nearest even). Columns 0-31 run in the
    vector lanes, 32-39 one by one; the values include ties, subnormals, overflow and NaN."""
    g = torch.Generator().manual_seed(9)
    out = 40
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 2**-130, 1e-41, 3e38, float("nan"), 65504.0, 1e-7])
    b = torch.cat([torch.randn(out - len(special), generator=g) * 100, special]).to(dtype)
    x = torch.tensor([[1.0 + 2**-9 + 2**-20], [-3.3], [1e-3], [7e4]])
    A = torch.tensor([1.0 + 2**-7, 1.0, 1.0, 1.0], dtype=dtype).view(4, 1, 1)  # [S, R=1, in=1]
    B = b.view(1, 1, out).repeat(4, 1, 1)
    scale = torch.tensor([0.0, 0.7, 1.3, 1.0])
    rank = torch.tensor([0, 1, 1, 1], dtype=torch.int32)
    slots = torch.tensor([1, 2, 3, 1])
    y = torch.ones(4, out)
    cpp_lora.lora_add_(y, x, A, B, scale, rank, None, slots)
    for i, s in enumerate(slots.tolist()):
        t = (x[i].to(dtype).float() * A[s, 0].float()).to(dtype).float()
        term = (t * B[s, 0].float()).to(dtype).float()
        want = 1.0 + (term * scale[s]).to(dtype).float()
        assert torch.equal(y[i].nan_to_num(123.0), want.nan_to_num(123.0)), f"row {i}"


@not_in_a_build
@pytest.mark.parametrize("arch", ARCHES)
def test_the_code_other_cpus_build(arch: str) -> None:
    """The kernel compiles different code for other CPUs (AVX2 intrinsics and 8-float vector pairs
    for x86-64-v3, the scalar conversions for baseline x86-64); this machine builds both and runs
    this file's tests with them, so an AVX2-only machine runs code that was tested here too."""
    run_built_for(arch, __file__, at_least=40)

"""Our CPU product for a full-precision fp32 weight (server/model/dense_cpu.cpp, the base's
lm_head): the fp64 product within fp32 rounding, each row the same bits alone, in any batch, at any
place and on any thread split, on this CPU's build and on the AVX2 and baseline x86-64 builds; bad
input refused; base_linear takes it for a Linear marked at load in both modes, and the loader marks
the lm_head where our CPU kernels run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.model import dense_cpu
from server.model.base_gemm import CPP_DENSE, BaseGemm, base_linear, cpu_dense_rows, keep_dense
from tests.cpu_builds import ARCHES, not_in_a_build, on_one_thread, run_built_for

pytestmark = pytest.mark.skipif(not dense_cpu.load(), reason=f"dense kernel not built: {dense_cpu.error()}")

# (out, in): SmolLM2's lm_head width, the tiny model's, and shapes off the vector width and the
# kernel's tiles (k not a multiple of 8, fewer outputs than a block, more than one tile)
SHAPES = [(700, 576), (48, 64), (17, 13), (5, 1536), (1, 8), (301, 100)]
# every row group of the kernel (four at a time, tails of 1-3), and more than one group
ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 21, 33]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


@pytest.mark.parametrize(("out", "inp"), SHAPES)
def test_matmul_is_the_product(out: int, inp: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inp, generator=g)
    for m in ROW_COUNTS:
        x = torch.randn(m, inp, generator=g)
        got = dense_cpu.matmul(x, weight)
        want = x.double() @ weight.double().T
        assert got.shape == (m, out) and got.dtype == torch.float32
        # fp32 sums of `inp` products, in another order than the fp64 reference's
        bound = 4 * inp * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
        assert ((got.double() - want).abs() <= bound).all(), (m, (got.double() - want).abs().max())


@pytest.mark.invariance
@pytest.mark.parametrize(("out", "inp"), [(700, 576), (301, 100)])
def test_rows_are_the_same_alone_in_any_batch_at_any_place(out: int, inp: int) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out, inp, generator=g)
    x = torch.randn(max(ROW_COUNTS), inp, generator=g)
    alone = torch.cat([dense_cpu.matmul(x[i : i + 1], weight) for i in range(x.shape[0])])
    for m in ROW_COUNTS:
        for shift in (0, 1, 3):
            got = dense_cpu.matmul(torch.roll(x, shift, 0)[:m], weight)
            assert torch.equal(_bits(got), _bits(torch.roll(alone, shift, 0)[:m])), (m, shift)
    one = on_one_thread(lambda: dense_cpu.matmul(x, weight))
    assert torch.equal(_bits(one), _bits(alone))


def test_empty_and_strided_input() -> None:
    weight = torch.randn(40, 24)
    assert dense_cpu.matmul(torch.randn(0, 24), weight).shape == (0, 40)
    assert torch.equal(dense_cpu.matmul(torch.randn(3, 0), torch.randn(40, 0)), torch.zeros(3, 40))
    x = torch.randn(24, 6).T  # rows not contiguous: the kernel copies them, the values are the same
    assert torch.equal(dense_cpu.matmul(x, weight), dense_cpu.matmul(x.contiguous(), weight))


def test_refuses_bad_input() -> None:
    weight = torch.randn(40, 24)
    x = torch.randn(3, 24)
    with pytest.raises(RuntimeError, match="fp32 x and weight"):
        dense_cpu.matmul(x.double(), weight)
    with pytest.raises(RuntimeError, match="fp32 x and weight"):
        dense_cpu.matmul(x, weight.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        dense_cpu.matmul(x[:, :20], weight)
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        dense_cpu.matmul(x[0], weight)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        dense_cpu.matmul(x, torch.randn(24, 40).T)
    assert not dense_cpu.takes(torch.randn(24, 40).T) and not dense_cpu.takes(weight.half())
    assert dense_cpu.takes(weight)


def test_a_linear_runs_through_it_in_both_modes() -> None:
    """base_linear on a Linear the loader marked (keep_dense): the kernel's product in `tiled` at any
    row count and in `plain` up to cpu_dense_rows() rows, F.linear above; nothing marked where our CPU
    kernels do not run (`dequant` bnb) or for a weight the kernel does not take."""
    linear = nn.Linear(64, 48).requires_grad_(False)
    keep_dense(linear, "bnb")
    assert not getattr(linear, CPP_DENSE, False)
    keep_dense(nn.Linear(64, 48).half(), "cpp")
    keep_dense(linear, "cpp")
    assert getattr(linear, CPP_DENSE, False) == dense_cpu.vectorized()
    limit = cpu_dense_rows()
    x = torch.randn(limit + 3, 64, generator=torch.Generator().manual_seed(2))
    for mode in (BaseGemm.TILED, BaseGemm.PLAIN):
        for m in (1, 7, limit, limit + 3):
            got = base_linear(x[:m], linear, mode)
            plain_above = mode is BaseGemm.PLAIN and m > limit
            if dense_cpu.vectorized() and not plain_above:
                assert torch.equal(got, dense_cpu.matmul(x[:m], linear.weight) + linear.bias), (mode, m)
            elif plain_above:
                assert torch.equal(got, F.linear(x[:m], linear.weight, linear.bias)), (mode, m)
            assert torch.allclose(got, F.linear(x[:m], linear.weight, linear.bias), rtol=0, atol=1e-5)


def test_a_marked_weight_off_a_cache_line_moves_to_one_with_its_tied_embedding() -> None:
    """keep_dense moves a weight that does not start on a 64-byte line (the GGUF reader leaves
    SmolLM2's tied embeddings so, and every AVX-512 load would straddle two lines) to one: the same
    values, and the tied embedding still the same Parameter."""
    buffer = torch.randn(48 * 64 + 2, generator=torch.Generator().manual_seed(5))
    head = nn.Linear(64, 48, bias=False).requires_grad_(False)
    head.weight.data = buffer[2:].view(48, 64)  # 8 bytes past torch's 64-byte alignment
    embedding = nn.Embedding(48, 64)
    embedding.weight = head.weight
    assert head.weight.data_ptr() % 64 == 8
    keep_dense(head, "cpp")
    if not dense_cpu.vectorized():
        return
    assert head.weight.data_ptr() % 64 == 0 and embedding.weight is head.weight
    assert torch.equal(head.weight, buffer[2:].view(48, 64))


def test_a_saved_lm_head_copy_off_a_cache_line_is_moved_onto_one() -> None:
    """safetensors places a tensor at any multiple of 8 bytes: an adapter's lm_head copy, which runs
    the base head's product, is kept on a 64-byte line, with the same values."""
    from server.lora.saved import SaveableModule, split_saved

    buffer = torch.randn(48 * 64 + 2, generator=torch.Generator().manual_seed(6))
    weight = buffer[2:].view(48, 64)  # 8 bytes past torch's 64-byte alignment
    assert weight.data_ptr() % 64 == 8
    saveable = {"lm_head": SaveableModule("lm_head", {"weight": (48, 64)}, torch.float32)}
    saved, rest = split_saved({"base_model.model.lm_head.weight": weight}, ("lm_head",), saveable, [])
    kept = saved["lm_head"]["weight"]
    assert kept.data_ptr() % 64 == 0 and torch.equal(kept, weight) and not rest


def test_a_saved_lm_head_copy_takes_the_base_heads_product() -> None:
    """An adapter's lm_head copy (modules_to_save) runs the product the base's lm_head runs: ours
    where the base's is marked, else F.linear or the 16-row tiles."""
    from server.lora.saved import dense_linear
    from server.model.base_gemm import tiled_linear

    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(5, 64, generator=g)
    for mode in (BaseGemm.TILED, BaseGemm.PLAIN):
        got = dense_linear(x, weight, bias, mode, cpp=True)
        assert torch.equal(got, dense_cpu.matmul(x, weight) + bias), mode
    assert torch.equal(dense_linear(x, weight, bias, BaseGemm.TILED), tiled_linear(x, weight, bias))
    assert torch.equal(dense_linear(x, weight, bias, BaseGemm.PLAIN), F.linear(x, weight, bias))


def test_the_loader_marks_the_lm_head(tiny_checkpoint: Callable[[str], Path]) -> None:
    from server.model.loader import load_base

    path = tiny_checkpoint("llama")
    for dequant in ("cpp", "bnb"):
        base = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=1, dequant=dequant)
        marked = getattr(base.model.lm_head, CPP_DENSE, False)
        assert marked == (dequant == "cpp" and dense_cpu.vectorized()), dequant


@not_in_a_build
@pytest.mark.parametrize("arch", ARCHES)
def test_the_code_other_cpus_build(arch: str) -> None:
    """The AVX2 path and the scalar one, built here and run through this file's product and
    invariance tests, so an AVX2-only machine runs code that was tested here too."""
    run_built_for(arch, __file__, at_least=10, keyword="product or alone or empty or refuses")

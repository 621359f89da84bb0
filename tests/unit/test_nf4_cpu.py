"""Our CPU NF4 dequantization (server/model/nf4_cpu.cpp) against its reference, bitsandbytes'
`dequantize_4bit`: the same bits for every weight (signed zeros included), on this CPU's build and
on the AVX2 and baseline x86-64 builds; bad input refused; a loaded base that uses it computes
bitsandbytes' logits bit for bit. Its product that never writes the weight out (`matmul`): the
dequantized weight's product within fp32 rounding, each row the same bits alone, in any batch, at
any place and on any thread split, on the same three builds; a base that uses it gives
bitsandbytes' logits within that rounding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.model import nf4_cpu
from server.model.base_gemm import CPP_DEQUANT, CPP_MATMUL, decoded_state
from tests.cpu_builds import ARCHES, not_in_a_build, on_one_thread, run_built_for

pytestmark = pytest.mark.skipif(not nf4_cpu.load(), reason=f"NF4 kernel not built: {nf4_cpu.error()}")

# (out, in): SmolLM2-135M's projections, the tiny test model's, and shapes off every vector width
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (128, 64), (17, 64), (3, 128)]


def _quantized(out: int, inp: int, blocksize: int, seed: int = 0) -> tuple[torch.Tensor, Any]:
    """A double-quantized NF4 weight (QLoRA's format) with its block scales decoded, as the loader
    keeps them; one block all zeros, and one of negative codes whose scale is then set to zero, so
    that both signed zeros occur."""
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (torch.rand(out, 1, generator=g) * 4 + 0.01)
    flat = w.view(-1)
    flat[:blocksize] = 0.0
    flat[blocksize : 2 * blocksize] = -flat[blocksize : 2 * blocksize].abs()
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    plain = decoded_state(state)
    plain.absmax[1] = 0.0  # negative codes times +0: -0.0
    return packed, plain


@pytest.mark.parametrize("blocksize", [64, 32])
@pytest.mark.parametrize(("out", "inp"), SHAPES)
def test_same_bits_as_bitsandbytes(out: int, inp: int, blocksize: int) -> None:
    import bitsandbytes.functional as bnbf

    packed, state = _quantized(out, inp, blocksize)
    assert nf4_cpu.takes(packed, state)
    want = bnbf.dequantize_4bit(packed, state)
    got = nf4_cpu.dequantize(packed, state)
    assert got.shape == want.shape == (out, inp) and got.dtype == torch.float32
    # compared as bits: torch.equal would let -0.0 pass for 0.0
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any(), "no signed zero tested"


def test_thread_split_changes_nothing() -> None:
    packed, state = _quantized(1536, 576, 64)
    one = on_one_thread(lambda: nf4_cpu.dequantize(packed, state))
    assert torch.equal(nf4_cpu.dequantize(packed, state).view(torch.int32), one.view(torch.int32))


# every row group of the kernel (eight at a time, tails of 1-7), and more than one group
ROW_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 21, 33]


@pytest.mark.parametrize("blocksize", [64, 32])
@pytest.mark.parametrize(("out", "inp"), SHAPES)
def test_matmul_is_the_dequantized_product(out: int, inp: int, blocksize: int) -> None:
    packed, state = _quantized(out, inp, blocksize)
    weight = nf4_cpu.dequantize(packed, state).double()
    g = torch.Generator().manual_seed(1)
    for m in ROW_COUNTS:
        x = torch.randn(m, inp, generator=g)
        got = nf4_cpu.matmul(x, packed, state)
        want = x.double() @ weight.T
        assert got.shape == (m, out) and got.dtype == torch.float32
        # fp32 sums of `inp` products, in another order than the fp64 reference's
        bound = 4 * inp * 2.0**-24 * (x.double().abs() @ weight.abs().T)
        assert ((got.double() - want).abs() <= bound).all(), (m, (got.double() - want).abs().max())


@pytest.mark.invariance
def test_matmul_rows_are_the_same_alone_in_any_batch_at_any_place() -> None:
    packed, state = _quantized(192, 576, 64)
    x = torch.randn(max(ROW_COUNTS), 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([nf4_cpu.matmul(x[i : i + 1], packed, state) for i in range(x.shape[0])])
    for m in ROW_COUNTS:
        for shift in (0, 1, 5):
            rows = torch.roll(x, shift, 0)[:m]
            got = nf4_cpu.matmul(rows, packed, state)
            want = torch.roll(alone, shift, 0)[:m]
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (m, shift)
    one = on_one_thread(lambda: nf4_cpu.matmul(x, packed, state))
    assert torch.equal(one.view(torch.int32), alone.view(torch.int32))


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_linear4bit_runs_through_it_in_both_modes(double_quant: bool) -> None:
    """base_linear on a bitsandbytes Linear4bit as the loader prepares it (keep_block_scales), with
    QLoRA's double-quantized scales or plain ones: the kernel's product in `tiled` at any row count
    and in `plain` up to cpu_matmul_rows() rows; dequantize + matmul above."""
    import bitsandbytes as bnb
    import torch.nn.functional as F

    from server.model.base_gemm import (
        BaseGemm,
        base_linear,
        cpu_matmul_rows,
        dequantized_weight,
        keep_block_scales,
        nf4_state,
    )

    linear = bnb.nn.Linear4bit(128, 48, bias=True, compress_statistics=double_quant, quant_type="nf4")
    linear.load_state_dict({"weight": torch.randn(48, 128), "bias": torch.randn(48)})
    linear = linear.to("cpu")  # quantizes
    keep_block_scales(linear, "cpp")
    assert getattr(linear, CPP_MATMUL) == nf4_cpu.vectorized()
    weight = dequantized_weight(linear, torch.float32)
    state = nf4_state(linear)
    assert (state is getattr(linear.weight, "quant_state", None)) == (not double_quant)
    limit = cpu_matmul_rows()
    x = torch.randn(limit + 3, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for mode in (BaseGemm.TILED, BaseGemm.PLAIN):
            for m in (1, limit, limit + 3):
                got = base_linear(x[:m], linear, mode)
                plain_above = mode is BaseGemm.PLAIN and m > limit
                if nf4_cpu.vectorized() and not plain_above:
                    want = nf4_cpu.matmul(x[:m], linear.weight.data, state) + linear.bias
                    assert torch.equal(got, want), (mode, m)
                assert torch.allclose(got, F.linear(x[:m], weight, linear.bias), rtol=0, atol=1e-4), (mode, m)


def test_what_it_does_not_take_stays_with_bitsandbytes() -> None:
    import bitsandbytes.functional as bnbf

    w = torch.randn(64, 128)
    packed, nested = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert not nf4_cpu.takes(packed, nested), "nested scales are decoded first (keep_block_scales)"
    packed4, fp4 = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert not nf4_cpu.takes(packed4, fp4)
    assert nf4_cpu.takes(packed, decoded_state(nested))
    # bitsandbytes' CPU kernel computes other values than code * absmax for blocks above 64
    big, state = bnbf.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=True)
    assert not nf4_cpu.takes(big, decoded_state(state))
    # matmul: each weight row whole blocks; 64 x 96 dequantizes (whole blocks overall), not that
    odd, state = bnbf.quantize_4bit(torch.randn(64, 96), blocksize=64, quant_type="nf4")
    assert nf4_cpu.takes(odd, state) and not nf4_cpu.multiplies(odd, state)
    assert nf4_cpu.multiplies(packed, decoded_state(nested)) == nf4_cpu.vectorized()


def test_refuses_bad_input() -> None:
    packed, state = _quantized(64, 128, 64)
    op = torch.ops.loraplex_nf4.dequantize.default
    with pytest.raises(RuntimeError, match="sizes do not match"):
        op(packed, state.absmax, state.code, 64, 64, 256)
    with pytest.raises(RuntimeError, match="whole even blocks"):
        op(packed, state.absmax, state.code, 64, 3, 5)
    with pytest.raises(RuntimeError, match=r"code \[16\] fp32"):
        op(packed, state.absmax, state.code[:8], 64, 64, 128)
    with pytest.raises(RuntimeError, match="absmax must be contiguous fp32"):
        op(packed, state.absmax.double(), state.code, 64, 64, 128)
    mm = torch.ops.loraplex_nf4.matmul.default
    x = torch.randn(3, 128)
    with pytest.raises(RuntimeError, match=r"x must be \[M, cols\] fp32"):
        mm(x.double(), packed, state.absmax, state.code, 64, 64, 128)
    with pytest.raises(RuntimeError, match=r"x must be \[M, cols\] fp32"):
        mm(x[:, :64], packed, state.absmax, state.code, 64, 64, 128)
    with pytest.raises(RuntimeError, match="each weight row must be whole blocks"):
        mm(torch.randn(3, 32), packed, state.absmax, state.code, 64, 256, 32)  # rows of half a block
    with pytest.raises(RuntimeError, match="sizes do not match"):
        mm(x, packed, state.absmax, state.code, 64, 64, 256)


def test_a_loaded_base_uses_it_and_gives_bitsandbytes_logits(tiny_checkpoint: Callable[[str], Path]) -> None:
    from server.model.loader import load_base

    path = tiny_checkpoint("llama")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    logits: dict[str, torch.Tensor] = {}
    for dequant in ("cpp", "bnb"):
        base = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=1, dequant=dequant)
        layers = [layer.base for layer in base.lora_layers.values()]
        flags = [getattr(layer, CPP_DEQUANT, False) for layer in layers]
        assert flags and all(flags) == (dequant == "cpp") and any(flags) == (dequant == "cpp"), dequant
        multiplies = [getattr(layer, CPP_MATMUL, False) for layer in layers]
        assert all(multiplies) == any(multiplies) == (dequant == "cpp" and nf4_cpu.vectorized())
        assert base.dequant == dequant
        with torch.no_grad():
            logits[dequant] = base.model(ids).logits
            if dequant == "cpp":  # the dequantized weights' product, without nf4_cpu.matmul
                for layer in layers:
                    setattr(layer, CPP_MATMUL, False)
                logits["cpp dequantized"] = base.model(ids).logits
    assert torch.equal(logits["cpp dequantized"], logits["bnb"])
    # the same weights, summed in another order: within fp32 rounding of logits about 1 in size
    assert torch.allclose(logits["cpp"], logits["bnb"], rtol=0, atol=1e-5)


@not_in_a_build
@pytest.mark.parametrize("arch", ARCHES)
def test_the_code_other_cpus_build(arch: str) -> None:
    """The AVX2 path (two 8-entry permutes per lookup) and the scalar one, built here and run
    through this file's bitwise tests and its product's, so an AVX2-only machine runs code that was
    tested here too (the scalar `matmul` too, which the base leaves unused: it is only correct)."""
    run_built_for(arch, __file__, at_least=31, keyword="same_bits or split or refuses or matmul")

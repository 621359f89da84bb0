"""The NF4 Triton matmul (interpreted on CPU) against bitsandbytes' dequantization + a matmul, and
the whole tiny model with it as the base matmul (opt-in `nf4_triton`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.model.base_gemm import BaseGemm, decoded_state
from server.model.loader import load_base
from tests.interpreter import INTERPRETER_ROW_ORDER

nf4_matmul = pytest.importorskip("server.model.nf4_matmul", reason="the triton extra is not installed")
bnbf = pytest.importorskip("bitsandbytes.functional")


def _weight(n: int, k: int) -> tuple[torch.Tensor, object]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(200, 128), (64, 192)])
def test_matches_dequantize_then_matmul(dtype: torch.dtype, n: int, k: int) -> None:
    """Each weight decoded as bitsandbytes decodes it; the sums in another order: within rounding."""
    packed, state = _weight(n, k)
    plain = decoded_state(state)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=g)
    for m in (1, 3, 16, 17, 40):
        x = torch.randn(2, m, k, generator=g).to(dtype)
        got = nf4_matmul.nf4_linear(x, packed, plain, bias)
        want = F.linear(x.float(), bnbf.dequantize_4bit(packed, state).to(dtype).float(), bias)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert got.dtype == dtype and got.shape == (2, m, n)
        assert torch.allclose(got.float(), want, rtol=tol, atol=tol), f"m={m} {dtype}"


@pytest.mark.invariance
@INTERPRETER_ROW_ORDER
def test_rows_alone_equal_batched() -> None:
    packed, state = _weight(96, 128)
    plain = decoded_state(state)
    x = torch.randn(37, 128, generator=torch.Generator().manual_seed(2))
    batched = nf4_matmul.nf4_linear(x, packed, plain, None)
    for i in range(37):
        assert torch.equal(nf4_matmul.nf4_linear(x[i : i + 1], packed, plain, None)[0], batched[i]), i


def test_formats_it_cannot_decode_are_refused() -> None:
    assert nf4_matmul.fits(576, 64, "nf4")
    assert not nf4_matmul.fits(576, 128, "nf4")
    assert not nf4_matmul.fits(576, 64, "fp4")
    assert not nf4_matmul.fits(100, 64, "nf4")


def test_tiny_model_with_the_kernel_as_base(tiny_checkpoint: Callable[[str], Path]) -> None:
    """The tiny Llama with `nf4_triton` as its base matmul (q/k/v and gate/up fused, as the triton
    backend runs them) gives the `tiled` logits within rounding."""
    path = tiny_checkpoint("llama")
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in (BaseGemm.TILED, BaseGemm.NF4_TRITON):
        base = load_base(
            path, "tiny", quantization="nf4", device="cpu", max_loras=2, max_lora_rank=8,
            lora_backend="triton", base_gemm=mode,
        )  # fmt: skip
        with torch.no_grad():
            logits[mode] = base.model(ids).logits
    assert torch.allclose(logits[BaseGemm.NF4_TRITON], logits[BaseGemm.TILED], rtol=1e-4, atol=1e-3)
    assert torch.equal(logits[BaseGemm.NF4_TRITON].argmax(-1), logits[BaseGemm.TILED].argmax(-1))

"""Our CPU NF4 dequantization (server/model/nf4_cpu.cpp) against its reference, bitsandbytes'
`dequantize_4bit`: the same bits for every weight (signed zeros included), on this CPU's build and
on the AVX2 and baseline x86-64 builds; bad input refused; a loaded base that uses it computes
bitsandbytes' logits bit for bit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.model import nf4_cpu
from server.model.base_gemm import CPP_DEQUANT, decoded_state

pytestmark = pytest.mark.skipif(not nf4_cpu.load(), reason=f"NF4 kernel not built: {nf4_cpu.error()}")

ROOT = Path(__file__).resolve().parents[2]
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
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nf4_cpu.dequantize(packed, state)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(nf4_cpu.dequantize(packed, state).view(torch.int32), one.view(torch.int32))


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


def test_a_loaded_base_uses_it_and_gives_bitsandbytes_logits(tiny_checkpoint: Callable[[str], Path]) -> None:
    from server.model.loader import load_base

    path = tiny_checkpoint("llama")
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = {}
    for dequant in ("cpp", "bnb"):
        base = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=1, dequant=dequant)
        flags = [getattr(layer.base, CPP_DEQUANT, False) for layer in base.lora_layers.values()]
        assert flags and all(flags) == (dequant == "cpp") and any(flags) == (dequant == "cpp"), dequant
        assert base.dequant == dequant
        with torch.no_grad():
            logits[dequant] = base.model(ids).logits
    assert torch.equal(logits["cpp"], logits["bnb"])


@pytest.mark.skipif(bool(os.environ.get("LORAPLEX_CPP_ARCH")), reason="already a build for another CPU")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_the_code_other_cpus_build(arch: str) -> None:
    """The AVX2 path (two 8-entry permutes per lookup) and the scalar one, built here and run
    through this file's bitwise tests, so an AVX2-only machine runs code that was tested here too."""
    env = {**os.environ, "LORAPLEX_CPP_ARCH": arch, "PYTHONPATH": str(ROOT)}
    tests = "same_bits or split or refuses"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests, str(Path(__file__))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None and int(passed.group(1)) >= 16, out.stdout[-500:]  # built, not skipped

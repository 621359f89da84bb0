"""The compiled RMSNorm (server/model/fused_norms.py) against transformers' own modules."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from server.model.fused_norms import NORM_CLASSES, fuse_rms_norms, rms_norm


def _norm(cls: Any, dtype: torch.dtype) -> Any:  # transformers' norm classes share no base
    module = cls(576, eps=1e-5).to(dtype)
    module.weight.data = torch.randn(576, generator=torch.Generator().manual_seed(0)).to(dtype)
    return module


def test_the_reference_is_transformers_formula_for_every_class_it_replaces() -> None:
    """Each listed class still has Llama's forward (a new transformers could change one), and the
    plain reference gives its bits."""
    classes = (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)
    assert tuple(c.__name__ for c in classes) == NORM_CLASSES
    source = inspect.getsource(LlamaRMSNorm.forward)
    for cls in classes:
        assert inspect.getsource(cls.forward) == source, cls.__name__
    x = torch.randn(9, 576, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        module = _norm(LlamaRMSNorm, dtype)
        assert torch.equal(rms_norm(x.to(dtype), module.weight, 1e-5), module(x.to(dtype)))


@pytest.mark.slow  # compiles (Inductor's C++ kernels on a CPU), about 10 s
def test_the_compiled_norm_matches_and_keeps_each_rows_bits() -> None:
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        module = _norm(Qwen2RMSNorm, dtype)
        xs = x.to(dtype)
        want = module(xs)
        holder = nn.Sequential(module, nn.Linear(576, 576))
        assert fuse_rms_norms(holder) == 1  # the norm, not the linear
        got = module(xs)
        # casts rounded as eager rounds them (emulate_precision_casts); the mean's order may differ
        assert torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5), dtype
        alone = torch.cat([module(xs[i : i + 1]) for i in range(len(xs))])
        assert torch.equal(alone, got), f"{dtype}: a row alone differs from the same row batched"

"""Adapters made with PEFT itself (the oracle), with non-zero B so that they change the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


def make_adapter(model_factory: Any, out_dir: Path, seed: int, b_scale: float = 1.0, **lora: Any) -> Path:
    """Wrap a fresh base from `model_factory()` with PEFT, randomize A and B, save in PEFT format."""
    torch.manual_seed(seed)
    base: nn.Module = model_factory()
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def make_method_adapter(model_factory: Any, out_dir: Path, seed: int, config: Any) -> Path:
    """Any PEFT method (DoRA, AdaLoRA, (IA)3, ...) with every trainable tensor drawn at random, so
    that each part of the method changes the output: factors around 0, vectors and magnitudes
    around their initial values (1 for (IA)3, the weight norms for DoRA), modules_to_save copies
    around the base module's weights."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model_factory(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name or "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.5 * torch.randn_like(p))
            elif "lora_E" in name:
                # AdaLoRA's singular values, a third factor: small, or the update dwarfs the layer and
                # fp32 rounding (PEFT's products vs ours, 3e-7 relative) grows into flipped tokens
                p.copy_(torch.randn_like(p) * 0.05)
            elif any(k in name for k in ("lora_A", "lora_B")):
                # beside modules_to_save copies (which change the model already) a small update: a
                # large random one on the real model grows fp32 rounding into logit gaps of several units
                p.copy_(torch.randn_like(p) * (0.05 if getattr(config, "modules_to_save", None) else 0.5))
            elif "modules_to_save" in name:  # a trained copy: the base module's values, moved
                noise = torch.randn_like(p)
                if p.dim() == 1:
                    p.mul_(1.0 + 0.3 * noise)
                else:
                    p.add_(noise * 0.5 * p.std())
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def edited_copy(src: Path, dst: Path, config: dict[str, Any] | None = None, tensors: Any = None) -> Path:
    """A copy of a PEFT adapter directory with config keys overridden and `tensors(dict)` applied
    to its weights (a malformed upload made from a valid one)."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = safetensors.torch.load_file(src / "adapter_model.safetensors")
    if tensors is not None:
        tensors(weights)
    safetensors.torch.save_file(weights, dst / "adapter_model.safetensors")
    return dst


def assert_refused_and_store_unchanged(registry: Any, store_dir: Path, bad: Path, reason: str) -> None:
    """Adding `bad` raises an AdapterError whose message holds `reason`, and the store's files and
    the registry's names are what they were."""
    import pytest

    from server.errors import AdapterError

    def files() -> list[tuple[Path, bytes]]:
        return sorted((p.relative_to(store_dir), p.read_bytes()) for p in store_dir.rglob("*") if p.is_file())

    before, names = files(), [r.name for r in registry.records()]
    with pytest.raises(AdapterError) as info:
        registry.add_dir("bad", bad)
    assert reason in str(info.value)
    assert files() == before
    assert [r.name for r in registry.records()] == names

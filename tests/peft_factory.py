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


# every norm named: PEFT 0.22 matches "norm" to model.norm alone, earlier versions to all of them
NORMS = ("norm", "input_layernorm", "post_attention_layernorm")


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


def every_method_configs(rank: int = 8, virtual_tokens: int = 8) -> dict[str, Any]:
    """One PEFT config per method beyond plain LoRA that loraplex serves: DoRA, AdaLoRA, (IA)3,
    LoRA with modules_to_save copies (lm_head, the input embedding, every norm), prompt tuning,
    P-tuning and prefix tuning (the e2e test on SmolLM2 and bench/gpu_check.py's methods phase)."""
    from peft import AdaLoraConfig, IA3Config, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    v = virtual_tokens
    return {
        "dora": LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
            init_lora_weights=False,
        ),
        "adalora": AdaLoraConfig(
            init_r=rank + rank // 2, target_r=rank, lora_alpha=2 * rank,
            target_modules=["q_proj", "k_proj", "up_proj"], total_step=10,
        ),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        # a tied base (SmolLM2) gets two copies, trained apart, as PEFT makes them
        "saved": LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            modules_to_save=["lm_head", "embed_tokens", *NORMS],
        ),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=v),
        "ptuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=v, encoder_hidden_size=64),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=v),
    }  # fmt: skip

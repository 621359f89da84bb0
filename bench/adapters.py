"""Random PEFT-format LoRA adapters for the benchmarks, written straight to safetensors (fast
enough for a thousand) and kept under the cache directory so later runs reuse them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.lora.adapter import LinearShape

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(
    out: Path,
    shapes: dict[str, LinearShape],
    rank: int,
    seed: int,
    targets: tuple[str, ...] = ALL_PROJECTIONS,
    dtype: torch.dtype = torch.float32,
    base_model: str = "SmolLM2-135M-Instruct",
) -> Path:
    """One adapter in PEFT's on-disk format (what PEFT's own save_pretrained writes), A and B
    both non-zero so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, s in shapes.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = (
            torch.randn(rank, s.in_features, generator=g) / s.in_features**0.5
        ).to(dtype)
        tensors[f"{key}.lora_B.weight"] = (torch.randn(s.out_features, rank, generator=g) * 0.02).to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def default_shapes() -> dict[str, LinearShape]:
    """The default model's LoRA target shapes without loading its weights (meta device), named as
    the server's loader names them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.config import default_cache_dir
    from server.model.loader import target_linears
    from server.model.source import resolve_model

    path, _ = resolve_model(None, default_cache_dir())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return {n: LinearShape(m.in_features, m.out_features) for n, m in target_linears(model).items()}


def adapter_set(
    shapes: dict[str, LinearShape],
    count: int,
    rank: int,
    targets: tuple[str, ...] = ALL_PROJECTIONS,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """`count` distinct adapters (seeds 0..count-1), written once under the cache and reused."""
    from server.config import default_cache_dir  # pydantic: imported here so gpu_check can skip it

    # the shapes are in the name: adapters made for another model must not be reused for this one
    shaped = hashlib.sha256(
        repr(sorted((n, s.in_features, s.out_features) for n, s in shapes.items())).encode()
    )
    kind = f"{'-'.join(t.split('_')[0] for t in targets)}-{str(dtype).split('.')[-1]}"
    tag = f"r{rank}-{kind}-{shaped.hexdigest()[:8]}"
    root = default_cache_dir() / "bench" / tag
    paths = []
    for i in range(count):
        path = root / f"a{i:04d}"
        if not (path / "adapter_config.json").is_file():
            write_adapter(path, shapes, rank, seed=i, targets=targets, dtype=dtype)
        paths.append(path)
    return paths

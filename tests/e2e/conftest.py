"""The real default model (SmolLM2-135M-Instruct, NF4) and four PEFT-made adapters over it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.config import EngineConfig, default_cache_dir
from server.engine.engine import LLMEngine
from server.lora.registry import AdapterRegistry
from server.model.base_gemm import BaseGemm
from server.model.loader import BaseModel, load_base, load_stock
from server.model.source import resolve_model
from tests.peft_factory import make_adapter

MAX_RANK = 16
BUFFER_SLOTS = 8  # the mixed-method test puts eight adapters in one step
PROMPTS = [
    "What is the capital of France?",
    "Write two sentences about the sea.",
    "Give me three tips for learning to cook.",
]
# Different ranks and targets; one with rank/alpha patterns, one with rsLoRA. b_scale multiplies
# PEFT's random lora_B so each adapter visibly changes the output without drowning the base.
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv-r4": {"b_scale": 2.0, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp-r8-half": {
        "b_scale": 2.0,
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "layers_to_transform": list(range(15)),
    },
    "patterns": {
        "b_scale": 0.6,
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "rank_pattern": {"q_proj": 16, "down_proj": 4},
        "alpha_pattern": {"o_proj": 32},
    },
    "rslora-r16": {
        "b_scale": 0.3,
        "r": 16,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": r".*\.(k_proj|o_proj)$",
    },
}


@pytest.fixture(scope="session")
def model_path() -> Path:
    path, _ = resolve_model(None, default_cache_dir())
    return path


@pytest.fixture(scope="session")
def base(model_path: Path) -> BaseModel:
    return load_base(
        model_path,
        "SmolLM2-135M-Instruct",
        quantization="nf4",
        device="cpu",
        max_loras=BUFFER_SLOTS,
        max_lora_rank=MAX_RANK,
        base_gemm=BaseGemm.TILED,  # the exactness tests run in the batch-invariant mode
    )


@pytest.fixture(scope="session")
def adapter_dirs(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")

    def factory() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    return {
        name: make_adapter(factory, root / name, seed=i, **cfg)
        for i, (name, cfg) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="session")
def registry(base: BaseModel, adapter_dirs: dict[str, Path]) -> AdapterRegistry:
    reg = AdapterRegistry(base.linear_shapes, MAX_RANK)
    for name, d in adapter_dirs.items():
        reg.add_dir(name, d)
    return reg


@pytest.fixture(scope="session")
def prompt_ids(base: BaseModel) -> list[list[int]]:
    return [base.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]


EngineFactory = Callable[..., LLMEngine]


@pytest.fixture(scope="session")
def make_engine(base: BaseModel, registry: AdapterRegistry) -> EngineFactory:
    def make(**overrides: Any) -> LLMEngine:
        cfg = {
            "max_loras": BUFFER_SLOTS,
            "max_lora_rank": MAX_RANK,
            "max_num_seqs": 32,
            "max_model_len": 1024,
            "kv_cache_tokens": 8192,
            **overrides,
        }
        return LLMEngine(base, registry, EngineConfig(**cfg))

    return make


def nf4_reference(model_path: Path) -> Any:
    """The oracle's base: stock transformers (SDPA attention, no LoRA layers) on the same NF4
    checkpoint, with the same exact NF4 arithmetic as the engine (see the loader)."""
    return load_stock(model_path, "nf4")


FIRST = ("test_soak.py",)  # a fixed two minutes of load: started first, it cannot end the run alone


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-xdist hands files to the workers in collection order, and whichever file comes last
    runs with the other worker idle: the soak's fixed wall-clock time goes first instead."""
    items.sort(key=lambda item: item.path.name not in FIRST)

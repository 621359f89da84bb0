"""Every adapter shipped in adapters/ loads and decodes exactly like PEFT on the same NF4 base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.lora.registry import AdapterRegistry
from server.model.loader import BaseModel
from tests.drive import greedy
from tests.e2e.conftest import BUFFER_SLOTS, MAX_RANK, PROMPTS, nf4_reference

pytestmark = pytest.mark.e2e
SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
NAMES = sorted(p.name for p in SHIPPED.iterdir() if (p / "adapter_config.json").is_file())
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def peft_reference(model_path: Path) -> Any:
    from peft import PeftModel

    ref = nf4_reference(model_path)
    model = PeftModel.from_pretrained(ref, SHIPPED / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(SHIPPED / name, adapter_name=name)
    return model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_shipped_adapter_matches_peft(
    name: str, base: BaseModel, prompt_ids: list[list[int]], peft_reference: Any
) -> None:
    registry = AdapterRegistry(base.linear_shapes, MAX_RANK)
    record, weights = registry.add_dir(name, SHIPPED / name)
    assert weights.max_rank <= 16 and record.size_bytes < 16 << 20
    engine = LLMEngine(
        base,
        registry,
        EngineConfig(
            max_loras=BUFFER_SLOTS, max_lora_rank=MAX_RANK, max_model_len=1024, kv_cache_tokens=4096
        ),
    )
    peft_reference.set_adapter(name)
    for p, ids in enumerate(prompt_ids[:2]):
        ours = greedy(engine, [(f"{name}/{p}", record, ids)], NEW_TOKENS)[f"{name}/{p}"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = peft_reference.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
            )
        assert ours == out[0, len(ids) :].tolist(), f"{name} on {PROMPTS[p]!r}: engine != PEFT"

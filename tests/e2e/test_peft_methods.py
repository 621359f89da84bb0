"""DoRA, AdaLoRA, (IA)3, modules_to_save, prompt tuning, P-tuning and prefix tuning on the real
default model in NF4: adapters made by PEFT itself (every trained tensor drawn at random), 32
greedy tokens on each prompt equal PEFT's with the adapter alone (its `generate`, or for the
prompt-learning methods the references of tests/peft_oracle.py), and the same tokens come out of
one batch holding every method, a plain LoRA adapter and base requests at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.lora.registry import AdapterRegistry
from server.model.loader import BaseModel
from tests.drive import greedy
from tests.e2e.conftest import BUFFER_SLOTS, MAX_RANK, nf4_reference
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, ServerProc, upload
from tests.peft_factory import every_method_configs, make_method_adapter
from tests.peft_oracle import reference_greedy

pytestmark = pytest.mark.e2e
NEW_TOKENS = 32
PLAIN = "qv-r4"  # a plain LoRA adapter of the session's registry


@pytest.fixture(scope="module")
def method_dirs(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("methods")

    def factory() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    return {
        name: make_method_adapter(factory, root / name, 10 + i, cfg)
        for i, (name, cfg) in enumerate(every_method_configs().items())
    }


@pytest.fixture(scope="module")
def methods(base: BaseModel, method_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> AdapterRegistry:
    registry = AdapterRegistry(
        base.linear_shapes, MAX_RANK, saveable=base.saveable, max_saved_bytes=1 << 30, dims=base.dims
    )
    for name, directory in [*method_dirs.items(), (PLAIN, adapter_dirs[PLAIN])]:
        registry.add_dir(name, directory)
    return registry


def engine(base: BaseModel, registry: AdapterRegistry) -> LLMEngine:
    config = EngineConfig(
        max_loras=BUFFER_SLOTS,
        max_lora_rank=MAX_RANK,
        max_num_seqs=32,
        max_model_len=1024,
        kv_cache_tokens=8192,
    )
    return LLMEngine(base, registry, config)


# PEFT recomputes DoRA's norms in every forward on CPU: minutes, alone on a quiet machine
@pytest.mark.timeout(1800)
def test_every_method_equals_peft_alone_and_in_one_mixed_batch(
    base: BaseModel,
    methods: AdapterRegistry,
    method_dirs: dict[str, Path],
    model_path: Path,
    prompt_ids: list[list[int]],
) -> None:
    from peft import PeftModel

    names = [None, PLAIN, *method_dirs]
    jobs = [
        (f"{name or 'base'}/{p}", methods.resolve(name) if name else None, ids)
        for name in names
        for p, ids in enumerate(prompt_ids)
    ]
    mixed_engine = engine(base, methods)
    mixed = greedy(mixed_engine, jobs, NEW_TOKENS)
    assert max(len(r.adapters) for r in mixed_engine.records) == len(names) - 1, "every method shared a step"
    for name in names:
        alone = greedy(
            engine(base, methods), [j for j in jobs if j[0].startswith(f"{name or 'base'}/")], NEW_TOKENS
        )
        assert alone == {rid: mixed[rid] for rid in alone}, f"{name}: alone != inside the mixed batch"

    for name, directory in method_dirs.items():
        peft_model = PeftModel.from_pretrained(nf4_reference(model_path), directory).eval()
        method = methods.resolve(name).method
        for p, ids in enumerate(prompt_ids):
            want = reference_greedy(peft_model, method, ids, NEW_TOKENS)
            assert mixed[f"{name}/{p}"] == want, f"{name}/{p}: engine != PEFT"
        differs = [mixed[f"{name}/{p}"] != mixed[f"base/{p}"] for p in range(len(prompt_ids))]
        assert any(differs), f"{name} gave the base model's tokens on every prompt"


def test_methods_over_http(
    base: BaseModel,
    methods: AdapterRegistry,
    method_dirs: dict[str, Path],
    prompt_ids: list[list[int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Uploaded through /v1/adapters and served to the official openai client: the upload says the
    method, its virtual tokens and its saved modules; greedy text is the engine's; the context limit
    counts the virtual tokens; such an adapter is not a mixing part."""
    import openai

    tokens = 8
    env = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
    with ServerProc(tmp_path_factory.mktemp("methods-store"), env=env) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        for name, method, virtual in (
            ("prompt", "prompt_tuning", 8),
            ("prefix", "prefix_tuning", 8),
            ("saved", "lora", 0),
        ):
            r = upload(server.url, name, method_dirs[name])
            assert r.status_code == 201, r.text
            body = r.json()
            assert (body["method"], body["virtual_tokens"]) == (method, virtual)
            assert bool(body["saved_modules"]) == (name == "saved")
            want = greedy(engine(base, methods), [(name, methods.resolve(name), prompt_ids[0])], tokens)[name]
            got = client.completions.create(
                model=name, prompt=prompt_ids[0], max_tokens=tokens, temperature=0
            )
            assert got.choices[0].text == base.tokenizer.decode(want), name

        with pytest.raises(openai.BadRequestError, match="8 virtual tokens of the adapter"):
            client.completions.create(model="prompt", prompt=[42] * 1010, max_tokens=8)
        with pytest.raises(openai.BadRequestError, match="prompt is prompt_tuning"):
            client.completions.create(model="prompt*0.5", prompt="hi", max_tokens=1)

"""Prompt tuning, P-tuning and prefix tuning on the tiny Llama in NF4, adapters made by PEFT itself.

The references are tests/peft_oracle.py's (PEFT's `generate` is broken for these methods with
transformers 5; it says how); the prefix reference is checked to differ from the base. Every method
gives the same logits, bit for bit, alone and inside one batch with the others, plain LoRA and the
base; refusals name their reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.sequence import SamplingParams, Sequence
from server.lora.registry import AdapterRegistry
from server.lora.store import AdapterStore
from server.model.loader import BaseModel
from tests.drive import greedy
from tests.peft_factory import assert_refused_and_store_unchanged, edited_copy
from tests.peft_oracle import (
    forward_greedy,
    generate_greedy,
    generate_is_an_oracle,
    rebuilt_greedy,
    reference_greedy,
)
from tests.unit.test_engine_tiny import engine_for, hf_model, prompt_ids, record_logits
from tests.unit.test_peft_methods import backend_tokens, make_all, tiny_nf4

TEXTS = ["hello there", "the quick brown fox"]
TOKENS = 12
VIRTUAL = 6
CHUNK = 4  # prompts are prefilled 4 positions at a time: the virtual ones straddle two chunks


def configs() -> dict[str, Any]:
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "ptuning": PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, encoder_hidden_size=32
        ),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }  # fmt: skip


METHOD = {"prompt": "prompt_tuning", "ptuning": "p_tuning", "prefix": "prefix_tuning", "lora": "lora"}


@pytest.fixture(scope="module")
def nf4(tiny_checkpoint: Callable[[str], Path]) -> BaseModel:
    return tiny_nf4(tiny_checkpoint("llama"), 4)


@pytest.fixture(scope="module")
def made(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tiny_checkpoint("llama"), tmp_path_factory.mktemp("virtual"), configs(), seed=20)


def registry_for(base: BaseModel, store: AdapterStore | None = None) -> AdapterRegistry:
    return AdapterRegistry(base.linear_shapes, 8, store, dims=base.dims)


def reference(path: Path, adapter: Path, base: BaseModel, text: str, method: str) -> list[int]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(path, "nf4"), adapter)
    return reference_greedy(model, method, prompt_ids(base, text), TOKENS)


def test_each_method_matches_its_oracle_alone_and_bitwise_in_one_mixed_batch(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    registry = registry_for(nf4)
    for name, directory in made.items():
        record, weights = registry.add_dir(name, directory)
        assert weights.method == METHOD[name]
        assert record.virtual_tokens == (0 if name == "lora" else VIRTUAL)
    jobs = [
        (f"{name}/{p}", registry.resolve(name) if name != "base" else None, prompt_ids(nf4, text))
        for name in ("base", *made)
        for p, text in enumerate(TEXTS)
    ]
    solo: dict[str, list[int]] = {}
    solo_logits: dict[str, list[torch.Tensor]] = {}
    for name in ("base", *made):
        engine = engine_for(nf4, registry, max_loras=4, prefill_chunk_tokens=CHUNK)
        rows = record_logits(engine)
        solo.update(greedy(engine, [j for j in jobs if j[0].startswith(f"{name}/")], max_tokens=TOKENS))
        solo_logits.update(rows)
    engine = engine_for(nf4, registry, max_loras=4, max_num_seqs=len(jobs), prefill_chunk_tokens=CHUNK)
    mixed_logits = record_logits(engine)
    assert greedy(engine, jobs, max_tokens=TOKENS) == solo
    assert any(len(r.adapters) == len(made) for r in engine.records), "every method shared a step"
    for rid, solo_rows in solo_logits.items():
        assert all(torch.equal(a, b) for a, b in zip(solo_rows, mixed_logits[rid], strict=True)), rid

    path = tiny_checkpoint("llama")
    for name in made:
        for p, text in enumerate(TEXTS):
            want = reference(path, made[name], nf4, text, METHOD[name])
            assert solo[f"{name}/{p}"] == want, f"{name}/{p} != reference"
        assert any(solo[f"{name}/{p}"] != solo[f"base/{p}"] for p in range(len(TEXTS))), f"{name} = base"


def test_the_cached_prompt_reference_is_pefts_forward_at_every_step(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The prompt and P-tuning references (PEFT's generate, and the rebuilt one that decodes over a
    cache after PEFT's first forward) give the tokens of PEFT's own forward over the whole sequence
    at every step."""
    from peft import PeftModel

    for name in ("prompt", "ptuning"):
        model = PeftModel.from_pretrained(hf_model(tiny_checkpoint("llama"), "nf4"), made[name])
        for text in TEXTS:
            ids = prompt_ids(nf4, text)
            want = forward_greedy(model, ids, TOKENS)
            assert rebuilt_greedy(model, METHOD[name], ids, TOKENS) == want, f"{name}: {text!r}"
            assert reference_greedy(model, METHOD[name], ids, TOKENS) == want, f"{name}: {text!r}"


def test_the_rebuilt_references_are_pefts_own_generate(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """Where PEFT's generate is right (0.22 on), the references rebuilt for older PEFT give its tokens,
    prefix tuning included."""
    from peft import PeftModel

    if not generate_is_an_oracle():
        pytest.skip("PEFT before 0.22: its generate misses transformers 5's cache for these methods")
    for name in ("prompt", "ptuning", "prefix"):
        model = PeftModel.from_pretrained(hf_model(tiny_checkpoint("llama"), "nf4"), made[name])
        for text in TEXTS:
            ids = prompt_ids(nf4, text)
            want = generate_greedy(model, ids, TOKENS)
            assert rebuilt_greedy(model, METHOD[name], ids, TOKENS) == want, f"{name}: {text!r}"


@pytest.mark.slow
def test_virtual_tokens_give_the_torch_tokens_on_the_triton_and_flex_backends(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The prefix's keys and values written before the Flex backend reads the cache, the prompt
    embeddings beside the Triton LoRA kernels (interpreted): the torch backends' greedy tokens."""
    pytest.importorskip("triton")
    triton = tiny_nf4(tiny_checkpoint("llama"), 4, lora_backend="triton")
    bases = {"torch": nf4, "flex": triton}
    tokens = backend_tokens(bases, made, TEXTS[1], registry_for, max_loras=4, prefill_chunk_tokens=CHUNK)
    assert tokens["flex"] == tokens["torch"]


def test_prompt_logprobs_skip_the_virtual_positions(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """echo + logprobs under prompt tuning: one entry per prompt token (the first None), each the
    log-probability PEFT's forward gives it after the virtual tokens."""
    from peft import PeftModel

    registry = registry_for(nf4)
    record, _ = registry.add_dir("prompt", made["prompt"])
    ids = prompt_ids(nf4, TEXTS[0])
    engine = engine_for(nf4, registry, max_num_batched_tokens=8)
    seq = Sequence("p", ids, SamplingParams(max_tokens=1, prompt_logprobs=0), adapter=record)
    engine.add_request(seq)
    while engine.has_work():
        engine.step()
    assert seq.prompt_logprobs is not None and seq.prompt_logprobs[0] is None
    got = [e.logprob for e in seq.prompt_logprobs[1:] if e is not None]
    assert len(got) == len(ids) - 1

    model = PeftModel.from_pretrained(hf_model(tiny_checkpoint("llama"), "nf4"), made["prompt"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, VIRTUAL:]  # PEFT returns V + n rows
    want = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(got), want, atol=1e-4)


REFUSALS: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, torch.Tensor]], object] | None, str]] = {
    "fewer rows than virtual tokens": ("prompt", {"num_virtual_tokens": 8}, None, "expected [8, 64]"),
    "token_dim of another model": ("prompt", {"token_dim": 32}, None, "does not match the base's hidden"),
    "encoder-decoder prompt": ("prompt", {"num_transformer_submodules": 2}, None, "decoder-only"),
    "too many virtual tokens": ("prompt", {"num_virtual_tokens": 5000}, None, "integer in [1, 1024]"),
    "prefix for other layers": ("prefix", {"num_layers": 3}, None, "prefix for 3 layers"),
    "prefix token_dim of all heads": ("prefix", {"token_dim": 64}, None, "key/value width 2 heads x 16"),
    "an extra tensor": (
        "ptuning", {}, lambda t: t.update({"prompt_encoder.mlp_head.0.weight": torch.ones(2, 2)}),
        "is not part of a p_tuning adapter",
    ),
    "no embeddings": ("prompt", {}, lambda t: t.update({"x": t.pop("prompt_embeddings")}), "not part of"),
    "nan": ("prefix", {}, lambda t: t["prompt_embeddings"].fill_(float("nan")), "NaN or infinite"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_their_reason_and_leave_the_store_unchanged(
    case: str, nf4: BaseModel, made: dict[str, Path], tmp_path: Path
) -> None:
    source, config, tensors, reason = REFUSALS[case]
    registry = registry_for(nf4, AdapterStore(tmp_path / "store"))
    registry.add_dir("kept", made["prompt"])
    bad = edited_copy(made[source], tmp_path / "bad", config, tensors)
    assert_refused_and_store_unchanged(registry, tmp_path / "store", bad, reason)

"""PEFT methods beyond plain LoRA (DoRA, AdaLoRA, (IA)3, modules_to_save) on the tiny Llama in NF4:
each adapter, made by PEFT itself with every trained tensor drawn at random, gives PEFT's greedy
tokens alone and the same logits, bit for bit, inside one batch that mixes every method, plain LoRA
and the base.
Refused methods and malformed tensors name their reason and leave the store unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.errors import AdapterError
from server.lora.mixing import MixError, mix_record
from server.lora.registry import AdapterRegistry
from server.lora.store import AdapterStore
from server.model.base_gemm import BaseGemm
from server.model.loader import BaseModel, load_base
from tests.drive import greedy
from tests.peft_factory import NORMS, assert_refused_and_store_unchanged, edited_copy, make_method_adapter
from tests.unit.test_engine_tiny import engine_for, hf_model, prompt_ids, record_logits

TEXTS = ["hello there", "the quick brown fox"]
TOKENS = 16


SAVED = ["lm_head", "embed_tokens", *NORMS]


def method_configs() -> dict[str, Any]:
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    return {
        "dora": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
            init_lora_weights=False,
        ),
        "adalora": AdaLoraConfig(
            init_r=6, target_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], total_step=10
        ),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        # modules_to_save: its own lm_head, input embedding and every norm, each named
        "saved": LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
            modules_to_save=SAVED,
        ),
        "ia3_saved": IA3Config(
            target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
            modules_to_save=["lm_head"],
        ),
    }  # fmt: skip


METHOD = {"saved": "lora", "ia3_saved": "ia3"}  # what AdapterWeights.method says of each made adapter
SAVED_BUDGET = 1 << 20


def tiny_nf4(path: Path, max_loras: int, lora_backend: str = "torch") -> BaseModel:
    return load_base(
        path, "tiny", quantization="nf4", device="cpu", max_loras=max_loras, max_lora_rank=8,
        base_gemm=BaseGemm.TILED, lora_backend=lora_backend,
    )  # fmt: skip


def make_all(path: Path, root: Path, configs: dict[str, Any], seed: int = 0) -> dict[str, Path]:
    """Each config made into an adapter by PEFT on the tiny checkpoint, seeds from `seed` on."""
    from transformers import AutoModelForCausalLM

    return {
        name: make_method_adapter(lambda: AutoModelForCausalLM.from_pretrained(path), root / name, i, cfg)
        for i, (name, cfg) in enumerate(configs.items(), start=seed)
    }


def backend_tokens(
    bases: dict[str, BaseModel],
    made: dict[str, Path],
    text: str,
    registry: Callable[[BaseModel], AdapterRegistry],
    **engine: Any,
) -> dict[str, dict[str, list[int]]]:
    """Greedy tokens of every adapter in one batch, per attention backend ("torch", "flex") on its
    base (loaded with the torch or the Triton LoRA backend)."""
    tokens = {}
    for attention, base in bases.items():
        reg = registry(base)
        for name, directory in made.items():
            reg.add_dir(name, directory)
        jobs = [(name, reg.resolve(name), prompt_ids(base, text)) for name in made]
        eng = engine_for(base, reg, max_num_seqs=len(jobs), attention_backend=attention, **engine)
        tokens[attention] = greedy(eng, jobs, max_tokens=6)
    return tokens


@pytest.fixture(scope="module")
def nf4(tiny_checkpoint: Callable[[str], Path]) -> BaseModel:
    return tiny_nf4(tiny_checkpoint("llama"), 6)


@pytest.fixture(scope="module")
def made(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tiny_checkpoint("llama"), tmp_path_factory.mktemp("methods"), method_configs())


def peft_greedy(path: Path, adapter: Path, base: BaseModel, texts: list[str]) -> list[list[int]]:
    """PEFT's own generate with the adapter alone, one prompt at a time."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(path, "nf4"), adapter)
    outs = []
    for text in texts:
        ids = prompt_ids(base, text)
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=TOKENS, do_sample=False)
        outs.append([int(t) for t in out[0, len(ids) :]])
    return outs


def test_each_method_matches_peft_alone_and_bitwise_in_one_mixed_batch(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    registry = registry_for(nf4)
    saved: dict[str, Any] = {}
    for name, directory in made.items():
        _, weights = registry.add_dir(name, directory)
        assert weights.method == METHOD.get(name, name)
        saved[name] = weights.saved
    saved = saved["saved"]
    norms = [f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")]
    assert sorted(saved) == ["lm_head", "model.embed_tokens", *norms, "model.norm"]
    assert registry.resolve("saved").saved_modules == tuple(saved)
    with pytest.raises(MixError, match="saved is lora with modules_to_save copies"):
        mix_record([(registry.resolve("saved"), 0.5)], 8, "model")
    jobs = [
        (f"{name}/{p}", registry.resolve(name) if name != "base" else None, prompt_ids(nf4, text))
        for name in ("base", *made)
        for p, text in enumerate(TEXTS)
    ]
    solo: dict[str, list[int]] = {}
    solo_logits: dict[str, list[torch.Tensor]] = {}
    for name in ("base", *made):  # each adapter alone (its prompts together)
        engine = engine_for(nf4, registry, max_loras=6)
        rows = record_logits(engine)
        solo.update(greedy(engine, [j for j in jobs if j[0].startswith(f"{name}/")], max_tokens=TOKENS))
        solo_logits.update(rows)
    engine = engine_for(nf4, registry, max_loras=6, max_num_seqs=len(jobs))
    mixed_logits = record_logits(engine)
    assert greedy(engine, jobs, max_tokens=TOKENS) == solo
    assert any(len(r.adapters) == len(made) for r in engine.records), "every method shared a step"
    for rid, solo_rows in solo_logits.items():
        pairs = zip(solo_rows, mixed_logits[rid], strict=True)
        assert all(torch.equal(a, b) for a, b in pairs), rid

    path = tiny_checkpoint("llama")
    for name, directory in made.items():
        for p, tokens in enumerate(peft_greedy(path, directory, nf4, TEXTS)):
            assert solo[f"{name}/{p}"] == tokens, f"{name}/{p} != PEFT"
        assert any(solo[f"{name}/{p}"] != solo[f"base/{p}"] for p in range(len(TEXTS))), f"{name} = base"


@pytest.mark.slow
def test_every_method_gives_the_torch_tokens_on_the_triton_and_flex_backends(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The Triton SGMV kernels (interpreted on CPU) and the Flex attention backend with every
    method in one batch: DoRA's and (IA)3's row-wise products and the saved modules sit beside the
    kernels, and give the torch backends' greedy tokens."""
    pytest.importorskip("triton")
    triton = tiny_nf4(tiny_checkpoint("llama"), 6, lora_backend="triton")
    tokens = backend_tokens({"torch": nf4, "flex": triton}, made, TEXTS[0], registry_for, max_loras=6)
    assert tokens["flex"] == tokens["torch"]


def test_every_method_gives_the_torch_tokens_on_the_cpp_backend(
    nf4: BaseModel, made: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The cpp kernel with every method in one batch: its steps with DoRA rows fall back to the bag
    form, (IA)3 vectors and saved modules sit around it; the torch backend's greedy tokens."""
    from server.lora.backends import cpp_lora

    if not cpp_lora.load():
        pytest.skip(f"cpp backend not built: {cpp_lora.error()}")
    cpp = tiny_nf4(tiny_checkpoint("llama"), 6, lora_backend="cpp")
    tokens = backend_tokens({"torch": nf4, "cpp": cpp}, made, TEXTS[0], registry_for, max_loras=6)
    assert tokens["cpp"] == tokens["torch"]


def test_a_file_from_peft_before_0_22_is_served_with_every_copy_it_holds(
    nf4: BaseModel, made: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT up to 0.21 matched modules_to_save names as bare suffixes, so "norm" trained a copy of
    every "...layernorm" too, and its files hold them under a config that lists "norm" alone. They
    are the trained model: served, not refused as copies the config does not list."""
    listed = {"modules_to_save": ["lm_head", "embed_tokens", "norm"]}
    old = edited_copy(made["saved"], tmp_path / "old", listed)
    _, weights = registry_for(nf4).add_dir("old", old)
    _, current = registry_for(nf4).add_dir("saved", made["saved"])
    assert sorted(weights.saved) == sorted(current.saved)
    assert any(m.endswith("layers.0.input_layernorm") for m in weights.saved)


def registry_for(
    base: BaseModel, store: AdapterStore | None = None, budget: int = SAVED_BUDGET
) -> AdapterRegistry:
    return AdapterRegistry(base.linear_shapes, 8, store, saveable=base.saveable, max_saved_bytes=budget)


def test_saved_modules_over_the_budget_are_refused_with_their_sizes(
    nf4: BaseModel, made: dict[str, Path]
) -> None:
    with pytest.raises(AdapterError, match=r"saved modules take 51968 bytes \(model.embed_tokens 25\.3 kB"):
        registry_for(nf4, budget=40000).add_dir("big", made["saved"])
    # a modules_to_save copy without a budget for one is refused too, not silently dropped
    with pytest.raises(AdapterError, match="budget for saved modules"):
        AdapterRegistry(nf4.linear_shapes, 8).add_dir("big", made["ia3_saved"])


def test_adalora_keeps_the_ranks_its_rank_pattern_kept(
    nf4: BaseModel, tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """A trained AdaLoRA adapter saves only the ranks its budget kept (here 2 of 6 in one module, none
    in another); the scale stays lora_alpha / init_r, as PEFT keeps ranknum."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama")
    torch.manual_seed(7)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path),
        AdaLoraConfig(
            init_r=6, target_r=2, lora_alpha=12, target_modules=["q_proj", "v_proj"], total_step=10
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    keep = [True, False, True, False, False, False]
    config: Any = model.peft_config["default"]
    config.rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": keep,
        "model.layers.1.self_attn.v_proj.lora_E": [False] * 6,
    }
    model.save_pretrained(str(tmp_path / "pruned"))
    registry = AdapterRegistry(nf4.linear_shapes, 8)
    _, weights = registry.add_dir("pruned", tmp_path / "pruned")
    assert weights.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert "model.layers.1.self_attn.v_proj" not in weights.modules
    assert weights.modules["model.layers.0.self_attn.v_proj"].rank == 6
    job = ("p", registry.resolve("pruned"), prompt_ids(nf4, TEXTS[0]))
    assert [greedy(engine_for(nf4, registry), [job], max_tokens=TOKENS)["p"]] == peft_greedy(
        path, tmp_path / "pruned", nf4, TEXTS[:1]
    )


def _first(weights: dict[str, torch.Tensor], kind: str) -> str:
    return next(k for k in sorted(weights) if kind in k)


REFUSALS: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, torch.Tensor]], object] | None, str]] = {
    "loha": ("lora", {"peft_type": "LOHA"}, None, "no per-token low-rank form"),
    "lokr": ("lora", {"peft_type": "LOKR"}, None, "LoKr"),
    "adalora with dora": ("adalora", {"use_dora": True}, None, "AdaLoRA does not support DoRA"),
    "ia3 feedforward outside targets": (
        "ia3", {"feedforward_modules": ["up_proj"]}, None, "subset of target_modules",
    ),
    "ia3 without feedforward list": (
        "ia3", {"feedforward_modules": None}, None, "feedforward_modules: missing",
    ),
    "ia3 vector of the wrong side": (
        "ia3", {"feedforward_modules": []}, None, "has shape [1, 128], expected [64, 1]",
    ),
    "ia3 nan": ("ia3", {}, lambda t: t[_first(t, "ia3_l")].fill_(float("nan")), "NaN or infinite"),
    "dora without magnitudes": (
        "dora", {}, lambda t: t.pop(_first(t, "magnitude")), "no matching lora_magnitude_vector",
    ),
    "dora magnitude of the wrong size": (
        "dora", {}, lambda t: t.update({_first(t, "magnitude"): torch.ones(3)}), "expected [64]",
    ),
    "adalora rank above the limit": ("adalora", {"init_r": 12}, None, "greater than max_lora_rank 8"),
    "saved lm_head of a resized vocabulary": (
        "saved", {}, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(101, 64)}),
        "resizes the vocabulary",
    ),
    "saved copy of a 4-bit decoder projection": (
        "saved", {"modules_to_save": [*SAVED, "q_proj"]},
        lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}),
        "decoder projection model.layers.0.self_attn.q_proj, which is stored in 4 bits",
    ),
    "saved copy of a module that cannot be replaced": (
        "saved", {"modules_to_save": [*SAVED, "rotary_emb"]},
        lambda t: t.update({"base_model.model.model.rotary_emb.inv_freq": torch.ones(8)}),
        "model.rotary_emb is not a module loraplex can replace",
    ),
    "saved norm with a parameter the base lacks": (
        "saved", {}, lambda t: t.update({"base_model.model.model.norm.bias": torch.zeros(64)}),
        "the saved copy has parameters",
    ),
    "saved nan": (
        "saved", {}, lambda t: t["base_model.model.model.embed_tokens.weight"].fill_(float("inf")),
        "NaN or infinite",
    ),
    "saved copy of a module not listed": (
        "saved", {"modules_to_save": ["lm_head", "embed_tokens"]}, None,
        "does not list",
    ),
    "modules_to_save not a list": ("saved", {"modules_to_save": "lm_head"}, None, "must be a list of module"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_their_reason_and_leave_the_store_unchanged(
    case: str, nf4: BaseModel, made: dict[str, Path], tmp_path: Path
) -> None:
    source, config, tensors, reason = REFUSALS[case]
    registry = registry_for(nf4, AdapterStore(tmp_path / "store"))
    registry.add_dir("kept", made["lora"])
    bad = edited_copy(made[source], tmp_path / "bad", config, tensors)
    assert_refused_and_store_unchanged(registry, tmp_path / "store", bad, reason)

"""Per-request adapter mixing (server/lora/mixing.py) on the tiny NF4 llama: the spelling and its
refusals, `a*1.0` bit for bit `a`, `a*0.5+b*0.5` PEFT's add_weighted_adapter "cat" (the factors and
the greedy tokens), a mix decoded in one step with its parts, and Runtime.resolve's errors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from server.config import Settings
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.errors import AdapterNotFoundError, AdapterWeightsError, MixError
from server.lora import mixing
from server.lora.adapter import AdapterWeights, ConfigReport, ModuleIA3
from server.lora.combination import RANDOM, Combination, mask_seed
from server.lora.mixing import MixPart
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.lora.store import AdapterStore
from server.model.base_gemm import BaseGemm
from server.model.loader import BaseModel, load_base
from server.runtime import Runtime
from tests.drive import greedy
from tests.peft_factory import make_adapter
from tests.unit.test_engine_tiny import engine_for, hf_model, prompt_ids, record_logits

MAX_RANK = 16
PROMPTS = ["hello there", "the quick brown fox", "1 2 3 4"]
TOKENS = 10
# "all" sorts before "qv": the canonical order, and the order PEFT is given
LORAS: dict[str, dict[str, Any]] = {
    "all": {"r": 8, "lora_alpha": 8, "target_modules": "all-linear", "rank_pattern": {"down_proj": 2}},
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "wide": {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj"]},
    "dora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True},
}
MIX = "all*0.5+qv*0.5"


@pytest.fixture(scope="module")
def adapter_dirs(
    tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    path, root = tiny_checkpoint("llama"), tmp_path_factory.mktemp("mix-adapters")
    return {
        name: make_adapter(
            lambda: AutoModelForCausalLM.from_pretrained(path), root / name, seed=10 + i, b_scale=0.5, **cfg
        )
        for i, (name, cfg) in enumerate(LORAS.items())
    }


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Callable[[str], Path]) -> BaseModel:
    # three slots: a mix and both its parts in one step; TILED: the exactness tests' mode
    return load_base(
        tiny_checkpoint("llama"),
        "tiny",
        quantization="nf4",
        device="cpu",
        max_loras=3,
        max_lora_rank=MAX_RANK,
        base_gemm=BaseGemm.TILED,
    )


@pytest.fixture(scope="module")
def registry(base: BaseModel, adapter_dirs: dict[str, Path]) -> AdapterRegistry:
    reg = AdapterRegistry(base.linear_shapes, MAX_RANK)
    for name, d in adapter_dirs.items():
        reg.add_dir(name, d)
    return reg


@pytest.fixture(scope="module")
def runtime(base: BaseModel, registry: AdapterRegistry) -> Iterator[Runtime]:
    engine = engine_for(base, registry, max_loras=3, max_lora_rank=MAX_RANK)
    yield Runtime(Settings.model_validate({}), base, registry, engine, AsyncEngine(engine, 8))
    engine.cache.close()


def run(
    base: BaseModel, registry: AdapterRegistry, jobs: Sequence[tuple[str, AdapterRecord | None, list[int]]]
) -> tuple[LLMEngine, dict[str, list[int]]]:
    engine = engine_for(base, registry, max_loras=3, max_lora_rank=MAX_RANK, max_num_seqs=16)
    return engine, greedy(engine, jobs, max_tokens=TOKENS)


# -- the spelling ----------------------------------------------------------------------------------


def test_spelling_parses_to_parts_in_name_order() -> None:
    assert mixing.parse("robot*0.4+pirate*.6") == [MixPart("pirate", 0.6), MixPart("robot", 0.4)]
    assert mixing.parse("team-a/x+b*2") == [MixPart("b", 2.0), MixPart("team-a/x", 1.0)]
    assert mixing.parse("pirate*1e-3") == [MixPart("pirate", 0.001)]
    spelled = mixing.canonical(mixing.parse("robot*0.4+pirate*.6"))
    assert spelled == "pirate*0.6+robot*0.4"
    assert mixing.canonical(mixing.parse(spelled)) == spelled  # the canonical form parses back
    assert mixing.canonical([MixPart("a", 1e-05)]) == "a*1e-05" and mixing.parse("a*1e-05")[0].weight == 1e-05
    assert mixing.is_spelling("a*1") and mixing.is_spelling("a+b") and not mixing.is_spelling("team-a/x")


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ("a*0", "above 0"),
        ("a*-0.5", "above 0"),
        ("a*inf", "finite"),
        ("a*nan", "finite"),
        ("a*1e999", "finite"),
        ("a*101", "at most 100"),
        ("a*x", "not a decimal number"),
        ("a*1_0", "not a decimal number"),
        ("a*", "not a decimal number"),
        ("a**2", "more than one"),
        ("a+", "not a mix"),
        ("+a", "not a mix"),
        ("a++b", "not a mix"),
        ("a b*0.5", "not an adapter name"),
        ("a*0.5+a*0.5", "appears twice"),
        ("+".join(f"p{i}" for i in range(9)), "at most 8 adapters, got 9"),
    ],
)
def test_bad_spellings_are_refused_naming_the_field(spelling: str, message: str) -> None:
    with pytest.raises(MixError, match=message) as e:
        mixing.parse(spelling)
    assert e.value.param == "model"


def test_the_documented_pattern_is_what_parse_accepts() -> None:
    import re

    pattern = re.compile(mixing.spelling_pattern())
    for good in ("a", "a*0.5", "team-a/x*2+b", "a*.5+b*1e-3", "+".join(f"p{i}" for i in range(8))):
        assert pattern.match(good), good
        mixing.parse(good)
    for bad in ("a*-1", "a*inf", "a+", "a b", "+".join(f"p{i}" for i in range(9))):
        assert not pattern.match(bad), bad
        with pytest.raises(MixError):
            mixing.parse(bad)


# -- the arithmetic --------------------------------------------------------------------------------


def test_one_part_keeps_its_factors_and_scales_the_scale(registry: AdapterRegistry) -> None:
    qv = registry.load(registry.resolve("qv"))
    for w in (1.0, 0.5, 3.0):
        mixed = mixing.combine([("qv", qv, w)], MAX_RANK)
        assert mixed.modules.keys() == qv.modules.keys()
        for key, m in qv.modules.items():
            assert mixed.modules[key].A is m.A and mixed.modules[key].B is m.B
            assert mixed.modules[key].scale == w * m.scale
    assert all(
        m.scale == qv.modules[k].scale for k, m in mixing.combine([("qv", qv, 1.0)], MAX_RANK).modules.items()
    )


def test_mix_factors_are_peft_cat_bit_for_bit(
    registry: AdapterRegistry, adapter_dirs: dict[str, Path], tiny_checkpoint: Callable[[str], Path]
) -> None:
    """The mix's A and B are the very tensors PEFT's add_weighted_adapter(..., "cat") builds, module by
    module (PEFT pads A and B to the summed rank with zeros: those rows and columns are zero)."""

    weights = {"all": 0.3, "qv": 1.7}
    mix = registry.load(
        mixing.mix_record([(registry.resolve(n), w) for n, w in weights.items()], MAX_RANK, "model")
    )
    peft = _peft_mixed(tiny_checkpoint, {n: adapter_dirs[n] for n in weights}, "none")
    peft.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type="cat")
    theirs = _mix_factors(peft)
    for key, (A, B, scaling) in theirs.items():
        assert scaling == 1.0
        ours = mix.modules[key]
        r = ours.rank
        assert torch.equal(ours.A, A[:r]) and torch.equal(ours.B, B[:, :r]), key
        assert not A[r:].any() and not B[:, r:].any()
        assert ours.scale == 1.0
    assert len(theirs) == len(mix.modules) > 0
    assert mix.modules["model.layers.0.self_attn.q_proj"].rank == 12  # both parts
    assert mix.modules["model.layers.0.mlp.down_proj"].rank == 2  # "all" alone (rank_pattern)


COMBINATIONS = [
    Combination("linear"),
    Combination("magnitude_prune", density=0.4),
    Combination("ties", density=0.5),
    Combination("ties", density=0.7, majority_sign_method="frequency"),
    Combination("dare_linear", density=0.5, seed=7),
    Combination("dare_ties", density=0.6, majority_sign_method="frequency", seed=2**63 - 1),
]


def _peft_mixed(tiny_checkpoint: Callable[[str], Path], dirs: dict[str, Path], quant: str) -> Any:
    from peft import PeftModel

    names = sorted(dirs)
    peft = PeftModel.from_pretrained(
        hf_model(tiny_checkpoint("llama"), quant), dirs[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        peft.load_adapter(dirs[name], adapter_name=name)
    return peft


def _peft_greedy(peft: Any, base: BaseModel, texts: list[str]) -> list[list[int]]:
    """PEFT's greedy tokens (its active adapter) for each text, TOKENS of them."""
    out = []
    for text in texts:
        x = torch.tensor([prompt_ids(base, text)])
        with torch.no_grad():
            ids = peft.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=TOKENS, do_sample=False)
        out.append(ids[0, x.shape[1] :].tolist())
    return out


def _seed_peft_per_module(peft: Any, seed: int) -> None:
    """PEFT draws DARE's masks from torch's global generator, module after module; seed it before
    each module with the seed loraplex gives that module's own generator."""
    lora_model = peft.base_model
    keys = {id(m): name.removeprefix("base_model.model.") for name, m in peft.named_modules()}
    merge = lora_model._generalized_task_arithmetic_weighted_adapter

    def seeded(combination_type: str, adapters: Any, weights: Any, target: Any, *rest: Any) -> Any:
        torch.manual_seed(mask_seed(seed, keys[id(target)]))
        return merge(combination_type, adapters, weights, target, *rest)

    lora_model._generalized_task_arithmetic_weighted_adapter = seeded


def _mix_factors(peft: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapter "mix" PEFT's add_weighted_adapter made: (lora_A, lora_B, scaling) by module key."""
    return {
        name.removeprefix("base_model.model."): (
            m.lora_A["mix"].weight,
            m.lora_B["mix"].weight,
            m.scaling["mix"],
        )
        for name, m in peft.named_modules()
        if hasattr(m, "lora_A") and "mix" in m.lora_A
    }


@pytest.mark.parametrize("how", COMBINATIONS, ids=lambda c: f"{c.type}-{c.density}-{c.majority_sign_method}")
def test_mix_factors_are_peft_combinations_bit_for_bit(
    registry: AdapterRegistry,
    adapter_dirs: dict[str, Path],
    tiny_checkpoint: Callable[[str], Path],
    how: Combination,
) -> None:
    """PEFT's add_weighted_adapter linear, magnitude_prune, ties (both sign methods) and DARE,
    applied to each factor as PEFT does: the very tensors, module by module, including the modules
    only one part targets (its factors alone, at their own rank). DARE's masks: PEFT's global
    generator seeded per module as loraplex seeds each module's own."""
    weights = {"all": 0.3, "wide": 1.7}  # both rank 8 ("all" has a rank-2 down_proj of its own)
    record = mixing.mix_record([(registry.resolve(n), w) for n, w in weights.items()], MAX_RANK, "model", how)
    mix = registry.load(record)
    assert record.rank == 8 and record.version != mixing.mix_record(record.parts, MAX_RANK, "model").version
    assert mix.report.honoured["combination_type"] == how.type
    peft = _peft_mixed(tiny_checkpoint, {n: adapter_dirs[n] for n in weights}, "none")
    if how.type in RANDOM:
        _seed_peft_per_module(peft, how.seed)
    peft.add_weighted_adapter(
        list(weights), list(weights.values()), "mix", combination_type=how.type, density=how.density,
        majority_sign_method=how.majority_sign_method,
    )  # fmt: skip
    theirs = _mix_factors(peft)
    for key, (A, B, scaling) in theirs.items():
        ours = mix.modules[key]
        assert torch.equal(ours.A, A) and torch.equal(ours.B, B), key
        assert ours.scale == scaling == 1.0
    assert len(theirs) == len(mix.modules) > 0
    assert mix.modules["model.layers.0.mlp.down_proj"].rank == 2
    if how.type != "linear":  # pruning kept the density's share of a factor both parts target
        A = mix.modules["model.layers.0.self_attn.k_proj"].A
        assert 0 < int((A != 0).sum()) < A.numel()


def test_a_dare_mix_is_rebuilt_from_its_seed(registry: AdapterRegistry) -> None:
    """The same seed builds the same factors every time the mix is built (a server drops a mix from
    its cache and builds it again); another seed is another mix, with its own version."""
    parts = [(registry.resolve(n), w) for n, w in (("all", 0.3), ("wide", 1.7))]

    def built(seed: int) -> tuple[str, dict[str, torch.Tensor]]:
        record = mixing.mix_record(parts, MAX_RANK, "model", Combination("dare_linear", 0.5, seed=seed))
        mix = registry.load(record)
        return record.version, {k: torch.cat([m.A.flatten(), m.B.flatten()]) for k, m in mix.modules.items()}

    (v1, once), (v1_again, again), (v2, other) = built(1), built(1), built(2)
    assert v1 == v1_again != v2
    assert all(torch.equal(once[k], again[k]) for k in once)
    assert all(not torch.equal(once[k], other[k]) for k in once if k in other and once[k].numel() > 64)


def test_a_ties_mix_gives_peft_tokens(
    base: BaseModel,
    registry: AdapterRegistry,
    adapter_dirs: dict[str, Path],
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    """A ties mix served by the engine (beside its cat twin and its parts) decodes PEFT's greedy
    tokens with add_weighted_adapter(..., "ties") on the same NF4 base, and differs from the cat mix."""
    how = Combination("ties", density=0.5)
    parts = [(registry.resolve(n), 0.8) for n in ("all", "wide")]
    ties = mixing.mix_record(parts, MAX_RANK, "model", how)
    cat = mixing.mix_record(parts, MAX_RANK, "model")
    assert ties.name == cat.name and ties.version != cat.version  # one spelling, two adapters
    jobs = [
        (f"{n}/{p}", r, prompt_ids(base, t))
        for n, r in (("ties", ties), ("cat", cat))
        for p, t in enumerate(PROMPTS)
    ]
    _, tokens = run(base, registry, jobs)
    peft = _peft_mixed(tiny_checkpoint, {n: adapter_dirs[n] for n in ("all", "wide")}, "nf4")
    peft.add_weighted_adapter(["all", "wide"], [0.8, 0.8], "mix", combination_type="ties", density=0.5)
    peft.set_adapter("mix")
    for p, want in enumerate(_peft_greedy(peft, base, PROMPTS)):
        assert tokens[f"ties/{p}"] == want, f"prompt {p}: ties mix != PEFT"
    assert any(tokens[f"ties/{p}"] != tokens[f"cat/{p}"] for p in range(len(PROMPTS)))


def test_combinations_are_refused_where_they_do_not_apply(runtime: Runtime) -> None:
    ties = Combination("ties", density=0.5)
    with pytest.raises(MixError, match=r"one rank \(PEFT's rule\), got all 8 \+ qv 4") as e:
        runtime.resolve("all+qv", combination=ties)
    assert e.value.param == "combination"
    for model in ("qv", "tiny"):
        with pytest.raises(MixError, match="applies to a mix") as e:
            runtime.resolve(model, combination=ties)
        assert e.value.param == "combination"
    one = runtime.resolve("qv*0.5", combination=ties)  # one part is scaled, whatever the combination
    assert one is not None and one.version == runtime.resolve("qv*0.5").version  # type: ignore[union-attr]
    given = runtime.resolve("tiny", adapters=[MixPart("all", 1.0), MixPart("wide", 1.0)], combination=ties)
    assert given == runtime.resolve("all+wide", combination=ties)


def test_a_part_that_is_not_plain_lora_is_refused(registry: AdapterRegistry, runtime: Runtime) -> None:
    """Refused when the request is resolved (the record knows its method: no weights are read),
    alone or with others; and by combine() itself, for DoRA magnitudes and (IA)3 vectors."""
    assert registry.resolve("dora").method == "dora"
    for model, param in (("dora*0.5+qv*0.5", "model"), ("dora*0.5", "model")):
        with pytest.raises(MixError, match="only plain LoRA adapters can be mixed: dora is dora") as e:
            runtime.resolve(model)
        assert e.value.param == param
    with pytest.raises(MixError, match="dora is dora") as e:
        runtime.resolve("tiny", adapters=[MixPart("dora", 1.0)])
    assert e.value.param == "adapters"
    qv = registry.resolve("qv")
    with pytest.raises(MixError, match="only plain LoRA adapters can be mixed: qv is dora") as e:
        mixing.mix_record([(replace(qv, method="dora"), 0.5)], MAX_RANK, "adapters")
    assert e.value.param == "adapters"
    plain = registry.load(qv)
    key, m = next(iter(plain.modules.items()))
    dora = replace(plain, modules={key: replace(m, magnitude_scale=torch.ones(m.B.shape[0]))}, method="dora")
    ia3 = AdapterWeights(
        modules={}, report=ConfigReport(), method="ia3", ia3={key: ModuleIA3(torch.ones(4), False)}
    )
    saved = replace(plain, saved={"model.norm": {"weight": torch.ones(4)}})
    for name, weights, method in (
        ("d", dora, "dora"),
        ("i", ia3, "ia3"),
        ("s", saved, "lora with modules_to_save"),
    ):
        with pytest.raises(AdapterWeightsError, match=f"{name} is {method}"):
            mixing.combine([(name, weights, 0.5), ("qv", plain, 0.5)], MAX_RANK)


def test_records_say_their_method_and_mixes_pin_nothing(registry: AdapterRegistry, tmp_path: Path) -> None:
    qv = registry.resolve("qv")
    assert qv.method == "lora" and qv.to_json()["method"] == "lora"
    data = qv.to_json()
    del data["method"]  # a record.json written before the field existed
    assert AdapterRecord.from_json("qv", qv.version, qv.path, data).method == "lora"
    stored = AdapterRegistry(registry.base_shapes, MAX_RANK, AdapterStore(tmp_path / "store"))
    record, _ = stored.add_dir("qv", qv.path)
    mix = mixing.mix_record([(record, 0.5)], MAX_RANK, "model")
    stored.pin(mix.version)
    stored.pin(record.version)
    assert sorted(p.name for p in (tmp_path / "store" / "pins").iterdir()) == [record.version]
    stored.unpin(mix.version)
    stored.unpin(record.version)
    stored.close()


# -- the engine ------------------------------------------------------------------------------------


def test_scale_one_is_bitwise_the_adapter(base: BaseModel, registry: AdapterRegistry) -> None:
    """`qv*1.0` is another version in another slot, with the adapter's own factors and scale: every
    logit row the same bits as `qv`'s, side by side in one batch (each row is its solo bits: the
    engine's invariant); `qv*0.5` differs."""
    qv = registry.resolve("qv")
    one = mixing.mix_record([(qv, 1.0)], MAX_RANK, "model")
    half = mixing.mix_record([(qv, 0.5)], MAX_RANK, "model")
    assert one.version != qv.version and one.name == "qv*1.0"
    engine = engine_for(base, registry, max_loras=3, max_lora_rank=MAX_RANK, max_num_seqs=16)
    logits = record_logits(engine)
    jobs = [(f"{r.name}/{p}", r, prompt_ids(base, t)) for r in (qv, one, half) for p, t in enumerate(PROMPTS)]
    tokens = greedy(engine, jobs, max_tokens=TOKENS)
    assert max(len(s.adapters) for s in engine.records) == 3
    for p in range(len(PROMPTS)):
        a, b = logits[f"qv/{p}"], logits[f"qv*1.0/{p}"]
        assert len(a) == len(b) == TOKENS and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert tokens[f"qv/{p}"] == tokens[f"qv*1.0/{p}"]
    assert any(tokens[f"qv/{p}"] != tokens[f"qv*0.5/{p}"] for p in range(len(PROMPTS)))


def test_mix_gives_peft_cat_tokens(
    base: BaseModel,
    registry: AdapterRegistry,
    adapter_dirs: dict[str, Path],
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    """`all*0.5+qv*0.5` greedy == PEFT's add_weighted_adapter(["all", "qv"], [0.5, 0.5], "cat") on the
    same NF4 base; and the mix is neither of its parts nor the base."""

    mix = mixing.mix_record([(registry.resolve(n), 0.5) for n in ("all", "qv")], MAX_RANK, "model")
    assert mix.name == MIX and mix.rank == 12
    jobs = [
        (f"{n}/{p}", r, prompt_ids(base, t))
        for n, r in (
            ("mix", mix),
            ("all", registry.resolve("all")),
            ("qv", registry.resolve("qv")),
            ("base", None),
        )
        for p, t in enumerate(PROMPTS[:2])
    ]
    _, tokens = run(base, registry, jobs)

    peft = _peft_mixed(tiny_checkpoint, {n: adapter_dirs[n] for n in ("all", "qv")}, "nf4")
    peft.add_weighted_adapter(["all", "qv"], [0.5, 0.5], "mix", combination_type="cat")
    peft.set_adapter("mix")
    for p, want in enumerate(_peft_greedy(peft, base, PROMPTS[:2])):
        assert tokens[f"mix/{p}"] == want, f"prompt {p}: mix != PEFT cat"
    for other in ("all", "qv", "base"):
        assert any(tokens[f"mix/{p}"] != tokens[f"{other}/{p}"] for p in range(2)), other


def test_mix_decodes_in_one_step_with_its_parts(base: BaseModel, registry: AdapterRegistry) -> None:
    """A mix is one more adapter version: it takes a slot and decodes beside its parts, with the
    tokens it gets alone."""
    a, b = registry.resolve("all"), registry.resolve("qv")
    mix = mixing.mix_record([(a, 0.5), (b, 0.5)], MAX_RANK, "model")
    jobs = [(r.name, r, prompt_ids(base, PROMPTS[0])) for r in (a, b, mix)]
    engine, mixed = run(base, registry, jobs)
    together = [s for s in engine.records if set(s.decoded) == {a.name, b.name, mix.name}]
    assert together, "the mix never decoded in the same step as its parts"
    assert all(set(s.adapters) == {a.version, b.version, mix.version} for s in together)
    assert mixed[mix.name] == run(base, registry, [jobs[2]])[1][mix.name]


# -- resolving a request's mix ---------------------------------------------------------------------


def test_resolve_builds_the_mix_from_model_or_adapters(runtime: Runtime) -> None:
    spelled = runtime.resolve("qv*0.5+all*0.5")
    assert spelled is not None and spelled.name == MIX and [p.name for p, _ in spelled.parts] == ["all", "qv"]
    given = runtime.resolve("tiny", adapters=[MixPart("qv", 0.5), MixPart("all", 0.5)])
    assert given == spelled
    assert runtime.resolve("qv") == runtime.registry.resolve("qv") and runtime.resolve("tiny") is None
    assert runtime.resolve("qv*2").version != runtime.resolve("qv*2.5").version  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("model", "adapters", "param", "message"),
    [
        ("tiny", [MixPart("qv", 0.5), MixPart("qv", 0.5)], "adapters", "appears twice"),
        ("tiny", [MixPart("qv", 0.0)], "adapters", "above 0"),
        ("tiny", [MixPart("qv", math.nan)], "adapters", "finite"),
        ("tiny", [MixPart(f"p{i}", 1.0) for i in range(9)], "adapters", "at most 8"),
        ("qv*0.5", [MixPart("all", 0.5)], "adapters", "not both"),
        ("qv", [MixPart("all", 0.5)], "model", "base model's id 'tiny'"),
        ("tiny*0.5+qv", None, "model", "cannot be part of a mix"),
        (
            "all+qv+wide",
            None,
            "model",
            r"combined rank 20 \(all 8 \+ qv 4 \+ wide 8\) is above --max-lora-rank 16",
        ),
        ("tiny", [MixPart("all", 1), MixPart("qv", 1), MixPart("wide", 1)], "adapters", "combined rank 20"),
    ],
)
def test_resolve_refuses_bad_mixes(
    runtime: Runtime, model: str, adapters: list[MixPart] | None, param: str, message: str
) -> None:
    with pytest.raises(MixError, match=message) as e:
        runtime.resolve(model, adapters=adapters)
    assert e.value.param == param


def test_an_unknown_or_forbidden_part_is_model_not_found(runtime: Runtime) -> None:
    """A part no adapter has, and one the caller's key may not use, answer the same 404."""
    answers = []
    for model, adapters, may_use in (
        ("qv*0.5+ghost*0.5", None, lambda _: True),
        ("qv*0.5+all*0.5", None, lambda n: n != "all"),
        ("tiny", [MixPart("ghost", 1.0)], lambda _: True),
        ("tiny", [MixPart("all", 1.0)], lambda n: n != "all"),
    ):
        with pytest.raises(AdapterNotFoundError) as e:
            runtime.resolve(model, may_use, adapters)
        answers.append((e.value.param, str(e.value).replace("ghost", "X").replace("'all'", "'X'")))
    assert (
        answers
        == [("model", "The model 'X' does not exist.")] * 2
        + [("adapters", "The model 'X' does not exist.")] * 2
    )

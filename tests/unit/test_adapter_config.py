"""parse_lora_config against PEFT's own LoraConfig and matching functions (the oracle)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import peft
import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from server.errors import AdapterConfigError
from server.lora.config import (
    MAX_CONFIG_BYTES,
    AdapterConfigRefusedError,
    parse_adapter_config,
    parse_lora_config,
)

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
NAMES = [f"model.layers.{i}.{p}" for i in (0, 1, 10) for p in PROJECTIONS]
NAMES += ["lm_head", "model.vision.h.2.q_proj", "model.layers.1.mlp.experts.0.up_proj", "proj", "q_proj"]


def peft_dict(**kwargs: Any) -> dict[str, Any]:
    """What PEFT writes to adapter_config.json for these LoraConfig arguments."""
    config = peft.LoraConfig(**kwargs).to_dict()
    return json.loads(json.dumps(config, default=sorted))  # sets become lists, as in save_pretrained


def minimal(**overrides: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **overrides}


def test_every_peft_field_is_classified() -> None:
    raw = peft_dict(target_modules=["q_proj"])
    raw["runtime_config"] = {}  # to_dict drops it, but a hand-written config may carry it
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} == set(raw)

    _, report = parse_lora_config(raw, max_rank=16)

    assert_each_key_classified(raw, report)
    assert report.honoured["target_modules"] == ["q_proj"]
    assert "dropout" in report.ignored["lora_dropout"]


# token_dim: what get_peft_model fills in from the base
VIRTUAL: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 64}
PEFT_CONFIGS: dict[str, Any] = {
    "adalora": lambda: peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10),
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
    "prompt": lambda: peft.PromptTuningConfig(**VIRTUAL),
    "ptuning": lambda: peft.PromptEncoderConfig(**VIRTUAL),
    "prefix": lambda: peft.PrefixTuningConfig(**VIRTUAL, num_attention_heads=4, num_layers=2),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_every_field_of_each_methods_config_is_classified(method: str) -> None:
    """A field a new PEFT adds is read, ignored with its reason or refused, never passed over as an
    unknown key (PEFT 0.22 added LoRA's astra_config: an init that rewrites the base)."""
    config = PEFT_CONFIGS[method]()
    raw = json.loads(json.dumps(config.to_dict(), default=sorted))
    assert {f.name for f in dataclasses.fields(config)} <= set(raw) | {"runtime_config"}
    _, report = parse_adapter_config(raw, max_rank=16)
    assert_each_key_classified(raw, report)


def assert_each_key_classified(raw: dict[str, Any], report: Any) -> None:
    for key in raw:
        places = [key in report.honoured, key in report.ignored, key in report.refused]
        assert places.count(True) == 1, key
        assert not str(report.ignored.get(key, "")).startswith("unknown key"), key


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj", "v_proj"]},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "o_proj"]},
        {"target_modules": ["proj"]},  # a suffix matches only on a "." boundary
        {"target_modules": "q_proj"},  # a str is fullmatched against the whole name
        {"target_modules": r".*\.layers\.1\..*_proj"},
        {"target_modules": ["q_proj", "mlp.up_proj"], "layers_to_transform": [1]},
        {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_to_transform": [2], "layers_pattern": ["h", "layers"]},
        {"target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"], "layers_to_transform": [0]},
        {"target_modules": ["up_proj"], "layers_to_transform": []},
        {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
        {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.(0|10)\..*"},
    ],
)
def test_targets_match_peft(kwargs: dict[str, Any]) -> None:
    oracle = peft.LoraConfig(**kwargs)
    config, _ = parse_lora_config(peft_dict(**kwargs), max_rank=16)

    expected = [name for name in NAMES if check_target_module_exists(oracle, name)]
    assert [name for name in NAMES if config.targets(name)] == expected


def test_all_linear_targets_every_base_projection_except_excluded() -> None:
    config, report = parse_lora_config(minimal(target_modules="ALL-linear", exclude_modules=["o_proj"]), 16)

    assert report.honoured["target_modules"] == "ALL-linear"
    assert [n for n in NAMES[:7] if config.targets(n)] == [n for n in NAMES[:7] if not n.endswith("o_proj")]


def test_rank_and_alpha_patterns_match_peft() -> None:
    # Order matters in PEFT: the first matching key wins, so the plain "q_proj" key shadows the later ones.
    rank_pattern = {"q_proj": 2, r"model\.layers\.1\..*": 6, "layers.1.self_attn.k_proj": 8, "mlp.up_proj": 5}
    alpha_pattern = {"model.layers.0.self_attn.v_proj": 32, r".*\.o_proj": 3, "^model.layers.10.*": 1.5}
    raw = peft_dict(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern=rank_pattern)
    config, _ = parse_lora_config({**raw, "alpha_pattern": alpha_pattern}, max_rank=8)

    for name in NAMES:
        assert config.rank_for(name) == rank_pattern.get(get_pattern_key(list(rank_pattern), name), 4), name
        assert config.alpha_for(name) == alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), 8), (
            name
        )
    assert config.rank_for("model.layers.1.self_attn.k_proj") == 6


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scale(use_rslora: bool, expected: float) -> None:
    config, _ = parse_lora_config(minimal(lora_alpha=16, use_rslora=use_rslora), max_rank=16)
    assert config.scale_for("model.layers.0.self_attn.q_proj") == expected


def test_accepts_bytes_str_and_dict_and_applies_peft_defaults() -> None:
    raw: dict[str, object] = {"peft_type": "LORA", "target_modules": ["q_proj"]}
    for form in (json.dumps(raw).encode(), json.dumps(raw), raw):
        config, report = parse_lora_config(form, max_rank=16)
        assert (config.r, config.lora_alpha, config.use_rslora) == (8, 8.0, False)
        assert report.honoured["r"] == 8


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout", "training-time"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out", "PEFT forces it to False"),
        ({"init_lora_weights": "gaussian"}, "init_lora_weights", "initialization only"),
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config", "unless init_lora_weights is 'loftq'"),
        ({"base_model_name_or_path": "x/y", "revision": "main"}, "base_model_name_or_path", "informational"),
        ({"auto_mapping": {"parent_library": "os", "base_model_class": "system"}}, "auto_mapping", "never"),
        ({"use_qalora": False}, "use_qalora", "disabled"),
        ({"my_new_field": 3}, "my_new_field", "unknown key"),
    ],
)
def test_ignored_fields_say_why(overrides: dict[str, Any], key: str, reason: str) -> None:
    _, report = parse_lora_config(minimal(**overrides), max_rank=16)
    assert reason in report.ignored[key]
    assert key not in report.honoured


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"use_qalora": True}, "use_qalora", "QALoRA"),
        ({"modules_to_save": {"lm_head": 1}}, "modules_to_save", "must be a list of module names"),
        ({"modules_to_save": ["m"] * 65}, "modules_to_save", "at most 64"),
        ({"bias": "all"}, "bias", "biases are not supported"),
        ({"peft_type": "LOHA"}, "peft_type", "rank up to r^2"),
        ({"peft_type": "LOKR"}, "peft_type", "Kronecker"),
        ({"peft_type": None}, "peft_type", "not a method loraplex serves"),
        ({"r": 64}, "r", "LoRA rank 64 is greater than max_lora_rank 16"),
        ({"r": 0}, "r", "positive integer, got 0"),
        ({"r": "8"}, "r", 'positive integer, got "8"'),
        ({"rank_pattern": {"q_proj": 32}}, "rank_pattern", "LoRA rank 32 is greater than max_lora_rank 16"),
        ({"lora_alpha": "big"}, "lora_alpha", 'finite number, got "big"'),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern", "finite number, got null"),
        ({"use_rslora": "yes"}, "use_rslora", "true or false"),
        ({"use_qalora": True}, "use_qalora", "QALoRA"),
        ({"lora_bias": True}, "lora_bias", "bias on lora_B"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "layer stack"),
        ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config", "Megatron"),
        ({"target_parameters": ["experts.down_proj"]}, "target_parameters", "raw parameters"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "embedding tokens"),
        ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens", "Activated LoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "rewrite the base weights"),
        ({"init_lora_weights": "astra"}, "init_lora_weights", "rewrite the base weights"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights", "rewrite"),
        ({"target_modules": None}, "target_modules", "missing"),
        ({"target_modules": []}, "target_modules", "empty"),
        ({"target_modules": "q_proj["}, "target_modules", 'regex "q_proj[" is refused'),
        ({"target_modules": "(a+)+$"}, "target_modules", "exponential backtracking"),
        ({"target_modules": "(q|q_)*proj"}, "target_modules", "alternation inside an unbounded repeat"),
        ({"rank_pattern": {"(.*)*": 2}}, "rank_pattern", "exponential backtracking"),
        (
            {"target_modules": ".*x", "layers_to_transform": [0]},
            "layers_to_transform",
            "target_modules is a str",
        ),
        ({"layers_pattern": "layers"}, "layers_pattern", "needs layers_to_transform"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform", "list of integers"),
    ],
)
def test_refusals_name_field_and_problem(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(AdapterConfigRefusedError, match="refused") as info:
        parse_lora_config(minimal(**overrides), max_rank=16)
    assert info.value.field == field
    assert message in str(info.value)
    assert message in info.value.report.refused[field]
    assert field not in info.value.report.honoured


def test_every_refusal_is_reported_at_once() -> None:
    with pytest.raises(AdapterConfigError) as info:
        parse_lora_config(minimal(use_qalora=True, bias="lora_only", r=99), max_rank=16)
    assert all(word in str(info.value) for word in ("use_qalora", "bias", "greater than max_lora_rank"))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[1, 2]", "must be a JSON object, got a JSON list"),
        (b'"LORA"', "must be a JSON object, got a JSON str"),
        (b"{'r': 8}", "not valid JSON"),
        (b'{"r": 4, "r": 64}', "duplicate key(s) ['r']"),
        (b'{"r": NaN}', "NaN is not a number"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 50_000, "not valid JSON"),
        (json.dumps(minimal(pad="x" * MAX_CONFIG_BYTES)).encode(), "the limit is 65536"),
        (json.dumps(minimal(notes=json.loads("[" * 20 + "]" * 20))).encode(), "deeper than 16 levels"),
    ],
)
def test_malformed_json_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(AdapterConfigError) as info:
        parse_lora_config(raw, max_rank=16)
    assert message in str(info.value)
    assert info.value.field == "adapter_config.json"  # the upload part at fault

"""load_adapter against adapters saved by PEFT itself: same modules, same A/B, same scale."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from server.errors import AdapterConfigError, AdapterError, AdapterWeightsError
from server.lora.adapter import LinearShape
from server.lora.weights import linear_modules, load_adapter
from tests.unit.conftest import tiny_config

MAX_RANK = 8
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config("llama")
    assert isinstance(config, LlamaConfig)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def base_modules() -> dict[str, LinearShape]:
    return linear_modules(tiny_llama())


def save_peft_adapter(directory: Path, config_edits: dict[str, Any] | None = None, **lora: Any) -> PeftModel:
    """Wrap a tiny Llama with PEFT (random non-zero A and B), save it, optionally edit the saved config."""
    model = get_peft_model(tiny_llama(), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(str(directory))
    if config_edits:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_edits}))
    return model


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def factor(layer: object, kind: str) -> torch.Tensor:
    weight = getattr(layer, kind)["default"].weight
    assert isinstance(weight, torch.Tensor)
    return weight


def test_linear_modules_lists_decoder_projections_only(base_modules: dict[str, LinearShape]) -> None:
    assert len(base_modules) == 2 * len(ALL_PROJ)
    assert "lm_head" not in base_modules
    assert base_modules["model.layers.1.mlp.down_proj"] == LinearShape(in_features=128, out_features=64)
    assert base_modules["model.layers.0.self_attn.k_proj"] == LinearShape(in_features=64, out_features=32)


def test_linear_modules_includes_nf4_linear4bit() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    layer = model.model.layers[0].self_attn
    layer.q_proj = bnb.nn.Linear4bit(64, 64, bias=False, quant_type="nf4", compress_statistics=True)

    assert linear_modules(model)["model.layers.0.self_attn.q_proj"] == LinearShape(64, 64)


CASES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, int]] = {
    "list": ({"r": 4, "target_modules": ["q_proj", "v_proj"]}, None, 4),
    "regex": ({"r": 4, "lora_alpha": 16, "target_modules": r".*\.(k_proj|down_proj)"}, None, 4),
    # PEFT saves the expanded list; a hand-written config keeps the shorthand, which PEFT honours on load.
    "all_linear": ({"r": 2, "target_modules": "all-linear"}, {"target_modules": "all-linear"}, 14),
    "patterns": (
        {
            "r": 4,
            "target_modules": ALL_PROJ,
            "rank_pattern": {"q_proj": 8, r"model\.layers\.1\.mlp\..*": 2},
            "alpha_pattern": {"model.layers.0.self_attn.v_proj": 32, r".*\.o_proj": 3},
        },
        None,
        14,
    ),
    "rslora": (
        {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["o_proj", "up_proj"]},
        None,
        4,
    ),
    "rslora_patterns": (
        {
            "r": 4,
            "use_rslora": True,
            "target_modules": ["v_proj"],
            "rank_pattern": {"layers.1.self_attn.v_proj": 2},
        },
        None,
        2,
    ),
    "layers_int": ({"r": 4, "target_modules": ["q_proj", "gate_proj"], "layers_to_transform": 1}, None, 2),
    "layers_pattern": (
        {
            "r": 4,
            "target_modules": ["v_proj", "down_proj"],
            "layers_to_transform": [0],
            "layers_pattern": "layers",
        },
        None,
        2,
    ),
    "exclude": (
        {
            "r": 4,
            "target_modules": ["q_proj", "k_proj"],
            "exclude_modules": ["model.layers.0.self_attn.k_proj"],
        },
        None,
        3,
    ),
    # PEFT rewrites fan_in_fan_out to False in the saved config; uploads may still say true.
    "fan_in_fan_out": (
        {"r": 4, "target_modules": ["q_proj"], "fan_in_fan_out": True},
        {"fan_in_fan_out": True},
        2,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(tmp_path: Path, base_modules: dict[str, LinearShape], case: str) -> None:
    lora, config_edits, n_modules = CASES[case]
    peft_model = save_peft_adapter(tmp_path, config_edits, **lora)
    wrapped = {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}

    weights = load_adapter(tmp_path, base_modules, MAX_RANK)

    assert sorted(weights.modules) == sorted(wrapped)
    assert len(wrapped) == n_modules
    for name, layer in wrapped.items():
        ours = weights.modules[name]
        assert ours.A.dtype == ours.B.dtype == torch.float32
        assert torch.equal(ours.A, factor(layer, "lora_A"))
        assert torch.equal(ours.B, factor(layer, "lora_B"))
        assert ours.scale == layer.scaling["default"]
    assert "missing_modules" not in weights.report.ignored
    if case == "fan_in_fan_out":
        assert "PEFT forces it to False" in weights.report.ignored["fan_in_fan_out"]


def test_adapter_name_infix_and_bf16_are_accepted(
    tmp_path: Path, base_modules: dict[str, LinearShape]
) -> None:
    peft_model = save_peft_adapter(tmp_path, r=4, target_modules=["q_proj"])

    def rename_and_cast(tensors: dict[str, torch.Tensor]) -> None:
        for name in list(tensors):
            new = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            tensors[new] = tensors.pop(name).to(torch.bfloat16)

    edit_tensors(tmp_path, rename_and_cast)
    weights = load_adapter(tmp_path, base_modules, MAX_RANK)

    layer = peft_model.get_base_model().get_submodule("model.layers.1.self_attn.q_proj")
    expected = factor(layer, "lora_A").to(torch.bfloat16).float()
    assert torch.equal(weights.modules["model.layers.1.self_attn.q_proj"].A, expected)


def test_factors_beyond_the_slot_dtype_are_refused(
    tmp_path: Path, base_modules: dict[str, LinearShape]
) -> None:
    """Under --lora-dtype float16 a factor past 65504 would be inf in the slot: the registry refuses
    the adapter at registration, naming the tensor, and keeps nothing; float32 and bfloat16 slots
    (float32's range) take it."""
    from server.lora.registry import AdapterRegistry

    save_peft_adapter(tmp_path, r=4, target_modules=["q_proj"])
    key = f"{Q0}.lora_B.weight"
    edit_tensors(tmp_path, lambda t: t[key].__setitem__((0, 0), 1e5))
    for dtype in (torch.float32, torch.bfloat16):
        AdapterRegistry(base_modules, MAX_RANK, factor_dtype=dtype).add_dir("big", tmp_path)
    half = AdapterRegistry(base_modules, MAX_RANK, factor_dtype=torch.float16)
    with pytest.raises(
        AdapterWeightsError, match=r"layers\.0\.self_attn\.q_proj\.lora_B holds 100000.*float16"
    ):
        half.add_dir("big", tmp_path)
    assert half.get("big") is None
    edit_tensors(tmp_path, lambda t: t[key].__setitem__((0, 0), 6e4))  # within float16's range
    half.add_dir("big", tmp_path)


def test_targeted_module_without_tensors_is_reported(
    tmp_path: Path, base_modules: dict[str, LinearShape]
) -> None:
    save_peft_adapter(tmp_path, r=4, target_modules=["q_proj", "v_proj"])
    edit_tensors(tmp_path, lambda t: [t.pop(k) for k in list(t) if ".layers.1.self_attn.v_proj." in k])

    weights = load_adapter(tmp_path, base_modules, MAX_RANK)

    assert "model.layers.1.self_attn.v_proj" not in weights.modules
    assert len(weights.modules) == 3
    assert "model.layers.1.self_attn.v_proj" in weights.report.ignored["missing_modules"]


def test_pickle_next_to_safetensors_is_never_opened(
    tmp_path: Path, base_modules: dict[str, LinearShape], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_peft_adapter(tmp_path, r=4, target_modules=["q_proj"])
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    real_open = os.open

    def guarded_open(path: Any, *args: Any, **kwargs: Any) -> int:
        assert not str(path).endswith(".bin"), "a pickle file was opened"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    weights = load_adapter(tmp_path, base_modules, MAX_RANK)

    assert len(weights.modules) == 2
    assert "never opened" in weights.report.ignored["adapter_model.bin"]


def raw_safetensors(entries: dict[str, tuple[str, list[int], list[int]]], data: bytes) -> bytes:
    header = {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()}
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _write_weights(payload: bytes) -> Callable[[Path], object]:
    return lambda d: (d / "adapter_model.safetensors").write_bytes(payload)


def _tensors(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], object]:
    return lambda d: edit_tensors(d, edit)


def _pickle_only(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")


def _bytes_edit(edit: Callable[[bytes], bytes]) -> Callable[[Path], object]:
    path = "adapter_model.safetensors"
    return lambda d: (d / path).write_bytes(edit((d / path).read_bytes()))


def _config_edit(**edits: Any) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        path = d / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edits}))

    return apply


A_ENTRY = ("F32", [4, 64], [0, 1024])
ENTRY = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
DUPLICATE = f'{{"a": {ENTRY}, "a": {ENTRY}}}'.encode()
REFUSALS: dict[str, tuple[Callable[[Path], object], type[AdapterError], str]] = {
    "pickle only": (_pickle_only, AdapterWeightsError, "pickle weights are never loaded"),
    "no config": (
        lambda d: (d / "adapter_config.json").unlink(),
        AdapterConfigError,
        "no adapter_config.json",
    ),
    "oversized config": (_config_edit(pad="x" * 70_000), AdapterConfigError, "65536"),
    "dora without magnitudes": (
        _config_edit(use_dora=True),
        AdapterWeightsError,
        "no matching lora_magnitude_vector",
    ),
    "wrong shape": (
        _tensors(lambda t: t.update({f"{Q0}.lora_A.weight": torch.zeros(4, 32)})),
        AdapterWeightsError,
        "has shape [4, 32], expected [4, 64]",
    ),
    "unknown module": (
        _tensors(
            lambda t: t.update(
                {"base_model.model.model.layers.99.mlp.up_proj.lora_A.weight": torch.ones(4, 64)}
            )
        ),
        AdapterWeightsError,
        "no module model.layers.99.mlp.up_proj in the base model",
    ),
    "untargeted module": (
        _tensors(
            lambda t: t.update(
                {"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.ones(4, 64)}
            )
        ),
        AdapterWeightsError,
        "targets a module the config does not target",
    ),
    "missing B": (
        _tensors(lambda t: t.pop(f"{Q0}.lora_B.weight")),
        AdapterWeightsError,
        "no matching lora_B",
    ),
    "dora magnitude": (
        _tensors(lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.ones(64)})),
        AdapterWeightsError,
        "lora_magnitude_vector is not a lora tensor of this config",
    ),
    "nan": (
        _tensors(lambda t: t[f"{Q0}.lora_B.weight"].fill_(float("nan"))),
        AdapterWeightsError,
        "NaN or infinite",
    ),
    "no tensors": (_tensors(lambda t: t.clear()), AdapterWeightsError, "holds no tensors"),
    "integer dtype": (
        _tensors(lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 64, dtype=torch.int32)})),
        AdapterWeightsError,
        "dtype I32; LoRA weights must be floating point",
    ),
    "truncated": (_bytes_edit(lambda b: b[:-10]), AdapterWeightsError, "is truncated"),
    "trailing bytes": (_bytes_edit(lambda b: b + bytes(16)), AdapterWeightsError, "16 trailing bytes"),
    "huge header length": (
        _bytes_edit(lambda b: struct.pack("<Q", 2**40) + b[8:]),
        AdapterWeightsError,
        "header length 1099511627776 exceeds",
    ),
    "header not an object": (
        _write_weights(struct.pack("<Q", 2) + b"[]"),
        AdapterWeightsError,
        "JSON object",
    ),
    "overlapping offsets": (
        _write_weights(raw_safetensors({"a": A_ENTRY, "b": ("F32", [4, 64], [512, 1536])}, bytes(1536))),
        AdapterWeightsError,
        "tensor b overlaps",
    ),
    "gap between tensors": (
        _write_weights(raw_safetensors({"a": A_ENTRY, "b": ("F32", [4, 64], [1032, 2056])}, bytes(2056))),
        AdapterWeightsError,
        "8 unreferenced bytes before b",
    ),
    "duplicate tensor names": (
        _write_weights(struct.pack("<Q", len(DUPLICATE)) + DUPLICATE + bytes(4)),
        AdapterWeightsError,
        "duplicate tensor names",
    ),
    "offsets disagree with shape": (
        _write_weights(raw_safetensors({"a": ("F32", [4, 64], [0, 1000])}, bytes(1000))),
        AdapterWeightsError,
        "hold 1000 bytes, but F32 [4, 64] needs 1024",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(tmp_path: Path, base_modules: dict[str, LinearShape], case: str) -> None:
    mutate, error, message = REFUSALS[case]
    save_peft_adapter(tmp_path, r=4, target_modules=["q_proj", "v_proj"])
    mutate(tmp_path)

    with pytest.raises(error) as info:
        load_adapter(tmp_path, base_modules, MAX_RANK)
    assert message in str(info.value)

"""Our own reader of a PEFT `adapter_config.json` (PEFT 0.21 `LoraConfig` semantics).

The JSON is never handed to PEFT: `auto_mapping` and friends name classes that PEFT would import.

Semantics (PEFT's, see `check_target_module_exists`, `get_pattern_key`, `LoraLayer.update_layer`):
- `target_modules` list: targeted if the full module name is an entry or ends with "." + an entry.
  A str is `re.fullmatch`ed against the full name; "all-linear" (any case) targets every base projection.
- `exclude_modules`: same matching, checked first.
- `layers_to_transform` (list targets only; an exact full-name entry bypasses it): the index after the first
  `<layers_pattern>.` (any `<segment>.` when no pattern is given) must be listed.
- `rank_pattern` / `alpha_pattern`: the first key, in file order, with `re.match(rf"(.*\\.)?({key})$", name)`.
- scale = alpha / r, or alpha / sqrt(r) with `use_rslora`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from numpy import float32 as np_float32

from server.lora.adapter import ConfigReport
from server.lora.config_fields import (
    INFORMATIONAL,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    AdapterConfigRefusedError,
    FieldReader,
    Matcher,
    Refusal,
    compile_regex,
    load_json,
    matches,
    parse_bool,
    parse_modules_to_save,
    parse_targets,
    short,
)

__all__ = [
    "MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "AdapterConfigRefusedError", "LoraConfig", "parse_adapter_config",
]  # fmt: skip

_INIT_ONLY = "initialization only: the trained A/B come from adapter_model.safetensors"
_IGNORED: dict[str, str] = {
    **INFORMATIONAL,
    "lora_dropout": "dropout is a training-time regularizer; inference does not drop",
    "megatron_core": "only used together with megatron_config",
    "qalora_group_size": "only used together with use_qalora",
    "loftq_config": "PEFT discards it unless init_lora_weights is 'loftq'",
    "eva_config": _INIT_ONLY,
    "corda_config": _INIT_ONLY,
    "lora_ga_config": _INIT_ONLY,
    "astra_config": _INIT_ONLY,
    "runtime_config": "runtime-only option (GPU offload while loading); PEFT does not save it",
}
# AdaLoRA's budget schedule and regularizer shape training; the saved factors are what it ends with.
_ADALORA_TRAINING = "AdaLoRA training schedule; no effect at inference"
_ADALORA_IGNORED: dict[str, str] = {
    **{k: _ADALORA_TRAINING for k in ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2")},
    **{k: _ADALORA_TRAINING for k in ("orth_reg_weight", "total_step")},
    "r": "AdaLoRA builds its layers with init_r; r is unused",
    "use_rslora": "AdaLoRA scales by lora_alpha / init_r whatever use_rslora says",
    "alpha_pattern": "AdaLoRA uses lora_alpha for every module",
}
_REFUSED_IF_SET: dict[str, str] = {
    "use_qalora": "QALoRA (input pooled before lora_A) is not supported",
    "lora_bias": "a bias on lora_B is not supported",
    "layer_replication": "it changes the layer stack of the base model; not supported",
    "megatron_config": "Megatron parallel layers are not supported",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
    "trainable_token_indices": "trainable embedding tokens are not supported",
    "alora_invocation_tokens": "Activated LoRA (adapter only after invocation tokens) is not supported",
    "velora_config": "VeLoRA saves lora_velora_embed buffers that loraplex does not load",
    "monteclora_config": "the MonteCLoRA variant (extra sampler parameters) is not supported",
    "use_bdlora": "block-diagonal LoRA factors are not supported",
    "arrow_config": "Arrow routing between LoRA experts is not supported",
    "kasa_config": "KaSA (singular values between A and B, truncated base) is not supported",
}
# Why each other PEFT method is refused (PEFT's PeftType values).
_OTHER_METHODS: dict[str, str] = {
    "LOHA": (
        "LoHa's update (B1 A1) * (B2 A2) is an element-wise product of two low-rank matrices, of rank "
        "up to r^2: no per-token low-rank form exists, so batching it would mean a dense [out, in] delta "
        "per adapter and module, the size of the base layer in fp32"
    ),
    "LOKR": (
        "LoKr (a Kronecker product of two factors) is not supported yet; its batched form, two small "
        "matrix products per token, is planned"
    ),
}
_METHODS = "LORA (with or without use_dora), ADALORA, IA3, PROMPT_TUNING, P_TUNING or PREFIX_TUNING"
# These inits rewrite the base weight (W - scale·B0·A0, or LoftQ's quantized W) when PEFT loads the adapter:
# one shared base cannot do that per adapter.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "astra", "loftq")
_HONOURED = (
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out", "use_dora", "init_r",
    "modules_to_save", "ensure_weight_tying",
)  # fmt: skip
_DEFAULTS = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
}  # fmt: skip
_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


if TYPE_CHECKING:
    from server.lora.ia3 import IA3Config
    from server.lora.virtual import PromptConfig


@dataclass(frozen=True, slots=True)
class LoraConfig:
    """The validated, behaviour-relevant part of an adapter_config.json. Build it with `parse_lora_config`."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: Matcher | None  # None: "all-linear", every projection the caller lists
    exclude_modules: Matcher | None = None
    rank_pattern: tuple[tuple[re.Pattern[str], int], ...] = ()
    alpha_pattern: tuple[tuple[re.Pattern[str], float], ...] = ()
    layers_to_transform: frozenset[int] | None = None
    layers_pattern: tuple[re.Pattern[str], ...] = ()  # compiled index finders; empty: any "<segment>.<idx>."
    use_dora: bool = False
    # AdaLoRA (method "adalora"): r is init_r; the rank each pruned module kept (its rank_pattern mask)
    method: str = "lora"
    kept_ranks: dict[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()  # names PEFT matches as suffixes; see server.lora.saved
    ensure_weight_tying: bool = False

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would wrap `module_name`, a linear projection of the base model."""
        if self.exclude_modules is not None and matches(self.exclude_modules, module_name):
            return False
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, re.Pattern):
            return self.target_modules.fullmatch(module_name) is not None
        if module_name in self.target_modules:
            return True  # PEFT checks layers_to_transform only for suffix hits
        if not matches(self.target_modules, module_name):
            return False
        if self.layers_to_transform is None:
            return True
        finders = self.layers_pattern or (_DEFAULT_LAYER_INDEX,)
        match = next((m for m in (f.match(module_name) for f in finders) if m), None)
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def rank_for(self, module_name: str) -> int:
        if self.method == "adalora":
            return self.kept_ranks.get(module_name, self.r)
        return next((r for key, r in self.rank_pattern if key.match(module_name)), self.r)

    def alpha_for(self, module_name: str) -> float:
        return next((a for key, a in self.alpha_pattern if key.match(module_name)), self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        if self.method == "adalora":
            # PEFT: output * scaling / (ranknum + 1e-5), scaling = lora_alpha or init_r, ranknum = init_r
            # (kept from before pruning), the 1e-5 added in float32
            scaling = self.lora_alpha if self.lora_alpha > 0 else float(self.r)
            return scaling / float(np_float32(self.r) + np_float32(1e-5))
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_adapter_config(
    raw: bytes | str | dict[str, object], max_rank: int
) -> tuple[LoraConfig | IA3Config | PromptConfig, ConfigReport]:
    """Validate an adapter_config.json of any method loraplex serves; `peft_type` picks the reader.

    Raises AdapterConfigError when it cannot be read, AdapterConfigRefusedError (with the full report) when it
    asks for something refused; the message lists every refused field.
    """
    data = load_json(raw)
    if data.get("peft_type") == "IA3":
        from server.lora.ia3 import parse_ia3_config

        return parse_ia3_config(data)
    from server.lora.virtual import METHODS, parse_prompt_config

    if data.get("peft_type") in METHODS:
        return parse_prompt_config(data)
    return parse_lora_config(data, max_rank)


def parse_lora_config(raw: bytes | str | dict[str, object], max_rank: int) -> tuple[LoraConfig, ConfigReport]:
    """A LoRA (DoRA with `use_dora`) or AdaLoRA config; see parse_adapter_config."""
    data = load_json(raw)
    report = ConfigReport()
    adalora = data.get("peft_type") == "ADALORA"
    ignored = {**_IGNORED, **_ADALORA_IGNORED} if adalora else _IGNORED
    for key, value in data.items():
        if key in ignored:
            report.ignored[key] = ignored[key]
        elif key in _REFUSED_IF_SET:
            if value:
                report.refused[key] = f"{key}={short(value)}: {_REFUSED_IF_SET[key]}"
            else:
                report.ignored[key] = f"{short(value)}: disabled, nothing to apply"
        elif key not in _HONOURED and key != "init_lora_weights":
            report.ignored[key] = f"unknown key (not a field of PEFT's {data.get('peft_type')} config)"

    field = FieldReader(data, report, _DEFAULTS)

    # PEFT picks the config class from peft_type and fails with a KeyError when it is absent.
    field("peft_type", _method)
    field("bias", _literal, "none", "trained biases are not supported")
    if "init_lora_weights" in data:
        field("init_lora_weights", _check_init, report)
    field("fan_in_fan_out", _check_fan_in_fan_out, report)
    alpha = field("lora_alpha", _number)
    targets = field("target_modules", parse_targets, False)
    exclude = field("exclude_modules", parse_targets, True)
    layers = field("layers_to_transform", _layers, data)
    finders = field("layers_pattern", _layers_pattern, data)
    use_rslora, rank_pattern, alpha_pattern, kept = False, (), (), {}
    if adalora:
        # PEFT refuses DoRA with AdaLoRA; the factors' ranks are checked against max_lora_rank per module
        field("use_dora", _literal, False, "AdaLoRA does not support DoRA")
        r = field("init_r", _rank, 2**31)
        kept = field("rank_pattern", _kept_ranks)
    else:
        r = field("r", _rank, max_rank)
        use_rslora = field("use_rslora", parse_bool)
        rank_pattern = field("rank_pattern", _pattern_dict, lambda v: _rank(v, max_rank))
        alpha_pattern = field("alpha_pattern", _pattern_dict, _number)
    use_dora = False if adalora else bool(field("use_dora", parse_bool))
    to_save = field("modules_to_save", parse_modules_to_save)
    tying = data.get("ensure_weight_tying") is not None and field("ensure_weight_tying", parse_bool)

    field.settle(_HONOURED)
    report.honoured.setdefault("init_r" if adalora else "r", r)
    report.honoured.setdefault("lora_alpha", alpha)
    method = "adalora" if adalora else "dora" if use_dora else "lora"
    config = LoraConfig(
        r, alpha, use_rslora, targets, exclude, rank_pattern, alpha_pattern, layers, finders,
        use_dora=use_dora, method=method, kept_ranks=kept or {}, modules_to_save=to_save or (),
        ensure_weight_tying=bool(tying),
    )  # fmt: skip
    return config, report


def _method(value: object) -> None:
    if value in ("LORA", "ADALORA"):
        return
    why = _OTHER_METHODS.get(value) if isinstance(value, str) else None
    raise Refusal(f"{short(value)}: {why or 'not a method loraplex serves'} (loraplex serves {_METHODS})")


def _kept_ranks(value: object) -> dict[str, int]:
    """AdaLoRA's rank_pattern after training: `<module>.lora_E` -> which of the init_r ranks survived."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Refusal(f"must map lora_E names to lists of booleans, got {short(value)}")
    kept = {}
    for key, mask in value.items():
        parts = key.split(".")
        # PEFT: "<module>.lora_E" or "<module>.lora_E.<adapter>"; the module is what precedes lora_E
        if "lora_E" not in parts[-2:]:
            raise Refusal(f"{key!r} does not name a lora_E parameter")
        if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
            raise Refusal(f"{key!r}: the mask must be a list of booleans")
        kept[".".join(parts[: parts.index("lora_E", len(parts) - 2)])] = sum(mask)
    return kept


def _literal(value: object, expected: object, why: str) -> None:
    if value != expected:
        raise Refusal(f"{why} (only {expected!r}), got {short(value)}")


def _check_init(value: object, report: ConfigReport) -> None:
    if isinstance(value, str) and value.lower().startswith(_BASE_REWRITING_INITS):
        raise Refusal(
            f"{value!r} makes PEFT rewrite the base weights when loading; convert it to a plain LoRA first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    report.ignored["init_lora_weights"] = _INIT_ONLY


def _check_fan_in_fan_out(value: object, report: ConfigReport) -> None:
    if parse_bool(value):
        report.ignored["fan_in_fan_out"] = (
            "PEFT forces it to False for nn.Linear targets ('fan_in_fan_out is set to True but the target "
            "module is torch.nn.Linear'); A and B are used as stored"
        )


def _rank(value: object, max_rank: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise Refusal(f"LoRA rank must be a positive integer, got {short(value)}")
    if value > max_rank:
        raise Refusal(f"LoRA rank {value} is greater than max_lora_rank {max_rank}")
    return value


def _number(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise Refusal(f"LoRA alpha must be a finite number, got {short(value)}")
    return float(value)


def _pattern_dict(value: object, parse: Any) -> tuple[tuple[re.Pattern[str], Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise Refusal(f"must be an object mapping module patterns to values, got {short(value)}")
    items = []
    for key, v in value.items():
        try:
            items.append((compile_regex(key, rf"(.*\.)?({key})$"), parse(v)))
        except Refusal as e:
            raise Refusal(f"{key!r}: {e}") from None
    return tuple(items)


def _layers(value: object, data: dict[str, Any]) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(data.get("target_modules"), str):
        raise Refusal("cannot be used when target_modules is a string (PEFT raises the same error)")
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise Refusal(f"must be an integer or a list of integers, got {short(value)}")
    return frozenset(items) if items else None  # PEFT treats an empty list as "every layer"


def _layers_pattern(value: object, data: dict[str, Any]) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    if isinstance(data.get("target_modules"), str):
        raise Refusal("cannot be used when target_modules is a string (PEFT raises the same error)")
    if value and data.get("layers_to_transform") is None:
        raise Refusal("needs layers_to_transform (PEFT raises the same error)")
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise Refusal(f"must be a string or a list of strings, got {short(value)}")
    if not patterns:
        return ()  # PEFT: an empty layers_pattern finds the index after any "<segment>."
    return tuple(compile_regex(p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns)

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

import importlib
import json
import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from server.errors import AdapterConfigError
from server.lora.adapter import ConfigReport

MAX_CONFIG_BYTES = 64 * 1024
# PEFT's own configs nest three deep (loftq_config, rank_pattern); deeper is not a LoRA config, and
# nesting is what makes a small file costly to walk (json.loads alone takes ~1000 levels)
MAX_CONFIG_DEPTH = 16
ALL_LINEAR = "all-linear"
# User regexes are matched against every module name: refuse shapes that backtrack exponentially.
_MAX_PATTERN_CHARS = 1024
_MAX_UNBOUNDED_REPEATS = 4
_sre: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_REPEATS = tuple(
    getattr(_sre, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT") if hasattr(_sre, op)
)

_INIT_ONLY = "initialization only: the trained A/B come from adapter_model.safetensors"
_IGNORED: dict[str, str] = {
    "task_type": "informational: loraplex runs the base model as a causal LM",
    "base_model_name_or_path": "informational: the adapter is applied to this server's base model",
    "revision": "informational: nothing is downloaded",
    "peft_version": "informational",
    "auto_mapping": "informational: never used to import anything",
    "inference_mode": "informational: loraplex only runs inference",
    "lora_dropout": "dropout is a training-time regularizer; inference does not drop",
    "megatron_core": "only used together with megatron_config",
    "qalora_group_size": "only used together with use_qalora",
    "loftq_config": "PEFT discards it unless init_lora_weights is 'loftq'",
    "eva_config": _INIT_ONLY,
    "corda_config": _INIT_ONLY,
    "lora_ga_config": _INIT_ONLY,
    "runtime_config": "runtime-only option (GPU offload while loading); PEFT does not save it",
    "ensure_weight_tying": "only affects adapters on tied embeddings, which loraplex never targets",
}
_REFUSED_IF_SET: dict[str, str] = {
    "use_dora": "DoRA (magnitude vector + weight norm) is not supported",
    "modules_to_save": "fully trained copies of base modules are not supported",
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
# These inits rewrite the base weight (W - scale·B0·A0, or LoftQ's quantized W) when PEFT loads the adapter:
# one shared base cannot do that per adapter.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_HONOURED = (
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "fan_in_fan_out",
)  # fmt: skip
_DEFAULTS = {"r": 8, "lora_alpha": 8, "use_rslora": False, "bias": "none", "fan_in_fan_out": False}
_DEFAULT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")

Matcher = frozenset[str] | re.Pattern[str]


class AdapterConfigRefusedError(AdapterConfigError):
    """A readable config that asks for something loraplex refuses; `report` says what was refused and why."""

    def __init__(self, message: str, field: str, report: ConfigReport) -> None:
        super().__init__(message, field)
        self.report = report


class _Refusal(Exception):
    """One field is refused; collected so that the uploader sees every problem at once."""


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

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would wrap `module_name`, a linear projection of the base model."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, module_name):
            return False
        if self.target_modules is None:
            return True
        if isinstance(self.target_modules, re.Pattern):
            return self.target_modules.fullmatch(module_name) is not None
        if module_name in self.target_modules:
            return True  # PEFT checks layers_to_transform only for suffix hits
        if not _matches(self.target_modules, module_name):
            return False
        if self.layers_to_transform is None:
            return True
        finders = self.layers_pattern or (_DEFAULT_LAYER_INDEX,)
        match = next((m for m in (f.match(module_name) for f in finders) if m), None)
        return match is not None and int(match.group("idx")) in self.layers_to_transform

    def rank_for(self, module_name: str) -> int:
        return next((r for key, r in self.rank_pattern if key.match(module_name)), self.r)

    def alpha_for(self, module_name: str) -> float:
        return next((a for key, a in self.alpha_pattern if key.match(module_name)), self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def parse_lora_config(raw: bytes | str | dict[str, object], max_rank: int) -> tuple[LoraConfig, ConfigReport]:
    """Validate an adapter_config.json.

    Raises AdapterConfigError when it cannot be read, AdapterConfigRefusedError (with the full report) when it
    asks for something refused; the message lists every refused field.
    """
    data = _load_json(raw)
    report = ConfigReport()
    for key, value in data.items():
        if key in _IGNORED:
            report.ignored[key] = _IGNORED[key]
        elif key in _REFUSED_IF_SET:
            if value:
                report.refused[key] = f"{key}={_short(value)}: {_REFUSED_IF_SET[key]}"
            else:
                report.ignored[key] = f"{_short(value)}: disabled, nothing to apply"
        elif key not in _HONOURED and key != "init_lora_weights":
            report.ignored[key] = "unknown key (not a field of PEFT's LoraConfig)"

    def field(key: str, parse: Any, *extra: object) -> Any:
        try:
            return parse(data.get(key, _DEFAULTS.get(key)), *extra)
        except _Refusal as e:
            report.refused[key] = f"{key}: {e}"
            return None

    # PEFT picks the config class from peft_type and fails with a KeyError when it is absent.
    field("peft_type", _literal, "LORA", "only LoRA adapters are supported")
    field("bias", _literal, "none", "trained biases are not supported")
    if "init_lora_weights" in data:
        field("init_lora_weights", _check_init, report)
    field("fan_in_fan_out", _check_fan_in_fan_out, report)
    r = field("r", _rank, max_rank)
    alpha = field("lora_alpha", _number)
    use_rslora = field("use_rslora", _bool)
    targets = field("target_modules", _targets, False)
    exclude = field("exclude_modules", _targets, True)
    rank_pattern = field("rank_pattern", _pattern_dict, lambda v: _rank(v, max_rank))
    alpha_pattern = field("alpha_pattern", _pattern_dict, _number)
    layers = field("layers_to_transform", _layers, data)
    finders = field("layers_pattern", _layers_pattern, data)

    if report.refused:
        problems = "; ".join(report.refused.values())
        first = next(iter(report.refused))
        raise AdapterConfigRefusedError(f"adapter_config.json is refused: {problems}", first, report)
    for key in _HONOURED:
        if key in data and key not in report.ignored:
            report.honoured[key] = data[key]
    report.honoured.setdefault("r", r)
    report.honoured.setdefault("lora_alpha", alpha)
    config = LoraConfig(r, alpha, use_rslora, targets, exclude, rank_pattern, alpha_pattern, layers, finders)
    return config, report


def _load_json(raw: bytes | str | dict[str, object]) -> dict[str, Any]:
    name = "adapter_config.json"  # also the `field` of a whole-file problem: the upload part at fault
    try:
        data = json.dumps(raw).encode() if isinstance(raw, dict) else raw
        data = data.encode() if isinstance(data, str) else data
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterConfigError(f"{name} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}", name)
        text = data.decode("utf-8-sig")
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, TypeError, RecursionError) as e:  # JSON and Unicode decode errors are ValueErrors
        raise AdapterConfigError(f"{name} is not valid JSON: {e}", name) from None
    if not isinstance(obj, dict):
        raise AdapterConfigError(f"{name} must be a JSON object, got a JSON {type(obj).__name__}", name)
    if _deeper_than(obj, MAX_CONFIG_DEPTH):
        raise AdapterConfigError(
            f"{name} nests objects or arrays deeper than {MAX_CONFIG_DEPTH} levels", name
        )
    return obj


def _deeper_than(obj: object, limit: int) -> bool:
    stack = [(obj, 1)]  # iterative: the depth is the attacker's to choose
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > limit:
                return True
            stack.extend(
                (child, depth + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _literal(value: object, expected: str, why: str) -> None:
    if value != expected:
        raise _Refusal(f"{why} (only {expected!r}), got {_short(value)}")


def _check_init(value: object, report: ConfigReport) -> None:
    if isinstance(value, str) and value.lower().startswith(_BASE_REWRITING_INITS):
        raise _Refusal(
            f"{value!r} makes PEFT rewrite the base weights when loading; convert it to a plain LoRA first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    report.ignored["init_lora_weights"] = _INIT_ONLY


def _check_fan_in_fan_out(value: object, report: ConfigReport) -> None:
    if _bool(value):
        report.ignored["fan_in_fan_out"] = (
            "PEFT forces it to False for nn.Linear targets ('fan_in_fan_out is set to True but the target "
            "module is torch.nn.Linear'); A and B are used as stored"
        )


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Refusal(f"must be true or false, got {_short(value)}")
    return value


def _rank(value: object, max_rank: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _Refusal(f"LoRA rank must be a positive integer, got {_short(value)}")
    if value > max_rank:
        raise _Refusal(f"LoRA rank {value} is greater than max_lora_rank {max_rank}")
    return value


def _number(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise _Refusal(f"LoRA alpha must be a finite number, got {_short(value)}")
    return float(value)


def _targets(value: object, optional: bool) -> Matcher | None:
    if optional and not value:
        return None
    if value is None:
        raise _Refusal("missing: PEFT would pick per-architecture defaults; list the modules explicitly")
    if not value:
        raise _Refusal("is empty: the adapter would target no module")
    if isinstance(value, str):
        return None if value.lower() == ALL_LINEAR and not optional else _regex(value, value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Refusal(f"must be a list of module names or a regex string, got {_short(value)}")
    return frozenset(value)


def _pattern_dict(value: object, parse: Any) -> tuple[tuple[re.Pattern[str], Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _Refusal(f"must be an object mapping module patterns to values, got {_short(value)}")
    items = []
    for key, v in value.items():
        try:
            items.append((_regex(key, rf"(.*\.)?({key})$"), parse(v)))
        except _Refusal as e:
            raise _Refusal(f"{key!r}: {e}") from None
    return tuple(items)


def _layers(value: object, data: dict[str, Any]) -> frozenset[int] | None:
    if value is None:
        return None
    if isinstance(data.get("target_modules"), str):
        raise _Refusal("cannot be used when target_modules is a string (PEFT raises the same error)")
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise _Refusal(f"must be an integer or a list of integers, got {_short(value)}")
    return frozenset(items) if items else None  # PEFT treats an empty list as "every layer"


def _layers_pattern(value: object, data: dict[str, Any]) -> tuple[re.Pattern[str], ...]:
    if value is None:
        return ()
    if isinstance(data.get("target_modules"), str):
        raise _Refusal("cannot be used when target_modules is a string (PEFT raises the same error)")
    if value and data.get("layers_to_transform") is None:
        raise _Refusal("needs layers_to_transform (PEFT raises the same error)")
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise _Refusal(f"must be a string or a list of strings, got {_short(value)}")
    if not patterns:
        return ()  # PEFT: an empty layers_pattern finds the index after any "<segment>."
    return tuple(_regex(p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns)


def _matches(matcher: Matcher, name: str) -> bool:
    if isinstance(matcher, re.Pattern):
        return matcher.fullmatch(name) is not None
    return name in matcher or any(name.endswith(f".{suffix}") for suffix in matcher)


def _regex(fragment: str, full: str) -> re.Pattern[str]:
    """Compile `full` (PEFT's regex built around the user's `fragment`) after a backtracking check on it."""
    try:
        if len(fragment) > _MAX_PATTERN_CHARS:
            raise _Refusal(f"is longer than {_MAX_PATTERN_CHARS} characters")
        if _unbounded_repeats(_sre.parse(fragment)) > _MAX_UNBOUNDED_REPEATS:
            raise _Refusal(f"has more than {_MAX_UNBOUNDED_REPEATS} unbounded repeats (*, +, {{n,}})")
        return re.compile(full)
    except (re.error, _Refusal) as e:
        raise _Refusal(f"regex {_short(fragment)} is refused: {e}") from None


def _unbounded_repeats(sub: Any, in_loop: bool = False) -> int:
    """Count unbounded repeats; refuse a repeat or an alternation inside one (exponential backtracking)."""
    count = 0
    for op, av in sub:
        if op in _REPEATS:
            _, high, body = av
            unbounded = high == _sre.MAXREPEAT
            if in_loop and high > 1:
                raise _Refusal(
                    "nests a repeat inside an unbounded repeat, as in (a+)*: exponential backtracking"
                )
            count += unbounded + _unbounded_repeats(body, in_loop or unbounded)
        elif in_loop and op == _sre.BRANCH:
            raise _Refusal(
                "has an alternation inside an unbounded repeat, as in (a|aa)*: exponential backtracking"
            )
        else:
            count += sum(_unbounded_repeats(child, in_loop) for child in _subpatterns(av))
    return count


def _subpatterns(av: object) -> Iterator[Any]:
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, tuple | list):
        for item in av:
            yield from _subpatterns(item)

"""(IA)3 adapters (PEFT's IA3Config, T-Few): one learned vector per targeted projection.

Semantics (PEFT 0.21 `IA3Model`, `ia3.Linear`/`ia3.Linear4bit.forward`):
- targeted modules are matched as for LoRA (`target_modules` list suffixes or a full-match regex,
  `exclude_modules` first);
- a module is feed-forward when `feedforward_modules` (a str) full-matches its name, or when its name
  ends with one of the listed names (a plain `endswith`, no dot);
- feed-forward: y = base(x * l), l: [in] (saved as `ia3_l` of shape [1, in]);
  otherwise: y = base(x) * l, l: [out] (saved as [out, 1]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from server.errors import AdapterWeightsError
from server.lora.adapter import ConfigReport, LinearShape, ModuleIA3
from server.lora.config_fields import (
    INFORMATIONAL,
    FieldReader,
    Matcher,
    Refusal,
    matches,
    parse_bool,
    parse_modules_to_save,
    parse_targets,
)

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?")
_IGNORED = {
    **INFORMATIONAL,
    "init_ia3_weights": "initialization only: the trained vectors come from adapter_model.safetensors",
}
_HONOURED = (
    "peft_type", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
    "modules_to_save",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class IA3Config:
    target_modules: Matcher | None  # None: "all-linear"
    feedforward_modules: Matcher
    exclude_modules: Matcher | None = None
    method: str = "ia3"
    modules_to_save: tuple[str, ...] = ()
    ensure_weight_tying: bool = False  # not a field of PEFT's IA3Config

    def targets(self, module_name: str) -> bool:
        if self.exclude_modules is not None and matches(self.exclude_modules, module_name):
            return False
        return self.target_modules is None or matches(self.target_modules, module_name)

    def is_feedforward(self, module_name: str) -> bool:
        if isinstance(self.feedforward_modules, re.Pattern):
            return self.feedforward_modules.fullmatch(module_name) is not None
        return any(module_name.endswith(name) for name in self.feedforward_modules)


def parse_ia3_config(data: dict[str, Any]) -> tuple[IA3Config, ConfigReport]:
    report = ConfigReport()
    for key in data:
        if key in _IGNORED:
            report.ignored[key] = _IGNORED[key]
        elif key not in _HONOURED:
            report.ignored[key] = "unknown key (not a field of PEFT's IA3Config)"

    field = FieldReader(data, report)

    targets = field("target_modules", parse_targets, False)
    exclude = field("exclude_modules", parse_targets, True)
    feedforward = field("feedforward_modules", _feedforward, data.get("target_modules"))
    to_save = field("modules_to_save", parse_modules_to_save)
    if data.get("fan_in_fan_out") is not None and field("fan_in_fan_out", parse_bool):
        report.ignored["fan_in_fan_out"] = "PEFT forces it to False for nn.Linear targets"
    field.settle(_HONOURED)
    return IA3Config(targets, feedforward, exclude, modules_to_save=to_save or ()), report


def _feedforward(value: object, targets: object) -> Matcher:
    if value is None:
        raise Refusal("missing: PEFT would pick per-architecture defaults; list the modules explicitly")
    if value == []:
        return frozenset()
    matcher = parse_targets(value, False)
    if matcher is None:
        raise Refusal("'all-linear' is not a list of feed-forward modules")
    if isinstance(matcher, frozenset) and isinstance(targets, list) and not matcher <= set(targets):
        raise Refusal("should be a subset of target_modules (PEFT raises the same error)")
    return matcher


def match_vectors(
    tensors: dict[str, torch.Tensor], config: IA3Config, base_modules: dict[str, LinearShape]
) -> dict[str, ModuleIA3]:
    """Check every `ia3_l` tensor against the base model and the config; vectors keyed by module."""
    found: dict[str, ModuleIA3] = {}
    adapter_names = set()
    for name, tensor in tensors.items():
        key = _KEY.fullmatch(name)
        if key is None:
            raise AdapterWeightsError(
                f"tensor {name} is not an (IA)3 vector (base_model.model.<module>.ia3_l)", field=name
            )
        module = key["module"]
        adapter_names.add(key["adapter"])
        if module not in base_modules:
            raise AdapterWeightsError(
                f"tensor {name}: no module {module} in the base model (IA3 applies to its decoder-layer "
                "linear projections)",
                field=name,
            )
        if not config.targets(module):
            raise AdapterWeightsError(f"tensor {name} targets a module the config does not", field=name)
        if module in found:
            raise AdapterWeightsError(f"two ia3_l tensors for {module}", field=name)
        shape = base_modules[module]
        feedforward = config.is_feedforward(module)
        want = (1, shape.in_features) if feedforward else (shape.out_features, 1)
        if tuple(tensor.shape) != want:
            kind = "feed-forward (scales the input)" if feedforward else "scales the output"
            raise AdapterWeightsError(
                f"tensor {name} has shape {list(tensor.shape)}, expected {list(want)} ({module} {kind})",
                field=name,
            )
        if not torch.isfinite(tensor).all():
            raise AdapterWeightsError(f"tensor {name} contains NaN or infinite values", field=name)
        found[module] = ModuleIA3(vector=tensor.flatten().contiguous(), feedforward=feedforward)
    if len(adapter_names) > 1:
        shown = sorted(n or "<none>" for n in adapter_names)
        raise AdapterWeightsError(f"tensors mix several adapter names in their keys: {shown}")
    return {m: found[m] for m in base_modules if m in found}  # base order, as for LoRA

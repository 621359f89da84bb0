"""Per-request adapter mixing: several adapters with weights, or one with a scale, served as one
virtual adapter version.

Two spellings say the same thing. The `model` field, for clients that can set nothing else:
`pirate*0.6+robot*0.4` (a part without `*w` has weight 1; `pirate*0.5` scales one adapter). The
body field `adapters: [{"name": "pirate", "scale": 0.6}, ...]`, with `model` the base model's id.
Adapter names never hold `*` or `+` (registry.NAME_RE), so a `model` holding either is a mix.

Semantics of the default combination, cat (exact: the sum of the parts' deltas; the `combination`
body field chooses PEFT's linear, magnitude_prune, ties, dare_linear or dare_ties instead,
combination.py):
- one part, weight w: its factors A, B unchanged, each module's scale multiplied, scale' = w * scale
  (w = 1.0 leaves every bit as the adapter alone has it).
- several parts: PEFT's `add_weighted_adapter(parts, weights, combination_type="cat")`, built with
  its arithmetic in its order. Per module, over the parts that target it (PEFT skips the others;
  their blocks would be zeros): A = cat_i(A_i * w_i * scale_i) along the rank, B = cat_i(B_i) along
  the rank, scale 1.0 (PEFT's new adapter has lora_alpha = r). So B A = sum_i w_i scale_i B_i A_i;
  the rank is the parts' ranks summed, within --max-lora-rank.
- 1 to MAX_PARTS (8) distinct parts, each weight finite and in (0, MAX_WEIGHT]: no subtraction (a
  negative weight) and no zero part (leave it out).
- the parts in name order: the canonical spelling's order and the order of that sum, so
  `robot*0.4+pirate*0.6` is `pirate*0.6+robot*0.4`, bit for bit.
- identity: the name is the canonical spelling, the version "mix-" + sha256 of the parts' versions
  and weights. To the engine a mix is one more adapter version: built once from its parts' files,
  kept in the CPU cache, given a device slot, decoded in the same step as its parts. Replacing a
  part makes new requests resolve a new mix version; running ones keep theirs.
- only plain LoRA parts (LoRA, AdaLoRA as its factors): a DoRA magnitude or an (IA)3 vector does
  not add across adapters, nor scale linearly.

Where PEFT's "cat" differs, on purpose: PEFT's new adapter copies the first part's config, so a
first part with `use_rslora` scales the whole mix by sqrt(r) and a first part's
`layers_to_transform` drops the other parts' other layers; here the mix is the exact weighted sum.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from server.errors import AdapterWeightsError, MixError
from server.lora.adapter import AdapterWeights, ConfigReport, ModuleLoRA
from server.lora.combination import CAT, Combination, combine_factors
from server.lora.registry import MIX_VERSION_PREFIX, NAME_RE, AdapterRecord

MAX_PARTS = 8
# A bound so that w * scale * A stays far from float32's overflow; scales past a few are noise anyway
MAX_WEIGHT = 100.0
# AdapterWeights.method values whose weights are factors only (AdapterWeights.is_plain_lora)
PLAIN_METHODS = frozenset({"lora", "adalora"})
# A weight as the spelling writes it: a decimal number, no sign ('+' separates parts)
NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE]-?[0-9]+)?"
_SIGNED = re.compile(rf"-?{NUMBER}\Z")


@dataclass(frozen=True, slots=True)
class MixPart:
    name: str
    weight: float


def is_spelling(model: str) -> bool:
    """Whether a `model` value spells a mix (or a scaled adapter) rather than one name."""
    return "*" in model or "+" in model


def spelling_pattern() -> str:
    """The spellings `parse` accepts, as one regex (the OpenAPI document's `model` pattern)."""
    name = NAME_RE.pattern.removeprefix("^").removesuffix(r"\Z")
    part = rf"{name}(?:\*{NUMBER})?"
    return rf"^{part}(?:\+{part}){{0,{MAX_PARTS - 1}}}$"


def parse(model: str, param: str = "model") -> list[MixPart]:
    """Semantics: `name[*weight](+name[*weight])*` -> the parts, checked (check_parts) and in name
    order. Raises MixError naming the bad piece."""
    parts = []
    for piece in model.split("+"):
        name, star, weight = piece.partition("*")
        if not name:
            raise MixError(f"{model!r} is not a mix: each part is name or name*weight, joined by '+'", param)
        if star and "*" in weight:
            raise MixError(f"the part {piece!r} of {model!r} has more than one '*'", param)
        parts.append(MixPart(name, _number(weight, name, param) if star else 1.0))
    return check_parts(parts, param)


def check_parts(parts: Sequence[MixPart], param: str) -> list[MixPart]:
    """Semantics: 1 to MAX_PARTS parts, each a valid adapter name once, each weight finite and in
    (0, MAX_WEIGHT]; returned in name order."""
    if not parts:
        raise MixError("a mix needs at least one adapter", param)
    if len(parts) > MAX_PARTS:
        raise MixError(f"a mix has at most {MAX_PARTS} adapters, got {len(parts)}", param)
    seen: set[str] = set()
    for p in parts:
        if not NAME_RE.match(p.name):
            raise MixError(f"{p.name!r} is not an adapter name", param)
        if p.name in seen:
            raise MixError(f"the adapter {p.name!r} appears twice in the mix: give it one weight", param)
        seen.add(p.name)
        if not math.isfinite(p.weight):
            raise MixError(f"the weight of {p.name!r} must be a finite number, got {p.weight}", param)
        if not 0.0 < p.weight <= MAX_WEIGHT:
            raise MixError(
                f"the weight of {p.name!r} must be above 0 and at most {MAX_WEIGHT:g}, got {p.weight}", param
            )
    return sorted(parts, key=lambda p: p.name)


def canonical(parts: Sequence[MixPart]) -> str:
    """The one spelling of a mix (parts in name order, each weight as Python's shortest repr): the
    mix's name, echoed as the response's `model`. It parses back to the same parts."""
    return "+".join(f"{p.name}*{p.weight!r}" for p in sorted(parts, key=lambda p: p.name))


def _number(text: str, name: str, param: str) -> float:
    if _SIGNED.match(text):
        return float(text)  # 1e999 is inf here: check_parts names it
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if math.isnan(value) or math.isinf(value):
        raise MixError(f"the weight of {name!r} must be a finite number, got {text!r}", param)
    raise MixError(f"the weight {text!r} of {name!r} is not a decimal number (e.g. 0.5, 2, 1e-3)", param)


def mix_record(
    parts: Sequence[tuple[AdapterRecord, float]],
    max_rank: int,
    param: str,
    combination: Combination = CAT,
) -> AdapterRecord:
    """The virtual adapter of resolved parts (in name order). Refuses what cannot be mixed before
    any weight is read: a part that is not plain LoRA, a combined rank above `max_rank`, parts of
    different ranks for a combination other than cat."""
    for record, _ in parts:
        if record.method not in PLAIN_METHODS or record.saved_modules:
            kind = record.method + (" with modules_to_save copies" if record.saved_modules else "")
            raise MixError(f"only plain LoRA adapters can be mixed: {record.name} is {kind}", param)
    how = _effective(combination, len(parts))
    ranks = " + ".join(f"{r.name} {r.rank}" for r, _ in parts)
    if how.type == "cat":
        rank = sum(r.rank for r, _ in parts) if len(parts) > 1 else parts[0][0].rank
    elif len({r.rank for r, _ in parts}) > 1:
        raise MixError(
            f"combination {how.type} needs parts of one rank (PEFT's rule), got {ranks}", "combination"
        )
    else:
        rank = parts[0][0].rank
    if rank > max_rank:
        raise MixError(f"the mix's combined rank {rank} ({ranks}) is above --max-lora-rank {max_rank}", param)
    key = "+".join(f"{r.version}*{w!r}" for r, w in parts) + how.key()
    weights = {r.name: w for r, w in parts}
    return AdapterRecord(
        name=canonical([MixPart(r.name, w) for r, w in parts]),
        version=MIX_VERSION_PREFIX + hashlib.sha256(key.encode()).hexdigest(),
        path=Path(),  # a mix has no directory: registry.load builds it from its parts
        rank=rank,
        target_modules=tuple(sorted({t for r, _ in parts for t in r.target_modules})),
        size_bytes=0,
        report=ConfigReport(honoured=_honoured(how, len(parts), weights)),
        created=max(r.created for r, _ in parts),
        parts=tuple(parts),
        combination=how,
    )


def _effective(combination: Combination, parts: int) -> Combination:
    """One part is scaled whatever the combination (PEFT also falls back to one way for one part)."""
    return CAT if parts == 1 else combination


def _honoured(how: Combination, parts: int, weights: dict[str, float]) -> dict[str, object]:
    if parts == 1:
        return {"combination_type": "scale", "parts": weights}
    return {**how.describe(), "parts": weights}


def combine(
    parts: Sequence[tuple[str, AdapterWeights, float]],
    max_rank: int,
    combination: Combination = CAT,
) -> AdapterWeights:
    """Semantics: the module docstrings' (this one's and combination.py's). `parts` are (name,
    weights, weight) in name order."""
    for name, weights, _ in parts:
        if not weights.is_plain_lora:
            kind = weights.method + (" with modules_to_save copies" if weights.saved else "")
            raise AdapterWeightsError(f"only plain LoRA adapters can be mixed: {name} is {kind}")
    how = _effective(combination, len(parts))
    report = ConfigReport(honoured=_honoured(how, len(parts), {n: w for n, _, w in parts}))
    if len(parts) == 1:
        _, weights, w = parts[0]
        return AdapterWeights(
            modules={k: replace(m, scale=w * m.scale) for k, m in weights.modules.items()}, report=report
        )
    modules: dict[str, ModuleLoRA] = {}
    for key in dict.fromkeys(k for _, weights, _ in parts for k in weights.modules):
        present = [(weights.modules[key], w) for _, weights, w in parts if key in weights.modules]
        if how.type == "cat":
            # PEFT's very expression, left to right: A * weight * scaling, each product in float32
            A = torch.cat([m.A * w * m.scale for m, w in present], dim=0)  # [sum r_i, in]
            B = torch.cat([m.B for m, _ in present], dim=1)  # [out, sum r_i]
        else:
            if len({m.A.shape[0] for m, _ in present}) > 1:
                ranks = ", ".join(str(m.A.shape[0]) for m, _ in present)
                raise AdapterWeightsError(f"{key}: combination {how.type} needs one rank, got {ranks}")
            scaled = [w * m.scale for m, w in present]
            generator = how.generator(key)  # shared by A then B, PEFT's order of draws
            A = combine_factors([m.A for m, _ in present], scaled, how, generator)
            B = combine_factors([m.B for m, _ in present], scaled, how, generator)
        if A.shape[0] > max_rank:
            raise AdapterWeightsError(f"{key}: the mix's rank {A.shape[0]} is above {max_rank}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterWeightsError(f"{key}: the weighted factors overflow float32")
        modules[key] = ModuleLoRA(A=A, B=B, scale=1.0)
    return AdapterWeights(modules=modules, report=report)

"""How the parts of a mix (mixing.py) are combined: PEFT's `add_weighted_adapter` combination types
that are deterministic, applied to the LoRA factors as PEFT applies them.

Semantics, per targeted module, over the parts that target it (w_i the part's weight, s_i its
module scale, every factor of rank r; the mix's scale is 1.0, PEFT's lora_alpha = r):
- cat: A = cat_i(A_i * w_i * s_i), B = cat_i(B_i) along the rank: exactly the weighted sum of the
  deltas, rank sum(r_i). The default.
- linear: A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (task arithmetic on each factor;
  B A then holds cross terms: this is PEFT's "linear", not the sum of the deltas).
- magnitude_prune: each A_i (and each B_i) keeps its int(density * numel) largest magnitudes, then
  as linear.
- ties: each factor pruned as magnitude_prune; per entry, the majority sign over the parts (of the
  sum of the pruned values: "total", or of their signs: "frequency"; 0 counts as +); the weighted
  values agreeing with it summed and divided by how many agree (at least 1).
The non-cat types need every part's factors at one rank (PEFT's rule). DARE's random pruning is not
offered: a server would build a different adapter each time it rebuilt the mix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

CombinationType = Literal["cat", "linear", "magnitude_prune", "ties"]
SignMethod = Literal["total", "frequency"]


@dataclass(frozen=True, slots=True)
class Combination:
    type: CombinationType = "cat"
    density: float = 1.0  # fraction of each factor's entries kept (magnitude_prune, ties)
    majority_sign_method: SignMethod = "total"  # ties

    def key(self) -> str:
        """Part of a mix's version: two combinations give one version only if they are the same."""
        if self.type == "cat":
            return ""  # the versions of 'cat' mixes predate combinations: keep them
        return f"|{self.type}|{self.density!r}|{self.majority_sign_method}"

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"combination_type": self.type}
        if self.type in ("magnitude_prune", "ties"):
            out["density"] = self.density
        if self.type == "ties":
            out["majority_sign_method"] = self.majority_sign_method
        return out


CAT = Combination()  # the default: the exact weighted sum of the deltas


def combine_factors(factors: list[torch.Tensor], weights: list[float], how: Combination) -> torch.Tensor:
    """Semantics: one factor (all A_i, or all B_i, of one module) of the mix, for the non-cat types
    (module docstring); `weights` are the w_i * s_i. PEFT's arithmetic in its order, in float32."""
    scaled = torch.tensor([math.sqrt(w) for w in weights], dtype=torch.float32)
    if how.type in ("magnitude_prune", "ties"):
        factors = [keep_largest(f, how.density) for f in factors]
    stacked = torch.stack(factors, dim=0)
    weighted = stacked * scaled.view(-1, *([1] * (stacked.dim() - 1)))
    if how.type != "ties":
        return weighted.sum(dim=0)
    votes = stacked.sum(dim=0) if how.majority_sign_method == "total" else stacked.sign().sum(dim=0)
    agrees = stacked.sign() == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def keep_largest(factor: torch.Tensor, density: float) -> torch.Tensor:
    """`factor` with all but its int(density * numel) largest magnitudes zeroed (density 1: itself)."""
    if density >= 1.0:
        return factor
    flat = factor.abs().reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat, k=int(density * flat.numel()), largest=True).indices] = 1
    return factor * keep.reshape(factor.shape)

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
- dare_linear, dare_ties: each factor keeps each entry with probability density and is divided
  by density (random pruning with rescale), then as linear, or as ties. The masks are drawn with
  PEFT's own call (torch.bernoulli over a tensor filled with density) from a generator seeded per
  module by (seed, module key), A's parts first, then B's: a mix is rebuilt bit for bit from its
  parts and seed (a server may drop it from the cache and build it again), whatever other modules
  the parts target. PEFT draws every module's masks from the global generator in turn instead.
The non-cat types need every part's factors at one rank (PEFT's rule). A density of 1 keeps every
entry and draws nothing (PEFT's prune returns the factor itself).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

CombinationType = Literal["cat", "linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]
PRUNED = frozenset({"magnitude_prune", "ties", "dare_linear", "dare_ties"})  # the types density applies to
SIGNED = frozenset({"ties", "dare_ties"})  # the types majority_sign_method applies to
RANDOM = frozenset({"dare_linear", "dare_ties"})  # the types seed applies to
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Combination:
    type: CombinationType = "cat"
    density: float = 1.0  # fraction of each factor's entries kept (PRUNED types)
    majority_sign_method: SignMethod = "total"  # SIGNED types
    seed: int = 0  # of the random masks (RANDOM types)

    def key(self) -> str:
        """Part of a mix's version: two combinations give one version only if they are the same."""
        if self.type == "cat":
            return ""  # the versions of 'cat' mixes predate combinations: keep them
        seed = f"|{self.seed}" if self.type in RANDOM else ""  # versions of the others predate seeds
        return f"|{self.type}|{self.density!r}|{self.majority_sign_method}{seed}"

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"combination_type": self.type}
        if self.type in PRUNED:
            out["density"] = self.density
        if self.type in SIGNED:
            out["majority_sign_method"] = self.majority_sign_method
        if self.type in RANDOM:
            out["seed"] = self.seed
        return out

    def generator(self, module: str) -> torch.Generator | None:
        """The generator of one module's masks (None for the types that draw none)."""
        if self.type not in RANDOM:
            return None
        return torch.Generator().manual_seed(mask_seed(self.seed, module))


CAT = Combination()  # the default: the exact weighted sum of the deltas


def mask_seed(seed: int, module: str) -> int:
    """The seed of one module's masks: a hash, so that neighbouring seeds share no stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{module}".encode()).digest()[:8], "little") & MAX_SEED


def combine_factors(
    factors: list[torch.Tensor],
    weights: list[float],
    how: Combination,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Semantics: one factor (all A_i, or all B_i, of one module) of the mix, for the non-cat types
    (module docstring); `weights` are the w_i * s_i; `generator` (the random types): the module's,
    A's call first. PEFT's arithmetic in its order, in float32."""
    scaled = torch.tensor([math.sqrt(w) for w in weights], dtype=torch.float32)
    if how.type in RANDOM:
        if generator is None:
            raise ValueError(f"{how.type} draws its masks from a generator")
        factors = [keep_random(f, how.density, generator) for f in factors]
    elif how.type in PRUNED:
        factors = [keep_largest(f, how.density) for f in factors]
    stacked = torch.stack(factors, dim=0)
    weighted = stacked * scaled.view(-1, *([1] * (stacked.dim() - 1)))
    if how.type not in SIGNED:
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


def keep_random(factor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """`factor` with each entry kept with probability `density`, the kept ones divided by it
    (density 1: itself, and nothing drawn)."""
    if density >= 1.0:
        return factor
    mask = torch.bernoulli(torch.full_like(factor, density), generator=generator)
    return factor * mask / density

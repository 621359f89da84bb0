"""q/k/v and gate/up as slices of one projection: the GPU path's merged layers.

Projections that read the same input (a layer's q, k and v; its gate and up) run as one base
matmul over their weights side by side and one pair of SGMV launches over their factors side by
side, where the model makes three (or two) of each: fewer, larger kernels per layer, as vLLM's
QKVParallelLinear and MergedColumnParallelLinear run them with its sliced LoRA kernels. Each member
projection stays a LoRALinear in the model; the first member called with an input computes the
whole group's output, and each member returns its column slice of it.

What is shared, and what stays each member's own:
- the base weights are concatenated once at load and each member's weight becomes a view of its
  rows (no second copy of the model). An NF4 weight's block scales are decoded to fp32 for the
  group's state (the values bitsandbytes decodes in every call; 0.5 bit per weight more);
- the slot buffers are allocated side by side, and each member's buffers are views into them, so
  the SlotTable writes adapters exactly as it does unfused;
- a slice's LoRA term is the unfused kernel's arithmetic tile for tile (triton_sgmv.py: the same
  block sizes, each slice's column blocks starting at its first column), so it is the same bits;
  the base matmul over the concatenated weight is one GEMM of another width, whose last bits may
  differ from three: a tolerance, like any change of GEMM shape (fused == unfused greedy tokens).

A step the group cannot run whole (DoRA or (IA)3 rows, whose per-row vectors apply per member; the
torch LoRA backend's routing) runs each member alone, as unfused. Only the triton backend fuses.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from server.lora.layer import LoRALinear
from server.model import nf4_cpu
from server.model.base_gemm import (
    CPP_DEQUANT,
    CPP_MATMUL,
    DECODED_STATE,
    BaseGemm,
    cpu_matmul,
    decoded_state,
    dequantize,
    tiled_linear,
)

log = logging.getLogger(__name__)

# member names, in the order the models call them (transformers' Llama, Qwen2 and Mistral layers)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjections:
    """One group of a decoder layer's projections that read the same input."""

    def __init__(self, members: list[LoRALinear]) -> None:
        assert len(members) > 1 and why_not_fused(members) is None
        self.members = members
        self.context = members[0].context
        widths = [m.out_features for m in members]
        self.bounds = [0]
        for w in widths:
            self.bounds.append(self.bounds[-1] + w)
        self.in_features = members[0].in_features
        self.out_features = self.bounds[-1]
        self.bias = _cat_bias(members)
        self.weight, self.state, self.compute_dtype = self._share_weights()
        # our CPU dequantization where every member had it (the group's state is theirs side by side)
        self.cpp_dequant = (
            self.state is not None
            and all(getattr(m.base, CPP_DEQUANT, False) for m in members)
            and nf4_cpu.takes(self.weight, self.state)
        )
        self.cpp_matmul = (
            self.cpp_dequant
            and all(getattr(m.base, CPP_MATMUL, False) for m in members)
            and nf4_cpu.multiplies(self.weight, self.state)
        )
        self.A, self.B, self.scale, self.rank = self._share_slots()
        from server.lora.backends.triton_sgmv import slice_tiles

        self.tiles = slice_tiles(widths, self.A.device)
        # the input the group's output was computed from, and how many members have yet to take it
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0
        for i, m in enumerate(members):
            m.group, m.group_index = self, i

    def _share_weights(self) -> tuple[torch.Tensor, Any, torch.dtype | None]:
        """The members' base weights side by side ([sum of out, in], or NF4's packed bytes), each
        member's weight made a view of its rows."""
        bases = [m.base for m in self.members]
        weight = torch.cat([b.weight.data for b in bases])
        lo = 0
        for b in bases:
            n = b.weight.data.shape[0]
            b.weight.data = weight[lo : lo + n]
            lo += n
        states = [getattr(b.weight, "quant_state", None) for b in bases]
        if states[0] is None:
            return weight, None, None
        plain = [
            getattr(b, DECODED_STATE, None) or decoded_state(s) for b, s in zip(bases, states, strict=True)
        ]
        state = decoded_state(states[0], torch.cat([p.absmax for p in plain]))
        state.shape = torch.Size([self.out_features, self.in_features])
        lo = 0
        for b, p in zip(bases, plain, strict=True):
            if hasattr(b, DECODED_STATE):  # the member's own decoded scales: a view of the group's
                n = p.absmax.numel()
                view = decoded_state(p, state.absmax[lo : lo + n])
                view.shape = p.shape
                setattr(b, DECODED_STATE, view)
                lo += n
        return weight, state, getattr(bases[0], "compute_dtype", None)

    def _share_slots(self) -> tuple[torch.Tensor, ...]:
        first = self.members[0]
        slots, rank = first.lora_B.shape[:2]
        n, dev, dtype = len(self.members), first.lora_B.device, first.lora_B.dtype
        a = torch.zeros(slots, self.in_features, n * rank, dtype=dtype, device=dev)  # rank innermost
        b = torch.zeros(slots, rank, self.out_features, dtype=dtype, device=dev)
        scale = torch.zeros(n, slots, dtype=torch.float32, device=dev)
        ranks = torch.zeros(n, slots, dtype=torch.int32, device=dev)
        for i, m in enumerate(self.members):
            m.lora_A = a[:, :, i * rank : (i + 1) * rank].transpose(1, 2)
            m.lora_B = b[:, :, self.bounds[i] : self.bounds[i + 1]]
            m.lora_scale = scale[i]
            m.lora_rank = ranks[i]
        return a.transpose(1, 2), b, scale, ranks

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s output for x: its columns of the group's output, computed by the first
        member to ask for this x; None when this step must run each member alone."""
        if self._x is not x:
            if not self._whole_step():
                return None
            self._y = self._forward(x)
            self._x, self._left = x, len(self.members)
        y = self._y
        assert y is not None
        self._left -= 1
        if self._left <= 0:  # every member has its slice: drop the references
            self._x = self._y = None
        return y[..., self.bounds[index] : self.bounds[index + 1]]

    def _whole_step(self) -> bool:
        batch = self.context.batch
        if batch is None:
            return True
        per_row: set[int] = set()
        for m in self.members:
            per_row |= m.dora_slots | m.ia3_in_slots | m.ia3_out_slots
        if batch.active & per_row:
            return False
        return batch.sgmv is not None or not (batch.always or batch.active & self._loaded())

    def _loaded(self) -> set[int]:
        loaded: set[int] = set()
        for m in self.members:
            loaded |= m.loaded
        return loaded

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        batch = self.context.batch
        if batch is None or batch.sgmv is None or not (batch.always or batch.active & self._loaded()):
            return y
        from server.lora.backends.triton_sgmv import lora_sgmv

        lora_sgmv(
            x.reshape(-1, self.in_features),
            y.view(-1, self.out_features),
            self.A, self.B, self.scale, self.rank, batch.sgmv, self.tiles, len(self.members),
        )  # fmt: skip
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """What base_linear computes for each member, for all of them at once."""
        mode = self.context.base_gemm
        bias = self.bias
        if self.state is not None and mode is BaseGemm.BNB:
            import bitsandbytes as bnb

            xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
            b = None if bias is None else bias.to(xc.dtype)
            return bnb.matmul_4bit(xc, self.weight, bias=b, quant_state=self.state).to(x.dtype)
        if self.state is not None and mode is BaseGemm.NF4_TRITON:
            from server.model.nf4_matmul import nf4_linear

            return nf4_linear(x, self.weight, self.state, bias)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.cpp_matmul:
            y = cpu_matmul(x, self.weight, self.state, bias, mode)
            if y is not None:
                return y
        if self.state is not None:
            weight = dequantize(self.weight, self.state, x.dtype, self.cpp_dequant)
        else:
            weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        if mode.invariant:
            return tiled_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)
        return F.linear(x, weight, bias)


def _cat_bias(members: list[LoRALinear]) -> torch.Tensor | None:
    biases = [m.base.bias for m in members]
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat(
        [
            b.data if b is not None else ref.new_zeros(m.out_features)
            for b, m in zip(biases, members, strict=True)
        ]
    )


def why_not_fused(members: list[LoRALinear]) -> str | None:
    """Why these projections cannot share one matmul, or None when they can."""
    first = members[0]
    if first.context.lora_backend != "triton":
        return "only the triton LoRA backend runs slices"
    if any(m.loaded for m in members):
        return "an adapter is already in the slots"
    if len({(m.in_features, m.lora_B.shape[:2], m.lora_B.dtype, type(m.base)) for m in members}) != 1:
        return "the projections differ in input width, slot buffers or base type"
    states: list[Any] = [getattr(m.base.weight, "quant_state", None) for m in members]
    if any(s is None for s in states) != all(s is None for s in states):
        return "some weights are quantized and some not"
    if states[0] is None:
        return None if len({m.base.weight.dtype for m in members}) == 1 else "weight dtypes differ"
    keys = {
        (s.blocksize, s.quant_type, s.dtype, getattr(m.base, "compute_dtype", None))
        for s, m in zip(states, members, strict=True)
    }
    if len(keys) != 1:
        return "the 4-bit formats differ"
    if any(
        m.base.weight.data.dim() != 2
        or m.base.weight.data.shape[1] != 1
        or getattr(s, "packing_format_for_cpu", False)
        for s, m in zip(states, members, strict=True)
    ):
        return "a 4-bit weight is not in bitsandbytes' plain packed layout"
    if any(m.in_features * m.out_features % s.blocksize for s, m in zip(states, members, strict=True)):
        return "a weight is not a whole number of quantization blocks"
    return None


def fuse_projections(layers: dict[str, LoRALinear]) -> list[FusedProjections]:
    """Group every decoder layer's q/k/v and gate/up (GROUPS) that can share one matmul; called at
    load, before any adapter is written. `layers`: module name -> LoRALinear."""
    groups: list[FusedProjections] = []
    for name in layers:
        parent, _, child = name.rpartition(".")
        for names in GROUPS:
            if child != names[0]:
                continue
            members = [layers.get(f"{parent}.{n}") for n in names]
            present = [m for m in members if m is not None]
            if len(present) < 2:
                continue
            reason = why_not_fused(present)
            if reason is not None:
                log.info("not fusing %s.{%s}: %s", parent, ",".join(names), reason)
                continue
            groups.append(FusedProjections(present))
    return groups

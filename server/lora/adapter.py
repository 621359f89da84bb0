"""The in-memory form of one parsed adapter, shared by the registry, the CPU cache and the slot table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from server.errors import AdapterWeightsError


@dataclass(frozen=True, slots=True)
class LinearShape:
    """A target-able projection of the base model (nn.Linear or bnb Linear4bit)."""

    in_features: int
    out_features: int
    # its weight as dense float32 (DoRA's norms need it); None where only shapes are known
    dense: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ModuleLoRA:
    """LoRA factors for one base projection: y += scale * B @ (A @ x).

    A: [r, in], B: [out, r], in nn.Linear layout (PEFT stores them so whatever fan_in_fan_out says).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    # DoRA: m / ||W + scale·B·A|| per output feature ([out]), computed once at load. The term then
    # becomes (g - 1) * base(x) + g * scale * B A x, PEFT's DoraLinearLayer.forward.
    magnitude_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True, slots=True)
class ModuleIA3:
    """(IA)3's learned vector for one projection: it scales the input ([in]) of a feed-forward
    module, else the output ([out]), as PEFT's ia3 Linear does."""

    vector: torch.Tensor
    feedforward: bool


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The base's sizes that virtual-token adapters must match."""

    hidden_size: int
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class VirtualTokens:
    """Prompt tuning / P-tuning (`embeddings`, [V, hidden]) or prefix tuning (`prefix_kv`, [layers,
    2, V, kv_heads, head_dim]): what fills the V positions before the prompt (see virtual.py)."""

    count: int
    embeddings: torch.Tensor | None = None
    prefix_kv: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        t = self.embeddings if self.embeddings is not None else self.prefix_kv
        assert t is not None
        return t


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """What an adapter_config.json asked for and what loraplex did with it (shown to uploaders)."""

    honoured: dict[str, object] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why it has no effect here
    refused: dict[str, str] = field(
        default_factory=dict
    )  # key -> why (non-empty means the adapter was rejected)


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """A validated adapter ready to be copied into a device slot.

    `modules` is keyed by the base model's module name, e.g. "model.layers.3.self_attn.q_proj".
    Tensors live on the CPU in float32 until a slot copies them to the device.
    """

    modules: dict[str, ModuleLoRA]
    report: ConfigReport
    method: str = "lora"  # the PEFT method it was trained with: lora, dora, adalora, ia3
    ia3: dict[str, ModuleIA3] = field(default_factory=dict)
    # modules_to_save: module -> parameter -> the trained copy, in the base module's dtype
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    virtual: VirtualTokens | None = None  # prompt, P- and prefix tuning

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def is_plain_lora(self) -> bool:
        """Only low-rank factors (LoRA, or AdaLoRA converted to them): what can be mixed by
        concatenating factors."""
        return not (self.ia3 or self.saved or self.virtual) and not self.per_row

    @property
    def per_row(self) -> bool:
        """Whether its rows need the step's per-row slot index (DoRA's and (IA)3's vectors, the
        modules_to_save copies' rows): such a step runs eagerly, outside a captured graph."""
        return bool(self.ia3 or self.saved) or any(
            m.magnitude_scale is not None for m in self.modules.values()
        )

    def with_factor_dtype(self, dtype: torch.dtype) -> AdapterWeights:
        """The factors cast once to the slots' dtype (--lora-dtype): the same values the slot copy
        would round to, in half the host memory and half the transfer for a 16-bit slot. Scales and
        DoRA/(IA)3 vectors keep their dtype, as the slots do."""
        if all(m.A.dtype == dtype and m.B.dtype == dtype for m in self.modules.values()):
            return self
        mods = {k: replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for k, m in self.modules.items()}
        return replace(self, modules=mods)

    def pinned(self) -> AdapterWeights:
        """The same adapter in page-locked host memory, so slot copies to a GPU run asynchronously."""
        mods = {
            k: replace(
                m,
                A=m.A.contiguous().pin_memory(),
                # B is kept as the transpose of a contiguous [r, out]: the slot holds B.T, and a copy
                # from a strided host tensor goes through a pageable temporary (a synchronous copy)
                B=m.B.T.contiguous().pin_memory().T,
                magnitude_scale=None if m.magnitude_scale is None else m.magnitude_scale.pin_memory(),
            )
            for k, m in self.modules.items()
        }
        ia3 = {k: replace(v, vector=v.vector.pin_memory()) for k, v in self.ia3.items()}
        saved = {k: {p: t.pin_memory() for p, t in params.items()} for k, params in self.saved.items()}
        virtual = self.virtual
        if virtual is not None:
            pin = virtual.tensor.pin_memory()
            if virtual.embeddings is not None:
                virtual = replace(virtual, embeddings=pin)
            else:
                virtual = replace(virtual, prefix_kv=pin)
        return replace(self, modules=mods, ia3=ia3, saved=saved, virtual=virtual)

    @property
    def nbytes(self) -> int:
        tensors = [t for m in self.modules.values() for t in (m.A, m.B, m.magnitude_scale) if t is not None]
        tensors += [v.vector for v in self.ia3.values()]
        tensors += [self.virtual.tensor] if self.virtual is not None else []
        return sum(t.numel() * t.element_size() for t in tensors) + self.saved_nbytes

    @property
    def saved_nbytes(self) -> int:
        """Bytes of the modules_to_save copies (on the device too: they keep the base's dtype)."""
        return sum(t.numel() * t.element_size() for params in self.saved.values() for t in params.values())

    @property
    def target_modules(self) -> list[str]:
        """Short projection names this adapter touches, e.g. ["q_proj", "v_proj"]."""
        return sorted({name.rsplit(".", 1)[-1] for name in [*self.modules, *self.ia3]})


def check_factor_range(weights: AdapterWeights, dtype: torch.dtype) -> None:
    """Refuse factors that the device slots' dtype cannot hold: under --lora-dtype float16 a value
    past 65504 would become inf in the slot and poison every token of the adapter. (bfloat16 has
    float32's range: nothing finite is refused for it.)"""
    if dtype == torch.float32:
        return
    limit = torch.finfo(dtype).max
    for module, m in weights.modules.items():
        for kind, tensor in (("lora_A", m.A), ("lora_B", m.B)):
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if peak > limit:
                raise AdapterWeightsError(
                    f"{module}.{kind} holds {peak:.6g}, beyond the {limit:.6g} that this server's "
                    f"{str(dtype).removeprefix('torch.')} adapter slots can hold (--lora-dtype)",
                    field=f"{module}.{kind}",
                )

"""The in-memory form of one parsed adapter, shared by the registry, the CPU cache and the slot table."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class LinearShape:
    """A target-able projection of the base model (nn.Linear or bnb Linear4bit)."""

    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class ModuleLoRA:
    """LoRA factors for one base projection: y += scale * B @ (A @ x).

    A: [r, in], B: [out, r], in nn.Linear layout (PEFT stores them so whatever fan_in_fan_out says).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


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

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def pinned(self) -> AdapterWeights:
        """The same adapter in page-locked host memory, so slot copies to a GPU run asynchronously."""
        mods = {
            k: ModuleLoRA(A=m.A.pin_memory(), B=m.B.pin_memory(), scale=m.scale)
            for k, m in self.modules.items()
        }
        return AdapterWeights(modules=mods, report=self.report)

    @property
    def nbytes(self) -> int:
        return sum(
            m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values()
        )

    @property
    def target_modules(self) -> list[str]:
        """Short projection names this adapter touches, e.g. ["q_proj", "v_proj"]."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

"""Modules an adapter replaces wholesale (PEFT `modules_to_save`): the output embedding (lm_head),
the input embedding and the norms.

PEFT wraps each listed module in a ModulesToSaveWrapper holding a trained copy and saves the copy's
parameters as `base_model.model.<module>.<param>`; a request with that adapter runs the copy instead
of the base module. Here the copy sits on the device beside the adapter's slot, and each module runs
the copy on the rows of the step that belong to that slot (a forward hook writes them over the base
module's output; lm_head is the model runner's own call). The rows of every other request keep the
base module's output, computed once for the whole step, so a copy never changes a neighbour's bits.

What a copy can be here: a norm or an embedding (row-wise, so running it on a slot's rows alone is
the same per-row arithmetic), or lm_head, a dense projection run with the same GEMM mode as the
base's. A decoder projection is a LoRA target stored in 4 bits: a trained full-precision copy of
it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from server.errors import AdapterWeightsError
from server.model import dense_cpu
from server.model.base_gemm import BaseGemm, RowTiled, dense_matmul, tiled_linear

if TYPE_CHECKING:
    from server.lora.layer import LoRAContext

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<param>[^.]+)")
_KINDS = ("lm_head", "embedding", "norm")


@dataclass(frozen=True, slots=True)
class SaveableModule:
    """A base module an adapter may replace: its kind, its parameters as PEFT names them, and the
    dtype its copy is kept in (the base module's, which is what PEFT's copy holds)."""

    kind: str  # one of _KINDS
    params: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    prefix: str = ""  # where the parameters sit inside the module here ("inner." under RowTiled)
    tied: bool = False  # lm_head and the input embedding share one weight in the base

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(_numel(shape) * size for shape in self.params.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def saveable_modules(model: nn.Module) -> dict[str, SaveableModule]:
    """lm_head, the input embedding and every RMSNorm / LayerNorm of a CausalLM, by module name."""
    out_emb: nn.Module | None = model.get_output_embeddings()  # type: ignore[operator]
    in_emb: nn.Module | None = model.get_input_embeddings()  # type: ignore[operator]
    tied = (
        out_emb is not None
        and in_emb is not None
        and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", None)
    )
    found: dict[str, SaveableModule] = {}
    for name, module in model.named_modules():
        inner, prefix = (module.inner, "inner.") if isinstance(module, RowTiled) else (module, "")
        if not name or isinstance(inner, RowTiled):
            continue
        if module is out_emb and isinstance(module, nn.Linear):
            kind = "lm_head"
        elif module is in_emb and isinstance(module, nn.Embedding):
            kind = "embedding"
        elif type(inner).__name__.endswith(("RMSNorm", "LayerNorm")):
            kind = "norm"
        else:
            continue
        params = {n: tuple(p.shape) for n, p in inner.named_parameters()}
        if not params or any(not p.dtype.is_floating_point for p in inner.parameters()):
            continue
        dtype = next(iter(inner.parameters())).dtype
        found[name] = SaveableModule(kind, params, dtype, prefix, tied and kind != "norm")
    return found


def listed(module: str, modules_to_save: Iterable[str]) -> bool:
    """A module is replaced when its full name ends with a listed name, with no dot needed: "norm"
    lists every "...layernorm" too. That is PEFT's rule up to 0.21; 0.22 wants the name whole
    after a dot. A file holds the copies its PEFT trained under either rule, and the wider one
    accepts both, so an adapter trained before 0.22 is served as trained."""
    return any(module.endswith(key) for key in modules_to_save)


def split_saved(
    tensors: dict[str, torch.Tensor],
    modules_to_save: tuple[str, ...],
    saveable: dict[str, SaveableModule],
    linear_modules: Iterable[str],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Take the tensors of the listed modules out of `tensors`: (module -> param -> tensor, in the
    copy's dtype; the rest). Raises AdapterWeightsError with the reason for anything that cannot be
    served."""
    linears = set(linear_modules)
    saved: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = _KEY.fullmatch(name)
        module = key["module"] if key else ""
        if key is None or not listed(module, modules_to_save):
            if module in saveable and key is not None and key["param"] in saveable[module].params:
                raise AdapterWeightsError(
                    f"tensor {name} is a saved copy of {module}, which the config's modules_to_save "
                    f"({list(modules_to_save)}) does not list",
                    field=name,
                )
            rest[name] = tensor
            continue
        if module in linears or module.rsplit(".", 1)[0] in linears:
            raise AdapterWeightsError(
                f"tensor {name}: modules_to_save lists the decoder projection {module}, which is stored in "
                "4 bits here and served with LoRA; a trained full-precision copy of it is not supported",
                field=name,
            )
        if not saveable:
            raise AdapterWeightsError(
                f"tensor {name}: modules_to_save copies are not accepted here (no budget for saved modules)",
                field=name,
            )
        if module not in saveable:
            raise AdapterWeightsError(
                f"tensor {name}: {module} is not a module loraplex can replace (modules_to_save is "
                f"served for lm_head, the input embedding and the norms: {_examples(saveable)})",
                field=name,
            )
        saved.setdefault(module, {})[key["param"]] = (name, tensor)

    result: dict[str, dict[str, torch.Tensor]] = {}
    for module, spec in saveable.items():  # base order
        if module not in saved:
            continue
        got = saved[module]
        first = next(iter(got.values()))[0]
        if set(got) != set(spec.params):
            raise AdapterWeightsError(
                f"{module}: the saved copy has parameters {sorted(got)}, the base module has "
                f"{sorted(spec.params)}",
                field=first,
            )
        params: dict[str, torch.Tensor] = {}
        for param, (name, tensor) in got.items():
            want = spec.params[param]
            if tuple(tensor.shape) != want:
                why = (
                    " (an adapter that resizes the vocabulary needs its own tokenizer; not supported)"
                    if spec.kind in ("lm_head", "embedding") and tensor.shape[1:] == want[1:]
                    else ""
                )
                raise AdapterWeightsError(
                    f"tensor {name} has shape {list(tensor.shape)}, the base's {module}.{param} is "
                    f"{list(want)}{why}",
                    field=name,
                )
            if not torch.isfinite(tensor).all():
                raise AdapterWeightsError(f"tensor {name} contains NaN or infinite values", field=name)
            # PEFT loads the saved tensor into a copy of the base module: it takes the module's dtype.
            # An lm_head copy may run dense_cpu.matmul, as the base's does (dense_linear).
            params[param] = dense_cpu.on_a_cache_line(tensor.to(spec.dtype).contiguous())
        result[module] = params
    return result, rest


def _examples(saveable: dict[str, SaveableModule]) -> str:
    names = [n for n, s in saveable.items() if s.kind != "norm"]
    norms = [n for n, s in saveable.items() if s.kind == "norm"]
    return ", ".join(names + norms[:2]) + (f" (+{len(norms) - 2} more norms)" if len(norms) > 2 else "")


def saved_nbytes(saved: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for params in saved.values() for t in params.values())


def describe_sizes(saved: dict[str, dict[str, torch.Tensor]]) -> str:
    """'model.embed_tokens 113.2 MB, model.norm 2.3 kB' for a refusal message."""
    return ", ".join(
        f"{module} {_human(sum(t.numel() * t.element_size() for t in params.values()))}"
        for module, params in saved.items()
    )


def _human(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class SavedModuleHook:
    """Forward hook on a saveable norm or embedding: the rows of each slot that holds a copy of
    this module are recomputed with the copy and written over the base output, in place."""

    def __init__(self, name: str, prefix: str, context: LoRAContext) -> None:
        self.name = name
        self.prefix = prefix
        self.context = context
        self.busy = False  # functional_call calls the module again, hooks included

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        batch = self.context.batch
        if self.busy or batch is None or not batch.saved_rows:
            return
        flat = output.view(-1, output.shape[-1])  # [T, H]; view: the write must land in `output`
        x = args[0]
        xf = x.reshape(flat.shape[0], -1) if x.dim() == output.dim() else x.reshape(flat.shape[0])
        for slot, rows in batch.saved_rows:
            params = self.context.saved.get(slot, {}).get(self.name)
            if params is None:
                continue
            self.busy = True
            try:
                swapped = {self.prefix + k: v for k, v in params.items()}
                y = functional_call(module, swapped, (xf.index_select(0, rows),))
            finally:
                self.busy = False
            flat.index_copy_(0, rows, y.to(flat.dtype))


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: BaseGemm, cpp: bool = False
) -> torch.Tensor:
    """A full-precision projection (a saved lm_head) with the base's GEMM mode: TILE-row tiles in the
    tiled mode, so its rows are the same bits alone or batched. `cpp`: the base's lm_head runs our
    row-invariant CPU product (base_gemm.CPP_DENSE), and so does the copy where it takes the weight.
    x: [n, in] -> [n, out]"""
    if cpp and dense_cpu.takes(weight):
        y = dense_matmul(x, weight, bias, mode)
        if y is not None:
            return y
    if mode.invariant:
        return tiled_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)

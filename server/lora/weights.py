"""Load a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) into AdapterWeights.

Pickle files are never opened. The safetensors header is checked by our own code, on the very bytes that
are then handed to the `safetensors` library, so a file swapped between check and load cannot slip through.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import replace
from functools import partial
from pathlib import Path

import safetensors.torch
import torch

from server.errors import AdapterConfigError, AdapterError, AdapterWeightsError
from server.lora.adapter import AdapterWeights, LinearShape, ModelDims, ModuleLoRA
from server.lora.config import MAX_CONFIG_BYTES, LoraConfig, parse_adapter_config
from server.lora.dora import dense_weight, magnitude_scale
from server.lora.ia3 import IA3Config, match_vectors
from server.lora.saved import SaveableModule, describe_sizes, listed, saved_nbytes, split_saved
from server.lora.virtual import PromptConfig, load_virtual, payload_bound

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20
# LoRA factors are floating point; integer, bool and fp8 tensors are quantized or not LoRA weights at all.
_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
# PEFT saves "base_model.model.<module>.lora_A.weight"; some files keep the adapter name: "lora_A.default".
# DoRA adds "<module>.lora_magnitude_vector"; AdaLoRA saves "<module>.lora_A", ".lora_B", ".lora_E".
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_E|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[^.]+))?(?P<weight>\.weight)?"
)
_KINDS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "adalora": ("lora_A", "lora_B", "lora_E"),
}
_IN_BLOCK = re.compile(r"\.\d+\.")  # "model.layers.3.mlp.up_proj": inside a numbered decoder layer


def linear_modules(model: torch.nn.Module) -> dict[str, LinearShape]:
    """Every nn.Linear (bnb Linear4bit included: it subclasses nn.Linear) inside the decoder layers.

    lm_head and other projections outside the numbered layers are left out, as PEFT's "all-linear" does for
    the output embedding. Pass the base model, not a PEFT-wrapped one (its lora_A/lora_B are Linears too).
    """
    return {
        name: LinearShape(module.in_features, module.out_features, dense=partial(dense_weight, module))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _IN_BLOCK.search(name)
    }


def load_adapter(
    directory: Path,
    base_modules: dict[str, LinearShape],
    max_rank: int,
    saveable: dict[str, SaveableModule] | None = None,
    max_saved_bytes: int = 0,
    dims: ModelDims | None = None,
) -> AdapterWeights:
    """Validate a PEFT adapter directory against the base model (AdapterConfigError / AdapterWeightsError).

    `saveable`: the base modules a `modules_to_save` copy may replace; the copies of one adapter may
    take at most `max_saved_bytes` (in the base's dtype). `dims`: the sizes virtual-token adapters
    (prompt, P- and prefix tuning) must match; without them such adapters are refused."""
    names = _list_dir(directory)
    found: set[str]
    if WEIGHTS_NAME not in names:
        pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterWeightsError(
                f"{directory} holds pickle weights ({', '.join(pickles)}); pickle weights are never loaded. "
                "Convert them to safetensors (PeftModel.save_pretrained(..., safe_serialization=True)).",
                field=pickles[0],
            )
        raise AdapterWeightsError(f"{directory} has no {WEIGHTS_NAME}", field=WEIGHTS_NAME)
    if CONFIG_NAME not in names:
        raise AdapterConfigError(f"{directory} has no {CONFIG_NAME}", field=CONFIG_NAME)

    raw_config = _read_regular_file(directory / CONFIG_NAME, MAX_CONFIG_BYTES, AdapterConfigError)
    config, report = parse_adapter_config(raw_config, max_rank)
    # Anything larger than max_rank factors (and a vector per side) in F64 for every module cannot be a
    # valid adapter for this base.
    payload = sum((max_rank + 1) * (s.in_features + s.out_features) * 8 for s in base_modules.values())
    saveable = saveable or {}
    listed_saveable = [s for n, s in saveable.items() if listed(n, config.modules_to_save)]
    payload += sum(s.nbytes * 8 // s.dtype.itemsize for s in listed_saveable)  # copies in F64 at most
    if isinstance(config, PromptConfig):
        if dims is None:
            raise AdapterWeightsError(f"{config.method} adapters are not accepted here (no model sizes)")
        payload += payload_bound(config, dims)
    tensors = read_safetensors_strict(directory / WEIGHTS_NAME, payload + 16 * 2**20)
    if not tensors:
        raise AdapterWeightsError(f"{WEIGHTS_NAME} holds no tensors", field=WEIGHTS_NAME)
    saved, tensors = split_saved(tensors, config.modules_to_save, saveable, base_modules)
    _check_saved(saved, saveable, config.ensure_weight_tying, max_saved_bytes)
    if isinstance(config, PromptConfig):
        assert dims is not None
        virtual = load_virtual(tensors, config, dims)
        found = set()
        weights = AdapterWeights(
            modules={}, report=report, method=config.method, saved=saved, virtual=virtual
        )
    elif isinstance(config, IA3Config):
        ia3 = match_vectors(tensors, config, base_modules)
        found = set(ia3)
        weights = AdapterWeights(modules={}, report=report, method="ia3", ia3=ia3, saved=saved)
    else:
        modules = _match_modules(tensors, config, base_modules, max_rank)
        found = set(modules) | {m for m, r in config.kept_ranks.items() if r == 0}
        weights = AdapterWeights(modules=modules, report=report, method=config.method, saved=saved)

    ignored = dict(report.ignored)
    for name in sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES)):
        ignored[name] = f"pickle file, never opened: {WEIGHTS_NAME} is used"
    missing = [m for m in base_modules if config.targets(m) and m not in found]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        effect = "the vector at 1, no effect" if isinstance(config, IA3Config) else "B = 0, no effect"
        ignored["missing_modules"] = (
            f"{len(missing)} targeted module(s) have no tensors; PEFT leaves them at init ({effect}): "
            + shown
        )
    unsaved = [m for m in saveable if listed(m, config.modules_to_save) and m not in saved]
    if unsaved:
        ignored["unsaved_modules"] = (
            f"{', '.join(unsaved)}: listed but no tensors saved; PEFT keeps its copy of the base module "
            "(no effect)"
        )
    return replace(weights, report=replace(report, ignored=ignored))


def _check_saved(
    saved: dict[str, dict[str, torch.Tensor]],
    saveable: dict[str, SaveableModule],
    ensure_weight_tying: bool,
    max_bytes: int,
) -> None:
    if not saved:
        return
    tied = [m for m in saved if saveable[m].tied]
    if tied and ensure_weight_tying:
        raise AdapterWeightsError(
            f"ensure_weight_tying with a saved copy of the tied {', '.join(tied)} is not supported: PEFT "
            "then shares one copy between lm_head and the input embedding",
            field=WEIGHTS_NAME,
        )
    size = saved_nbytes(saved)
    if size > max_bytes:
        raise AdapterWeightsError(
            f"the saved modules take {size} bytes ({describe_sizes(saved)}) and the budget for saved "
            f"modules (--max-saved-module-bytes) is {max_bytes} bytes",
            field=WEIGHTS_NAME,
        )


def read_safetensors_strict(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    """Read a safetensors file whose header passes our checks; tensors come back as float32 on the CPU."""
    data = _read_regular_file(path, max_bytes)
    header = _check_header(data, path.name)
    tensors = safetensors.torch.load(data)
    if set(tensors) != set(header):
        raise AdapterWeightsError(
            f"{path.name}: the safetensors library read other tensors than the header lists"
        )
    return {name: tensor.to(torch.float32) for name, tensor in tensors.items()}


def _check_header(data: bytes, file: str) -> dict[str, dict[str, object]]:
    if len(data) < 8:
        raise AdapterWeightsError(
            f"{file} is truncated: {len(data)} bytes, not even a header length", field=file
        )
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise AdapterWeightsError(
            f"{file}: header length {size} exceeds the file size {len(data)} or the limit {MAX_HEADER_BYTES}",
            field=file,
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise AdapterWeightsError(f"{file}: header is not valid JSON: {e}", field=file) from None
    if not isinstance(header, dict):
        raise AdapterWeightsError(f"{file}: header must be a JSON object", field=file)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterWeightsError(f"{file}: __metadata__ must map strings to strings", field="__metadata__")

    spans = sorted((_check_entry(name, entry), name) for name, entry in header.items())
    data_len, cursor = len(data) - 8 - size, 0
    for (begin, end), name in spans:
        if begin < cursor:
            raise AdapterWeightsError(f"{file}: tensor {name} overlaps the previous tensor", field=name)
        if begin > cursor:
            raise AdapterWeightsError(
                f"{file}: {begin - cursor} unreferenced bytes before {name}", field=name
            )
        if end > data_len:
            raise AdapterWeightsError(
                f"{file} is truncated: tensor {name} ends at byte {end} of a {data_len}-byte data section",
                field=name,
            )
        cursor = end
    if cursor != data_len:
        raise AdapterWeightsError(
            f"{file}: {data_len - cursor} trailing bytes after the last tensor", field=file
        )
    return header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Readers disagree on which duplicate wins; refuse rather than validate one and load the other.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate tensor names")
    return result


def _check_entry(name: str, entry: object) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise AdapterWeightsError(
            f"tensor {name}: header entry must have exactly {sorted(_ENTRY_KEYS)}", field=name
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise AdapterWeightsError(
            f"tensor {name} has dtype {dtype}; LoRA weights must be floating point ({', '.join(_ITEMSIZE)})",
            field=name,
        )
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise AdapterWeightsError(
            f"tensor {name}: shape {shape!r} is not a list of non-negative ints", field=name
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
        raise AdapterWeightsError(f"tensor {name}: data_offsets {offsets!r} is not [begin, end]", field=name)
    begin, end = offsets
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise AdapterWeightsError(
            f"tensor {name}: data_offsets {offsets} hold {end - begin} bytes, "
            f"but {dtype} {shape} needs {math.prod(shape) * _ITEMSIZE[dtype]}",
            field=name,
        )
    return begin, end


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _match_modules(
    tensors: dict[str, torch.Tensor], config: LoraConfig, base_modules: dict[str, LinearShape], max_rank: int
) -> dict[str, ModuleLoRA]:
    kinds = _KINDS[config.method]
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    adapter_names = set()
    for name, tensor in tensors.items():
        key = _KEY.fullmatch(name)
        kind = key["kind"] if key else None
        if key is None or kind not in kinds:
            raise AdapterWeightsError(
                f"tensor {name} is not a {config.method} tensor of this config (base_model.model.<module>."
                f"{{{', '.join(kinds)}}}); embedding LoRA and biases are not supported",
                field=name,
            )
        module = key["module"]
        # "lora_A.weight" parses as adapter "weight": the optional parts are told apart here
        adapter = None if key["adapter"] == "weight" and not key["weight"] else key["adapter"]
        adapter_names.add(adapter)
        if module not in base_modules:
            raise AdapterWeightsError(
                f"tensor {name}: no module {module} in the base model (LoRA applies to its decoder-layer "
                "linear projections)",
                field=name,
            )
        if not config.targets(module):
            raise AdapterWeightsError(
                f"tensor {name} targets a module the config does not target", field=name
            )
        if kind in factors.setdefault(module, {}):
            raise AdapterWeightsError(
                f"tensors {factors[module][kind][0]} and {name} are both {kind} of {module}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterWeightsError(f"tensor {name} contains NaN or infinite values", field=name)
        factors[module][kind] = (name, tensor)
    if len(adapter_names) > 1:
        shown = sorted(n or "<none>" for n in adapter_names)
        raise AdapterWeightsError(f"tensors mix several adapter names in their keys: {shown}")

    result: dict[str, ModuleLoRA] = {}
    for module, shape in base_modules.items():  # base order: deterministic and layer by layer
        if module not in factors:
            continue
        r = config.rank_for(module)
        if r > max_rank:
            raise AdapterWeightsError(
                f"{module} has rank {r}, greater than max_lora_rank {max_rank}",
                field=next(iter(factors[module].values()))[0],
            )
        expected = {
            "lora_A": (r, shape.in_features),
            "lora_B": (shape.out_features, r),
            "lora_E": (r, 1),
            "lora_magnitude_vector": (shape.out_features,),
        }
        for kind in kinds:
            if kind not in factors[module]:
                other = next(iter(factors[module].values()))[0]
                raise AdapterWeightsError(f"tensor {other} has no matching {kind} for {module}", field=other)
            name, tensor = factors[module][kind]
            if tuple(tensor.shape) != expected[kind]:
                raise AdapterWeightsError(
                    f"tensor {name} has shape {list(tensor.shape)}, expected {list(expected[kind])} "
                    f"(rank {r}, {module} is {shape.in_features} -> {shape.out_features})",
                    field=name,
                )
        if r == 0:
            continue  # AdaLoRA pruned every rank of this module: PEFT adds nothing
        A, B = factors[module]["lora_A"][1], factors[module]["lora_B"][1]
        if config.method == "adalora":
            A = A * factors[module]["lora_E"][1]  # PEFT: x @ (lora_A * lora_E).T @ lora_B.T
        scale = config.scale_for(module)
        g = None
        if config.method == "dora":
            if shape.dense is None:
                raise AdapterWeightsError(f"DoRA needs the base weights of {module}; none were given")
            g = magnitude_scale(A, B, scale, factors[module]["lora_magnitude_vector"][1], shape.dense())
        result[module] = ModuleLoRA(A=A.contiguous(), B=B.contiguous(), scale=scale, magnitude_scale=g)
    return result


def _list_dir(directory: Path) -> set[str]:
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise AdapterWeightsError(f"{directory} is not a directory")
        return {entry.name for entry in os.scandir(directory)}
    except OSError as e:
        raise AdapterWeightsError(f"cannot read adapter directory {directory}: {e.strerror}") from None


def _read_regular_file(path: Path, max_bytes: int, error: type[AdapterError] = AdapterWeightsError) -> bytes:
    """Read a whole regular file of at most max_bytes (symlinks are followed; FIFOs and devices refused)."""
    try:
        # O_NONBLOCK: opening a FIFO must not hang; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot open {path.name}: {e.strerror}", field=path.name) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path.name} is not a regular file", field=path.name)
        if info.st_size > max_bytes:
            raise error(
                f"{path.name} is {info.st_size} bytes; the limit here is {max_bytes}", field=path.name
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path.name} grew past {max_bytes} bytes while being read", field=path.name)
    return data

"""Load the base model: 4-bit NF4 with double quantization (or unquantized), our attention, and a
LoRA layer around every projection of the decoder layers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.engine import attention
from server.errors import ModelNotFoundError
from server.lora import fused
from server.lora.adapter import LinearShape, ModelDims
from server.lora.dora import dense_weight
from server.lora.layer import LoRAContext, LoRALinear
from server.lora.saved import SaveableModule, SavedModuleHook, saveable_modules
from server.model.base_gemm import (
    CPP_DENSE,
    CPP_DEQUANT,
    CPP_MATMUL,
    BaseGemm,
    RowTiled,
    cpu_dense_rows,
    cpu_matmul_rows,
    keep_block_scales,
    keep_dense,
    tile_keeps_rows,
)

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
# vLLM's spellings too: half is float16, float is float32
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


@dataclass
class BaseModel:
    """The loaded base, ready for the engine. `model` is a transformers CausalLM whose target
    projections are wrapped in LoRALinear."""

    model: Any
    tokenizer: Any
    model_id: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: frozenset[int]
    linear_shapes: dict[str, LinearShape]
    lora_layers: dict[str, LoRALinear]
    lora_context: LoRAContext
    # what an adapter's modules_to_save copies may replace (lm_head, embeddings, norms)
    saveable: dict[str, SaveableModule] = field(default_factory=dict)
    dims: ModelDims | None = None  # what prompt, P- and prefix tuning adapters must match
    lora_dtype: torch.dtype = torch.float32  # the adapter factors' in the slots (--lora-dtype)
    dequant: str = "bnb"  # who dequantizes NF4 weights: "cpp" (nf4_cpu.py) or "bnb"

    def chat_ids(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """A conversation as prompt token ids, through the model's chat template.

        Semantics: by default the assistant turn is opened after the last message. With
        `continue_final_message` the last (assistant) message is left open instead, so the model
        continues it (a frontend's "continue" or a prefill); the two cannot be combined, as in
        transformers and vLLM. `template_kwargs` reach the template as variables (tools, flags)."""
        if continue_final_message and add_generation_prompt:
            add_generation_prompt = False  # vLLM's rule: continuing a message opens no new turn
        ids = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=True,
            return_dict=False,
            **(template_kwargs or {}),
        )
        return [int(i) for i in ids]


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """QLoRA's storage format: 4-bit NormalFloat with double-quantized block scales."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_cpu_weight_packing(model: nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights on AVX512-BF16 CPUs at the first eval forward, with bf16
    block scales: faster, but no longer the NF4 + double-quant numbers a GPU (or PEFT after it
    moves the module) computes. We keep the exact format so outputs match PEFT's."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            setattr(m, "support_avx512bf16_for_cpu", False)  # noqa: B010


def tile_norms(model: nn.Module) -> None:
    """Batch-invariant mode on CUDA: every RMSNorm runs in fixed row tiles (a CUDA reduction's
    launch configuration follows the number of rows; CPU reductions are per row already)."""
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RMSNorm") and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, RowTiled(m))


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every projection inside the decoder layers (bnb Linear4bit subclasses nn.Linear); lm_head and
    embeddings are not LoRA targets here."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and ".layers." in f".{name}"
    }


def load_base(
    path: Path,
    model_id: str,
    *,
    quantization: str = "nf4",
    device: str = "auto",
    dtype: str = "auto",
    max_loras: int = 8,
    max_lora_rank: int = 16,
    max_model_len: int | None = None,
    base_gemm: BaseGemm | None = None,
    lora_backend: str = "torch",
    lora_dtype: torch.dtype = torch.float32,
    fuse_projections: bool | None = None,
    dequant: str | None = None,
) -> BaseModel:
    """`base_gemm` None: what `select_backends` picks for the device by default. `lora_dtype`: the
    adapter factors' (fp32: PEFT's; see server/engine/backends.py). `fuse_projections`: q/k/v and
    gate/up as slices of one matmul (server/lora/fused.py); None: with the triton backend.
    `dequant`: who dequantizes NF4 weights ("cpp" or "bnb"); None: `select_backends`' choice."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelNotFoundError(
            f"model type {config.model_type!r} is not supported; "
            f"loraplex serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    attention.register()
    kwargs: dict[str, Any] = {"dtype": dt, "attn_implementation": attention.ATTN_IMPLEMENTATION}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dt)
        kwargs["device_map"] = {"": dev}
    model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization != "nf4":
        model.to(dev)
    model.eval().requires_grad_(False)
    disable_cpu_weight_packing(model)
    tokenizer = AutoTokenizer.from_pretrained(path)

    if base_gemm is None or dequant is None:
        from server.engine.backends import select_backends

        chosen = select_backends(dev, compute_dtype=dt)
        base_gemm = chosen.base_gemm if base_gemm is None else base_gemm
        dequant = chosen.dequant if dequant is None else dequant
    context = LoRAContext(base_gemm, lora_backend)
    if base_gemm.invariant and dev.type == "cuda":
        tile_norms(model)
    linears = target_linears(model)
    shapes = {
        name: LinearShape(m.in_features, m.out_features, dense=partial(dense_weight, m))
        for name, m in linears.items()
    }
    layers: dict[str, LoRALinear] = {}
    for name, linear in linears.items():
        if base_gemm is not BaseGemm.BNB:  # BNB: the module's own kernels, which decode them inside
            keep_block_scales(linear, dequant)
        if base_gemm is BaseGemm.NF4_TRITON:
            _check_nf4_kernel(linear)
        parent_name, _, child = name.rpartition(".")
        # fp32 factors by default whatever the compute dtype: PEFT computes the term in the adapter's
        # fp32 (autocast_adapter_dtype) and casts before the add.
        layer = LoRALinear(linear, max_loras, max_lora_rank, context, dtype=lora_dtype)
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    if fuse_projections is None:
        fuse_projections = lora_backend == "triton"
    groups = fused.fuse_projections(layers) if fuse_projections else []
    if base_gemm.invariant:
        _check_tiles(model, layers, groups, dt, dev)

    lm_head = model.get_output_embeddings()
    if isinstance(lm_head, nn.Linear) and base_gemm is not BaseGemm.BNB:
        keep_dense(lm_head, dequant)

    saveable = saveable_modules(model)
    for name, spec in saveable.items():
        if spec.kind != "lm_head":  # the model runner runs lm_head itself, on the sampled rows
            model.get_submodule(name).register_forward_hook(SavedModuleHook(name, spec.prefix, context))

    # what the base's NF4 weights actually use: none to dequantize (an unquantized base) is "bnb"
    dequant = "cpp" if any(getattr(layer.base, CPP_DEQUANT, False) for layer in layers.values()) else "bnb"
    eos = model.generation_config.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        eos_ids |= {tokenizer.eos_token_id}
    limit = min(getattr(config, "max_position_embeddings", 2048), 8192)
    gemm = base_gemm.value
    in_registers = any(getattr(layer.base, CPP_MATMUL, False) for layer in layers.values())
    if base_gemm is BaseGemm.PLAIN and in_registers:
        # where our row-invariant products hand over to BLAS (by this CPU and its BLAS's kernels)
        gemm += f" (NF4 products in registers up to {cpu_matmul_rows()} rows"
        gemm += f", lm_head's up to {cpu_dense_rows()})" if getattr(lm_head, CPP_DENSE, False) else ")"
    log.info(
        "loaded %s (%s, %s on %s, %d LoRA targets, %s factors, base matmul %s, NF4 dequantized by %s, "
        "lm_head by %s, %d fused groups)",
        model_id, quantization, dt, dev, len(layers), lora_dtype, gemm, dequant,
        "cpp" if getattr(lm_head, CPP_DENSE, False) else "torch", len(groups),
    )  # fmt: skip
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        device=dev,
        dtype=dt,
        max_model_len=min(max_model_len or limit, limit),
        eos_token_ids=eos_ids,
        linear_shapes=shapes,
        lora_layers=layers,
        lora_context=context,
        lora_dtype=lora_dtype,
        saveable=saveable,
        dims=ModelDims(
            config.hidden_size,
            config.num_hidden_layers,
            config.num_key_value_heads,
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        ),
        dequant=dequant,
    )


def _check_tiles(
    model: Any,
    layers: dict[str, LoRALinear],
    groups: list[fused.FusedProjections],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Check each matmul shape of the batch-invariant mode before any step (tile_keeps_rows): on
    CUDA the check cannot run inside a graph capture."""
    shapes = {(m.out_features, m.in_features, m.base.bias is not None) for m in layers.values()}
    shapes |= {(g.out_features, g.in_features, g.bias is not None) for g in groups}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        shapes.add((head.out_features, head.in_features, head.bias is not None))
    for out_features, in_features, bias in sorted(shapes):
        tile_keeps_rows(torch.empty(out_features, in_features, dtype=dtype, device=device), bias)


def _check_nf4_kernel(linear: nn.Linear) -> None:
    """A 4-bit weight the nf4_triton kernel cannot decode would silently run `tiled`: refuse it."""
    state = getattr(linear.weight, "quant_state", None)
    if state is None:
        return
    from server.model.nf4_matmul import fits

    if not fits(linear.in_features, state.blocksize, state.quant_type):
        raise ModelNotFoundError(
            f"base matmul nf4_triton decodes NF4 in blocks of 64 along rows of a multiple of 64; "
            f"this weight is {state.quant_type} in blocks of {state.blocksize} over {linear.in_features}"
        )


def load_stock(path: Path, quantization: str = "nf4") -> Any:
    """The same checkpoint in stock transformers (no LoRA layers, no paged attention): what the
    trainer fine-tunes and what PEFT runs on as the oracle and the benchmark baseline. NF4 +
    double quant like the server, fp32 compute on CPU / bf16 on CUDA, same NF4 arithmetic."""
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": "cuda" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    disable_cpu_weight_packing(model)
    return model

"""Virtual tokens: prompt tuning, P-tuning and prefix tuning (PEFT's prompt-learning methods).

Semantics (PEFT 0.21 `PeftModelForCausalLM` with transformers' cache positions):
- each method puts `num_virtual_tokens` (V) positions before the prompt: the prompt's tokens sit at
  positions V, V+1, ... and every prompt and generated token attends to the V virtual ones;
- prompt tuning and P-tuning: the virtual positions' input embeddings are the adapter's rows
  (`prompt_embeddings`, [V, hidden]), cast to the embeddings' dtype, and run through the model like
  any token. P-tuning's prompt encoder (an MLP or LSTM over a table) is run by PEFT when it saves:
  the file holds its output, and PEFT, loading for inference, uses that tensor as is;
- prefix tuning: the virtual positions are not computed at all. `prompt_embeddings` ([V, layers * 2 *
  kv_dim]) is viewed as (V, layers, 2, kv_heads, head_dim): each layer's keys and values at the V
  positions, in the base's dtype, as transformers stores them (after the rotary embedding).

Here a request with such an adapter carries V placeholder tokens before its prompt (Sequence.
num_virtual): the scheduler, the KV blocks and the positions see V more tokens, and the model
runner swaps in the embeddings, or writes the prefix's keys and values into the cache, for those
rows. Decode steps are plain base steps: nothing is gathered per row once the prompt is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.errors import AdapterWeightsError
from server.lora.adapter import ConfigReport, ModelDims, VirtualTokens
from server.lora.config_fields import INFORMATIONAL, FieldReader, Refusal, parse_modules_to_save, short

METHODS = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
MAX_VIRTUAL_TOKENS = 1024
_SAVED = "the saved prompt_embeddings are already its output: PEFT runs the encoder when it saves"
_INIT = "initialization only: the trained embeddings come from adapter_model.safetensors"
_IGNORED: dict[str, str] = {
    **INFORMATIONAL,
    "prompt_tuning_init": _INIT,
    "prompt_tuning_init_text": _INIT,
    "tokenizer_name_or_path": _INIT,
    "tokenizer_kwargs": _INIT,
    "init_weights": _INIT,
    "encoder_reparameterization_type": _SAVED,
    "encoder_hidden_size": _SAVED,
    "encoder_num_layers": _SAVED,
    "encoder_dropout": _SAVED,
    "prefix_projection": _SAVED,
}
_HONOURED = (
    "peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save",
)  # fmt: skip
_KEY = "prompt_embeddings"


@dataclass(frozen=True, slots=True)
class PromptConfig:
    method: str  # prompt_tuning, p_tuning or prefix_tuning
    num_virtual_tokens: int
    token_dim: int
    num_attention_heads: int | None  # prefix tuning: the base's key/value heads
    num_layers: int | None
    modules_to_save: tuple[str, ...] = ()
    ensure_weight_tying: bool = False

    def targets(self, module_name: str) -> bool:
        return False  # no projection of the base is wrapped

    @property
    def prefix(self) -> bool:
        return self.method == "prefix_tuning"


def parse_prompt_config(data: dict[str, Any]) -> tuple[PromptConfig, ConfigReport]:
    report = ConfigReport()
    for key in data:
        if key in _IGNORED:
            report.ignored[key] = _IGNORED[key]
        elif key not in _HONOURED:
            report.ignored[key] = f"unknown key (not a field of PEFT's {data.get('peft_type')} config)"

    field = FieldReader(data, report)

    method = METHODS[str(data["peft_type"])]
    count = field("num_virtual_tokens", _positive, MAX_VIRTUAL_TOKENS)
    dim = field("token_dim", _positive, 2**20)
    field("num_transformer_submodules", _one)
    heads = field("num_attention_heads", _positive, 2**16) if method == "prefix_tuning" else None
    layers = field("num_layers", _positive, 2**16) if method == "prefix_tuning" else None
    to_save = field("modules_to_save", parse_modules_to_save)
    field.settle(_HONOURED)
    return PromptConfig(method, count, dim, heads, layers, to_save or ()), report


def _positive(value: object, limit: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise Refusal(f"must be an integer in [1, {limit}], got {short(value)}")
    return value


def _one(value: object) -> None:
    if value not in (None, 1):
        raise Refusal(f"is {short(value)}: only decoder-only models (1 transformer submodule) are served")


def payload_bound(config: PromptConfig, dims: ModelDims) -> int:
    """The most bytes a valid prompt_embeddings can take (F64)."""
    width = dims.num_layers * 2 * dims.kv_dim if config.prefix else dims.hidden_size
    return config.num_virtual_tokens * width * 8


def load_virtual(tensors: dict[str, torch.Tensor], config: PromptConfig, dims: ModelDims) -> VirtualTokens:
    """Check `prompt_embeddings` against the config and the base; the method's device-ready form."""
    extra = sorted(k for k in tensors if k != _KEY)
    if extra:
        raise AdapterWeightsError(
            f"tensor {extra[0]} is not part of a {config.method} adapter (it saves only {_KEY})",
            field=extra[0],
        )
    if _KEY not in tensors:
        raise AdapterWeightsError(f"a {config.method} adapter needs the tensor {_KEY}", field=_KEY)
    table = tensors[_KEY]
    n = config.num_virtual_tokens
    if config.prefix:
        want_dim, what = dims.kv_dim, f"key/value width {dims.kv_heads} heads x {dims.head_dim}"
        if (config.num_layers, config.num_attention_heads) != (dims.num_layers, dims.kv_heads):
            raise AdapterWeightsError(
                f"prefix for {config.num_layers} layers of {config.num_attention_heads} key/value heads; "
                f"the base has {dims.num_layers} layers of {dims.kv_heads}",
                field="num_layers",
            )
        shape = (n, dims.num_layers * 2 * want_dim)
    else:
        want_dim, what = dims.hidden_size, "hidden size"
        shape = (n, want_dim)
    if config.token_dim != want_dim:
        raise AdapterWeightsError(
            f"token_dim {config.token_dim} does not match the base's {what} ({want_dim})", field="token_dim"
        )
    if tuple(table.shape) != shape:
        raise AdapterWeightsError(
            f"tensor {_KEY} has shape {list(table.shape)}, expected {list(shape)} ({n} virtual tokens)",
            field=_KEY,
        )
    if not torch.isfinite(table).all():
        raise AdapterWeightsError(f"tensor {_KEY} contains NaN or infinite values", field=_KEY)
    if not config.prefix:
        return VirtualTokens(n, embeddings=table.contiguous())
    kv = table.view(n, dims.num_layers, 2, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3, 4)
    return VirtualTokens(n, prefix_kv=kv.contiguous())  # [layers, 2, V, kv_heads, head_dim]

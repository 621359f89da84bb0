"""Paged KV cache and the attention function that transformers' model classes call.

We register an attention implementation named "loraplex" with transformers' AttentionInterface,
so the stock Llama/Qwen2/Mistral modules compute projections, RoPE and MLPs, and hand us
post-RoPE queries/keys/values. The batch is packed: [1, T, ...] holds the new tokens of every
sequence in the step, decode tokens first. We write the new keys/values into the cache and
attend each sequence to its own cached context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine.attn_flex import FlexAttention, FlexStep

ATTN_IMPLEMENTATION = "loraplex"


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    start: int  # first row of the chunk in the packed batch
    length: int  # new tokens in the chunk
    kv_slots: torch.Tensor  # [L] cache slots of the whole context so far, chunk included
    mask: torch.Tensor  # [length, L] bool, causal with the chunk at the end of the context


@dataclass(frozen=True, slots=True)
class DecodeContexts:
    """The cache slots of every decode sequence's context, concatenated and cut into groups of at
    most GATHER_SLOTS slots: each layer gathers a group with one index_select per cache instead of
    one per sequence, then attends each sequence to its own slice (the same values, laid out as a
    gather of its own would lay them out). The cap bounds the gathered copy's memory."""

    # per group, in row order: its slots [n] and each of its rows' [start, end) within them
    groups: tuple[tuple[torch.Tensor, tuple[tuple[int, int], ...]], ...]


@dataclass(frozen=True, slots=True)
class FlexPlan:
    """What the flex backend needs for one step (see attn_flex)."""

    backend: FlexAttention
    step: FlexStep


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int
    # the torch backend: every decode sequence's cache slots of its context; prefill chunks
    decode_kv: DecodeContexts | None = None
    prefills: tuple[PrefillChunk, ...] = ()
    flex: FlexPlan | None = None
    # prefix tuning: (cache slots [n], the slot's prefix [layers, 2, V, KVH, hd], virtual positions
    # [n]) per chunk with virtual rows; those rows' keys and values are the prefix's, not computed
    prefix_kv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] = ()


class KVCache:
    """Flat paged storage: slot = block * block_size + offset, shared by all sequences."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # zeros, not empty: padded decode rows read slot 0, and 0 * NaN would poison the output
        self.k = torch.zeros(num_layers, num_slots, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_layers, num_slots, kv_heads, head_dim, dtype=dtype, device=device)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, hd], key/value: [1, KVH, T, hd] -> ([1, T, H, hd], None)."""
    meta: AttentionMetadata | None = kwargs.get("loraplex_attention")
    cache: KVCache | None = kwargs.get("loraplex_kv_cache")
    if meta is None or cache is None:
        # Outside the engine (e.g. a plain forward in a test) behave like SDPA.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache, v_cache = cache.k[layer], cache.v[layer]  # [N, KVH, hd]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    for slots, prefix, positions in meta.prefix_kv:
        k_cache.index_copy_(0, slots, prefix[layer, 0].index_select(0, positions).to(k_cache.dtype))
        v_cache.index_copy_(0, slots, prefix[layer, 1].index_select(0, positions).to(v_cache.dtype))

    q = query[0]  # [H, T, hd]
    if meta.flex is not None:
        plan = meta.flex
        out = plan.backend.run(q, k_cache, v_cache, plan.step, scaling)
        return out.unsqueeze(0), None
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # [T, H, hd]
    # One call per decode sequence: padding sequences to a common length changes the softmax's
    # reduction order, so a padded batch would not give exactly the tokens of a solo run.
    i = 0
    for slots, bounds in meta.decode_kv.groups if meta.decode_kv is not None else ():
        k_all = k_cache.index_select(0, slots)  # [n, KVH, hd]
        v_all = v_cache.index_select(0, slots)
        for lo, hi in bounds:
            qd = q[:, i : i + 1].unsqueeze(0)  # [1, H, 1, hd]
            kd = k_all[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, hd]
            vd = v_all[lo:hi].transpose(0, 1).unsqueeze(0)
            out[i] = F.scaled_dot_product_attention(qd, kd, vd, scale=scaling, enable_gqa=True)[0, :, 0]
            i += 1
    for chunk in meta.prefills:
        s, n = chunk.start, chunk.length
        qp = q[:, s : s + n].unsqueeze(0)  # [1, H, n, hd]
        kp = k_cache[chunk.kv_slots].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, hd]
        vp = v_cache[chunk.kv_slots].transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scaling, enable_gqa=True)
        out[s : s + n] = op[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> None:
    """Masks are built per sequence in AttentionMetadata, so no mask function is registered: for an
    implementation without one, transformers' mask builders return at once. (With one, each forward
    would also look for packed sequences in position_ids, and its `.all()` is a host sync per step.)"""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)

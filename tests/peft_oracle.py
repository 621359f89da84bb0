"""Greedy references: PEFT's own `generate`, and for its prompt-learning methods under PEFT before
0.22, rebuilt references that do not go through it.

From PEFT 0.22 `generate` finds transformers 5's `cache` argument, and it is the oracle for every
method (the rebuilt references are checked against it). With peft 0.21.2 and transformers 5.2x,
`generate` is no oracle for the prompt-learning methods: PEFT's prompt-learning
hooks put the cache under `past_key_values` while transformers keeps its own, so prompt and
P-tuning decode each step from the virtual tokens and the newest token alone (no cache reaches the
model), and prefix tuning drops the prefix (transformers warns "Both `past_key_values` and `cache`
are set") and returns the base model's tokens. PEFT's forward is right, so:
- prompt and P-tuning: what PEFT's forward does (its virtual-token embeddings from `get_prompt`
  before the prompt's word embeddings, then the base model), continued by a plain greedy loop of
  the base over the cache that first forward filled, as `generate` would have (forward_greedy, PEFT's
  own forward over the whole sequence at every step, is its check: the same tokens, at up to three
  times the cost);
- prefix tuning: PEFT's own prefix tensors (`get_prompt`) written into a transformers cache, and a
  plain greedy loop of the base over it, the prompt's positions starting after the prefix.
"""

from __future__ import annotations

from typing import Any

import torch


def _eos(peft_model: Any) -> set[int]:
    """The ids `generate` stops after (it keeps the one it stops on), as the engine does."""
    eos = peft_model.get_base_model().generation_config.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


def _device(peft_model: Any) -> torch.device:
    return next(peft_model.parameters()).device


def prompt_greedy(peft_model: Any, ids: list[int], new_tokens: int) -> list[int]:
    from transformers import DynamicCache

    stock = peft_model.get_base_model()
    dev = _device(peft_model)
    cache = DynamicCache()
    out: list[int] = []
    eos = _eos(peft_model)
    if new_tokens <= 0:
        return out
    with torch.no_grad():
        words = stock.get_input_embeddings()(torch.tensor([ids], device=dev))
        virtual = peft_model.get_prompt(batch_size=1).to(words.dtype)  # [1, V, hidden]
        embeds = torch.cat([virtual, words], dim=1)  # PEFT's forward: virtual tokens first
        logits = stock(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits
        out.append(int(logits[0, -1].argmax()))
        while len(out) < new_tokens and out[-1] not in eos:
            x = torch.tensor([[out[-1]]], device=dev)
            logits = stock(input_ids=x, past_key_values=cache, use_cache=True).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def forward_greedy(peft_model: Any, ids: list[int], new_tokens: int) -> list[int]:
    out: list[int] = []
    eos = _eos(peft_model)
    dev = _device(peft_model)
    with torch.no_grad():
        while len(out) < new_tokens and not (out and out[-1] in eos):
            logits = peft_model(input_ids=torch.tensor([ids + out], device=dev)).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def prefix_greedy(peft_model: Any, ids: list[int], new_tokens: int) -> list[int]:
    from transformers import DynamicCache

    with torch.no_grad():
        prefix = peft_model.get_prompt(batch_size=1)  # a Cache, or (k, v) per layer: [1, heads, V, head_dim]
    layers = getattr(prefix, "layers", None)
    pairs = [(lay.keys, lay.values) for lay in layers] if layers is not None else list(prefix)
    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    stock = peft_model.get_base_model()
    pos = int(pairs[0][0].shape[-2])  # the prefix's length: the prompt starts after it
    dev = _device(peft_model)
    x = torch.tensor([ids], device=dev)
    out: list[int] = []
    eos = _eos(peft_model)
    with torch.no_grad():
        while len(out) < new_tokens and not (out and out[-1] in eos):
            n = x.shape[1]
            logits = stock(
                input_ids=x,
                past_key_values=cache,
                attention_mask=torch.ones(1, pos + n, dtype=torch.long, device=dev),
                position_ids=torch.arange(pos, pos + n, device=dev).unsqueeze(0),
                use_cache=True,
            ).logits
            out.append(int(logits[0, -1].argmax()))
            pos += n
            x = torch.tensor([[out[-1]]], device=dev)
    return out


PROMPT_LEARNING = ("prompt_tuning", "p_tuning", "prefix_tuning")


def generate_is_an_oracle() -> bool:
    """Whether PEFT's `generate` decodes its prompt-learning methods right (from 0.22, see above)."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__) >= Version("0.22")


def reference_greedy(peft_model: Any, method: str, ids: list[int], new_tokens: int) -> list[int]:
    """The reference for any method: PEFT's generate, or the rebuilt one where generate is wrong."""
    if method in PROMPT_LEARNING and not generate_is_an_oracle():
        return rebuilt_greedy(peft_model, method, ids, new_tokens)
    return generate_greedy(peft_model, ids, new_tokens)


def rebuilt_greedy(peft_model: Any, method: str, ids: list[int], new_tokens: int) -> list[int]:
    """A prompt-learning method's reference without PEFT's generate (above)."""
    if method == "prefix_tuning":
        return prefix_greedy(peft_model, ids, new_tokens)
    return prompt_greedy(peft_model, ids, new_tokens)


def generate_greedy(peft_model: Any, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids], device=_device(peft_model))
    with torch.no_grad():
        out = peft_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False
        )
    return [int(t) for t in out[0, len(ids) :]]

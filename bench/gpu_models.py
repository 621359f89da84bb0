"""Seeded random checkpoints of real model shapes, made on the spot (nothing to download or copy):
SmolLM2-135M's and a Llama-3-8B-shaped stack of a few layers, each with a word-level tokenizer
whose vocabulary covers every id, so the engine can decode whatever the random model says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # for --smoke runs of the GPU check on a CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    ),
}


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)


def make_checkpoint(path: Path, shape: str, seed: int = 0, layers: int | None = None) -> Path:
    """A random Llama checkpoint of `shape` (bf16 safetensors) with its tokenizer, under `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(SHAPES[shape])
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    config = LlamaConfig(
        **kwargs, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model: Any = LlamaForCausalLM(config)
        model = model.to(dtype=torch.bfloat16)
    with torch.no_grad():  # larger than init so greedy tokens vary and the NF4 rounding matters
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(path, config.vocab_size)
    del model
    return path

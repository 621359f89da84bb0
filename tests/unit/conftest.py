"""Tiny random checkpoints (2 layers, hidden 64) of each supported architecture, with a
character-level tokenizer and a chat template, so the engine runs in seconds with no download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_char_tokenizer(path: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def tiny_config(arch: str) -> object:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    return MistralConfig(**common, sliding_window=None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from transformers import AutoModelForCausalLM

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model = AutoModelForCausalLM.from_config(tiny_config(arch))
            with torch.no_grad():  # larger weights than init so greedy tokens are not all alike
                for p in model.parameters():
                    p.mul_(8.0 if p.dim() > 1 else 1.0)
            model.save_pretrained(path)
            save_char_tokenizer(path)
            made[arch] = path
        return made[arch]

    return make


@pytest.fixture(scope="session")
def adapters(
    tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Three small PEFT adapters (ranks 2, 4, 8) over the tiny llama, for the store's tests."""
    from transformers import AutoModelForCausalLM

    from tests.peft_factory import make_adapter

    path = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("src")
    return {
        name: make_adapter(
            lambda: AutoModelForCausalLM.from_pretrained(path),
            root / name,
            seed=i,
            r=r,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
        )
        for i, (name, r) in enumerate({"a": 2, "b": 4, "c": 8}.items())
    }

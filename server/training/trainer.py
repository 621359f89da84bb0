"""QLoRA fine-tuning with a plain torch loop: the NF4 base frozen, LoRA factors in fp32, AdamW with
linear warmup/decay, gradient accumulation, loss only on the assistant's tokens.

The output directory is a PEFT adapter (adapter_config.json + adapter_model.safetensors) that the
server accepts as an upload, plus train_log.jsonl."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.model.loader import load_stock

log = logging.getLogger(__name__)

IGNORE = -100
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    data: Path
    out: Path
    model: Path
    quantization: str = "nf4"  # or "none" (tests)
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS
    steps: int = 200
    lr: float = 1e-3
    warmup: float = 0.06  # fraction of steps
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 160
    seed: int = 0
    log_every: int = 10
    threads: int | None = None
    save_dtype: str = "float32"  # or "bfloat16" / "float16": half the file, same adapter to a bf16 server


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    final_loss: float  # mean of the last log_every steps
    losses: list[float] = field(default_factory=list)


def prepare_for_kbit_training(model: Any) -> Any:
    """Freeze every base parameter; keep the non-quantized ones (norms, embeddings) in fp32."""
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return model


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    return peft_model


def encode(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one chat: every token before the final assistant turn is masked."""
    prompt = list(
        tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    full = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    n = 0  # shared prefix (equals len(prompt) for templates that render the prompt unchanged)
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    ids = [int(i) for i in full[:max_len]]
    labels = [IGNORE] * min(n, len(ids)) + ids[n:]
    return ids, labels


def read_examples(path: Path, tokenizer: Any, max_len: int) -> list[tuple[list[int], list[int]]]:
    examples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids, labels = encode(tokenizer, json.loads(line)["messages"], max_len)
            if any(label != IGNORE for label in labels):
                examples.append((ids, labels))
    if not examples:
        raise ValueError(f"{path} holds no example with assistant tokens inside max_len")
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):  # right padding
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def assistant_loss(peft_model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross entropy over the assistant tokens only; lm_head runs on those positions
    alone (the vocabulary projection is a large share of a small model's compute)."""
    base = peft_model.get_base_model()
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    # hidden: [B, T, H]; position t predicts token t+1
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = base.lm_head(hidden[:, :-1][keep])  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, math.ceil(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def train(cfg: TrainConfig) -> TrainResult:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = read_examples(cfg.data, tokenizer, cfg.max_len)
    model = add_lora(prepare_for_kbit_training(load_stock(cfg.model, cfg.quantization)), cfg)
    device = next(p for p in model.parameters() if p.requires_grad).device
    params = [p for p in model.parameters() if p.requires_grad]
    log.info(
        "training %d LoRA parameters on %d examples (%s)",
        sum(p.numel() for p in params),
        len(examples),
        device,
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model.train()
    cfg.out.mkdir(parents=True, exist_ok=True)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    with (cfg.out / "train_log.jsonl").open("w") as log_file, tqdm(total=cfg.steps, desc="train") as bar:
        for step in range(cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            total = 0.0
            for _ in range(cfg.grad_accum):
                if len(order) < cfg.batch_size:  # reshuffle each epoch (seeded)
                    more = list(range(len(examples)))
                    random.shuffle(more)
                    order += more
                batch = collate([examples[i] for i in order[: cfg.batch_size]], pad_id)
                del order[: cfg.batch_size]
                loss = assistant_loss(model, {k: v.to(device) for k, v in batch.items()}) / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                recent = losses[-cfg.log_every :]
                entry = {
                    "step": step + 1,
                    "loss": round(sum(recent) / len(recent), 4),
                    "lr": lr_at(step, cfg),
                    "seconds": round(time.perf_counter() - started, 1),
                }
                log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                bar.write(json.dumps(entry))
    seconds = time.perf_counter() - started
    for p in params:  # training is over: save_pretrained writes the factors in the dtype they have
        p.data = p.data.to(SAVE_DTYPES[cfg.save_dtype])
    model.save_pretrained(str(cfg.out), safe_serialization=True)
    _keep_adapter_files(cfg.out, cfg.model.resolve().name)
    tail = losses[-cfg.log_every :]
    result = TrainResult(cfg.steps, round(seconds, 1), losses[0], sum(tail) / len(tail), losses)
    summary = {k: v for k, v in asdict(result).items() if k != "losses"}
    (cfg.out / "train_summary.json").write_text(
        json.dumps({**summary, "config": {k: str(v) for k, v in asdict(cfg).items()}}, indent=1) + "\n"
    )
    return result


def _keep_adapter_files(out: Path, model_id: str) -> None:
    """save_pretrained also writes a README.md model card; an upload needs only the two adapter files.
    The config names the base by its id, not by a path on this machine."""
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = model_id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = out / "README.md"
    if card.is_file() and "peft" in card.read_text(errors="replace").lower()[:2000]:
        card.unlink()

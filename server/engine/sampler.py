"""Next-token choice per row, each row with its own parameters and its own generator, on the device.

Greedy rows are one argmax over the whole batch. Sampled rows are filtered (temperature, top-k,
top-p) on the device and drawn with the exponential race (argmax of p / Exp(1) noise, what vLLM
does): the noise comes from the request's own generator, so a seeded request draws the same tokens
whatever shares its step, and nothing vocab-sized crosses to the host. The step's only sync is
the final `.tolist()`.
"""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence


def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
    """The request's generator on `device`: its own on CPU; on CUDA one seeded from it, made once."""
    if device.type == "cpu":
        return seq.generator
    gen = seq.device_generator
    if gen is None or gen.device != device:
        gen = torch.Generator(device=device)
        gen.manual_seed(seq.generator.initial_seed())
        seq.device_generator = gen
    return gen


def filtered_probs(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """row: [V] fp32 logits -> [V] probabilities after temperature, top-k and top-p."""
    p = seq.params
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [N, V] (one row per sequence that samples this step) -> N token ids."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [N], on the device
    for i, seq in enumerate(seqs):
        if seq.params.greedy:
            continue
        probs = filtered_probs(logits[i], seq)
        noise = torch.empty_like(probs).exponential_(generator=_generator(seq, probs.device))
        tokens[i] = (probs / noise).argmax()
    return [int(t) for t in tokens.tolist()]

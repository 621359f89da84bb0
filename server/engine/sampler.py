"""Next-token choice per row, each row with its own parameters and its own generator."""

from __future__ import annotations

import torch

from server.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [N, V] (one row per sequence that samples this step) -> N token ids.

    Greedy rows are one vectorized argmax. Sampled rows draw from the request's own generator, so a
    seeded request gets the same tokens whatever else shares the step.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = logits[i] / p.temperature  # [V]
        if p.top_k and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=seq.generator).item())
    return [int(t) for t in tokens]

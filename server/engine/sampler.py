"""Next-token choice per row, each row with its own parameters and its own generator, on the device.

Semantics, per row, in this order (vLLM's):
1. logit processors, only on rows that ask for them: `logit_bias`; EOS and stop tokens held back
   before `min_tokens`; `repetition_penalty` (transformers' formula, over prompt and output);
   `presence_penalty` / `frequency_penalty` (OpenAI's formula, over generated tokens); the
   structured-output grammar mask. A neutral row is not touched, so it keeps exactly the tokens
   it had before any of this existed.
2. Greedy rows: one argmax over the whole batch. Sampled rows: temperature, min-p, top-k, top-p,
   then the exponential race (argmax of p / Exp(1) noise, what vLLM does) with noise from the
   request's own generator, so a seeded request draws the same tokens whatever shares its step.
3. Logprobs, for rows that ask: of the distribution the token was drawn from (after step 1,
   temperature and the filters; log-softmax of the processed logits for greedy rows), or of the
   model's own distribution with `raw_logprobs`.

Nothing vocab-sized crosses to the host; the step's only syncs are the final `.tolist()` calls
(token lists go to the device staged: server/transfer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.engine import logprobs as lp
from server.engine.sequence import Sequence
from server.transfer import indices, to_device


@dataclass(frozen=True, slots=True)
class Sampled:
    token: int
    logprob: lp.TokenLogprob | None = None


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


def process_(row: torch.Tensor, seq: Sequence) -> None:
    """Applies the request's logit processors to its row ([V] fp32) in place. Token lists reach
    the device staged (server/transfer.py) and are turned into vocab-wide masks and counts, never
    `unique`: both would make the host wait for the GPU in the middle of the step."""
    p, dev, vocab = seq.params, row.device, row.shape[0]
    if p.logit_bias:
        ids = indices([t for t, _ in p.logit_bias], dev)
        row.index_add_(0, ids, to_device(np.array([b for _, b in p.logit_bias], dtype=np.float32), dev))
    # a finished grammar allows only EOS: holding it back then would leave nothing to choose
    if len(seq.output_token_ids) < p.min_tokens and not (seq.constraint is not None and seq.constraint.done):
        held = [t for t in (*seq.eos_token_ids, *p.stop_token_ids) if t < vocab]
        row[indices(held, dev)] = float("-inf")
    if p.repetition_penalty != 1.0:
        seen = _counts(seq.prompt_token_ids + seq.output_token_ids, vocab, dev) > 0
        penalised = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
        row.copy_(torch.where(seen, penalised, row))
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        counts = _counts(seq.output_token_ids, vocab, dev)
        row.copy_(torch.where(counts > 0, row - (counts * p.frequency_penalty + p.presence_penalty), row))


def _counts(tokens: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """[V] fp32: how often each token id occurs in `tokens` (ids past the row are not counted)."""
    ids = np.array(tokens, dtype=np.int64)
    ids = ids[ids < vocab]
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    return counts.index_add_(0, to_device(ids, device), torch.ones(len(ids), device=device))


def filtered_probs(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """row: [V] fp32 logits -> [V] probabilities after temperature, min-p, top-k and top-p."""
    p = seq.params
    row = row / p.temperature
    if p.top_k and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[Sampled]:
    """logits: [N, V] (one row per sequence that samples this step) -> N choices."""
    logits = logits.float()
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw = [i for i in want if seqs[i].params.raw_logprobs]
    # before anything changes the rows; rows picked by staged indices (a list index is a host copy)
    raw_lp = torch.log_softmax(logits.index_select(0, indices(raw, logits.device)), dim=-1) if raw else None
    constrained = [(i, s.constraint) for i, s in enumerate(seqs) if s.constraint is not None]
    for i, seq in enumerate(seqs):
        if seq.params.penalised:
            process_(logits[i], seq)
    if constrained:
        from server.engine.grammar import apply_masks

        apply_masks(logits, constrained)
    tokens = logits.argmax(dim=-1)  # [N], on the device
    chosen_lp: dict[int, torch.Tensor] = {}
    for i, seq in enumerate(seqs):
        if seq.params.greedy:
            continue
        probs = filtered_probs(logits[i], seq)
        noise = torch.empty_like(probs).exponential_(generator=_generator(seq, probs.device))
        tokens[i] = (probs / noise).argmax()
        if i in want and i not in raw:
            chosen_lp[i] = probs.log()
    if not want:
        return [Sampled(int(t)) for t in tokens.tolist()]
    rows = []
    for i in want:
        if raw_lp is not None and i in raw:
            rows.append(raw_lp[raw.index(i)])
        else:
            rows.append(chosen_lp[i] if i in chosen_lp else torch.log_softmax(logits[i], dim=-1))
    chosen = tokens.index_select(0, indices(want, tokens.device))
    got = lp.gather(torch.stack(rows), chosen, [seqs[i].params.logprobs or 0 for i in want])
    by_row = dict(zip(want, got, strict=True))
    return [Sampled(int(t), by_row.get(i)) for i, t in enumerate(tokens.tolist())]

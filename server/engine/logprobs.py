"""Log-probabilities of chosen tokens and their top alternatives, for the sampled token of a step
and for every prompt position (`echo`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the `k` most likely tokens
    (id, log-probability), most likely first. A token the sampling filters removed has -inf."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def gather(logprobs: torch.Tensor, tokens: torch.Tensor, k: list[int]) -> list[TokenLogprob]:
    """logprobs: [N, V] log-softmax rows; tokens: [N] the chosen token of each row; k: per row,
    how many alternatives -> N TokenLogprobs. One host copy for the whole batch."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # [N]
    kmax = max(k, default=0)
    if kmax:
        top_v, top_i = logprobs.topk(kmax, dim=-1)  # [N, kmax], sorted
        top_rows = list(zip(top_i.tolist(), top_v.tolist(), strict=True))
    else:
        top_rows = [([], [])] * len(k)
    out = []
    for tok, lp, n, (ids, vals) in zip(tokens.tolist(), chosen.tolist(), k, top_rows, strict=True):
        out.append(TokenLogprob(int(tok), float(lp), tuple(zip(ids[:n], vals[:n], strict=True))))
    return out


def prompt_logprobs(logits: torch.Tensor, next_tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits: [L, V] raw logits at L consecutive prompt positions; next_tokens: [L] the prompt
    token that follows each -> what position i says about token i + 1 (the model's own
    distribution, before any sampling setting: what lm-eval's loglikelihood reads)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return gather(logprobs, next_tokens, [k] * logits.shape[0])

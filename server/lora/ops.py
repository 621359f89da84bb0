"""The grouped low-rank term: a plain-torch reference and the fast paths the layer uses.

Slot buffers (one set per target projection, slot 0 all zeros = "no adapter"):
    A: [S, R, in]    rows [:r] of slot s hold the adapter's lora_A ([r, in]); the rest are zero
    B: [S, R, out]   rows [:r] hold lora_B transposed ([r, out]); the rest are zero
    scale: [S]       lora_alpha / r (or / sqrt(r) with rsLoRA), per projection
R is max_lora_rank; adapters of lower rank are zero-padded, so padding adds exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# CPU GEMM kernels pick a different path below 16 rows, which changes the last bits of each row.
# Padding every product to at least 16 rows makes a token's result independent of how many
# tokens share the step: the batch invariance every test relies on.
MIN_ROWS = 16


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [n, k] -> [max(n, MIN_ROWS), k], extra rows zero."""
    n = x.shape[0]
    if n >= MIN_ROWS:
        return x
    return torch.cat([x, x.new_zeros(MIN_ROWS - n, x.shape[1])])


@dataclass(frozen=True, slots=True)
class LoRABatch:
    """Adapter routing for one forward pass, shared by every LoRA layer.

    Tokens are laid out decode first: rows [0, num_decode) hold one token per decoding sequence,
    then come the prefill chunks. Decode rows go through one dense masked product over the slot
    range [slot_lo, slot_hi] of the adapters they use; each prefill chunk with an adapter is a
    segment computed with its own slot.
    """

    num_decode: int
    decode_slots: torch.Tensor  # [D] int64, slot of each decode token (0 = base)
    # [D, (slot_hi - slot_lo + 1) * R] bool, True where a column does NOT belong to the token's slot.
    # Built once per step so that each of the ~200 layers pays one masked_fill, not a compare + invert.
    decode_drop: torch.Tensor
    slot_lo: int
    slot_hi: int
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot) of prefill chunks, slot != 0
    active: frozenset[int]  # non-zero slots used anywhere in the step
    decode_active: frozenset[int]  # non-zero slots used by decode rows

    @staticmethod
    def build(
        decode_slots: list[int], segments: list[tuple[int, int, int]], max_rank: int, device: torch.device
    ) -> LoRABatch:
        decode_active = frozenset(s for s in decode_slots if s)
        # Slot 0 (no adapter) is all zeros: leaving it out of the range saves reading its columns.
        lo, hi = (min(decode_active), max(decode_active)) if decode_active else (1, 0)
        slots = torch.tensor(decode_slots, dtype=torch.int64)
        cols = lo + torch.arange((hi - lo + 1) * max_rank) // max_rank  # slot owning each column
        drop = cols.unsqueeze(0) != slots.unsqueeze(1)
        active = decode_active | frozenset(s for _, _, s in segments)
        return LoRABatch(
            num_decode=len(decode_slots),
            decode_slots=slots.to(device),
            decode_drop=drop.to(device),
            slot_lo=lo,
            slot_hi=hi,
            segments=tuple(segments),
            active=active,
            decode_active=decode_active,
        )


def lora_reference(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Semantics: for each token t with slot s = slots[t]:
        out[t] = scale[s] * (x[t] @ A[s].T) @ B[s]
    x: [T, in], slots: [T] -> out: [T, out]. One token at a time, no batching tricks: the oracle
    for the fast paths."""
    out = torch.zeros(x.shape[0], B.shape[2], dtype=x.dtype, device=x.device)
    for t, s in enumerate(slots.tolist()):
        out[t] = ((x[t : t + 1] @ A[s].T) @ B[s])[0] * scale[s]
    return out


def lora_decode(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, batch: LoRABatch
) -> torch.Tensor:
    """Semantics: lora_reference on the decode rows, as two dense products.

    Every token is multiplied by all slots in [slot_lo, slot_hi] at once and the columns of other
    slots are zeroed before the expand, so the cost is one GEMM pair per projection however many
    adapters the batch mixes (a per-adapter loop costs a dispatch per adapter per layer, which
    dominates on CPU). Zeroed columns add exact zeros, so a token's result does not depend on
    which other adapters share the step.
    x: [D, in] -> [D, out]
    """
    d, lo, hi = x.shape[0], batch.slot_lo, batch.slot_hi
    a = A[lo : hi + 1].flatten(0, 1)  # [(hi-lo+1)*R, in], a view
    b = B[lo : hi + 1].flatten(0, 1)  # [(hi-lo+1)*R, out], a view
    t = pad_rows(x) @ a.T  # [D', in] -> [D', (hi-lo+1)*R]
    t[:d].masked_fill_(batch.decode_drop, 0.0)  # padding rows of t are 0 already (zero rows of x)
    y = (t @ b)[:d]  # -> [D, out]
    return y.mul_(scale[batch.decode_slots].unsqueeze(1))


def lora_segment(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slot: int, rank: int
) -> torch.Tensor:
    """Semantics: lora_reference for a run of tokens that all use `slot`, at the adapter's true rank.
    x: [n, in] -> [n, out]"""
    n = x.shape[0]
    t = pad_rows(x) @ A[slot, :rank].T  # [n', in] -> [n', r]
    return (t @ B[slot, :rank])[:n] * scale[slot]

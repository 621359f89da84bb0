"""SGMV routing: the step's rows sorted by adapter slot and cut into segments of at most SEGMENT rows,
each with one slot. Built once per step on the host (numpy), shared by every LoRA layer.

A segment is the unit the Triton kernels tile by, so a row's arithmetic (a 16-row tile of fixed
shape, block sizes from K, N and R only) is the same whoever else is in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from server.transfer import to_device

SEGMENT = 16


@dataclass(frozen=True, slots=True)
class Segments:
    rows: torch.Tensor  # [T'] int32: rows with an adapter, sorted by slot (stable)
    start: torch.Tensor  # [G] int32: first position of each segment in `rows`
    length: torch.Tensor  # [G] int32: rows in the segment, 1..SEGMENT
    slot: torch.Tensor  # [G] int32: the segment's slot; -1 marks a padding segment (exits at once)
    num_rows: int  # T'

    @property
    def num_segments(self) -> int:
        return int(self.slot.shape[0])


def segment_arrays(
    row_slots: np.ndarray, capacity: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The host side of build_segments: (rows, start, length, slot) as int32 arrays."""
    keep = np.flatnonzero(row_slots)
    order = keep[np.argsort(row_slots[keep], kind="stable")]
    slots = row_slots[order]
    starts: list[int] = []
    lengths: list[int] = []
    seg_slots: list[int] = []
    bounds = np.flatnonzero(np.diff(slots)) + 1 if len(slots) else np.empty(0, dtype=np.int64)
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(slots)], strict=True):
        for s in range(int(lo), int(hi), SEGMENT):
            starts.append(s)
            lengths.append(min(SEGMENT, int(hi) - s))
            seg_slots.append(int(slots[lo]))
    if capacity is not None:
        if len(seg_slots) > capacity:
            raise ValueError(f"{len(seg_slots)} segments exceed the capacity {capacity}")
        pad = capacity - len(seg_slots)
        starts += [0] * pad
        lengths += [0] * pad
        seg_slots += [-1] * pad

    def int32(values: list[int] | np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.int32)

    return int32(order), int32(starts), int32(lengths), int32(seg_slots)


def build_segments(row_slots: np.ndarray, device: torch.device, capacity: int | None = None) -> Segments:
    """row_slots: [T] slot of every row of the step (0 = no adapter). `capacity` pads the segment
    arrays to a fixed length with slot -1 (for a captured graph, whose grid cannot change)."""
    rows, start, length, slot = segment_arrays(row_slots, capacity)
    return Segments(
        rows=to_device(rows, device),
        start=to_device(start, device),
        length=to_device(length, device),
        slot=to_device(slot, device),
        num_rows=len(rows),
    )

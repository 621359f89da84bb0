"""Host arrays to the device without a host sync: a copy from pageable memory (torch.tensor(...,
device=cuda), `.to(cuda)` of a plain CPU tensor) makes torch wait for the stream to drain, so the
host stops queueing the step's kernels; a page-locked staging copy lets the transfer queue like a
kernel. On CPU both are plain views or copies."""

from __future__ import annotations

import numpy as np
import torch


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a device tensor: a view on CPU, one non-blocking copy from pinned memory on
    CUDA (the caching host allocator keeps the staging block until the copy has run)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def indices(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 positions or token ids (what indexing ops take) as a device tensor, as to_device."""
    return to_device(np.array(values, dtype=np.int64), device)


def copy_into(dst: torch.Tensor, a: np.ndarray) -> None:
    """dst.copy_(a) for a persistent device buffer, queued behind the stream's earlier work."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dst.device.type == "cpu":
        dst.copy_(t)
    else:
        dst.copy_(t.pin_memory(), non_blocking=True)

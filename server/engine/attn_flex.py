"""FlexAttention over the paged KV cache (`--attention-backend flex`).

Queries attend the whole shared pool ([1, KVH, slots, hd], a view of the cache, no gather) through
block tables: `BlockMask.from_kv_blocks` lists each query's blocks, and the mask_mod keeps a key
when its block belongs to the query's sequence and its position in that sequence is not after the
query's (causal), so one formula serves decode rows and prefill chunks. The per-step tables live
in persistent tensors updated in place, so the mask functions never change identity.

Compiled (the CUDA default): every decode row in one call, q [D, H, 1, hd], and one call per
prefill chunk, q [1, H, n, hd]; the kernel visits only the listed blocks. Eager (CPU): flex's
reference path scores the whole pool, and folds a batch of decode rows into one matmul whose row
count would change each row's rounding, so every decode row is its own call, like a chunk of one:
a row's arithmetic then has the same shapes alone or in a batch.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from server.errors import BackendError
from server.transfer import copy_into, to_device

Q_BLOCK = 16
# Inductor's Triton flex kernel tiles queries by BLOCK_M and keys by BLOCK_N, and both must divide
# the mask's blocks (Q_BLOCK, the KV block size); its default tiles on a GPU are 32 to 128 wide, so
# the first compiled call would refuse our 16 x 16 blocks. tl.dot needs 16 at least.
# FORCE_USE_FLEX_ATTENTION keeps Inductor off its decoding kernel, which splits each query's keys
# into num_SMs // (batch * kv_heads) * 2 parts and so sums them in an order set by the batch size
# (and packs a KV head's query heads into one BLOCK_M tile, too small past 16). The main kernel
# walks a query's key blocks in one program: a row's result is the same bits in any batch. vLLM's
# flex backend forces it too.
TRITON_TILES: dict[str, int | bool] = {"BLOCK_M": Q_BLOCK, "BLOCK_N": 16, "FORCE_USE_FLEX_ATTENTION": True}


def fits_block_size(block_size: int) -> bool:
    """The compiled (CUDA) kernel's key tile must divide a KV block."""
    return block_size % TRITON_TILES["BLOCK_N"] == 0


def check_block_size(block_size: int) -> None:
    if not fits_block_size(block_size):
        raise BackendError(
            f"--attention-backend flex on CUDA needs --block-size a multiple of "
            f"{TRITON_TILES['BLOCK_N']}; got {block_size}"
        )


@dataclass(frozen=True, slots=True)
class _Flat:
    """A step's block tables as flat arrays: each listed block, its table's row and its index in
    that table (a few numpy calls per step, not several per sequence)."""

    blocks: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    lens: np.ndarray

    @staticmethod
    def of(tables: list[list[int]]) -> _Flat:
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        total = int(lens.sum())
        blocks = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=total)
        rows = np.repeat(np.arange(len(tables), dtype=np.int32), lens)
        cols = (np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)).astype(np.int32)
        return _Flat(blocks, rows, cols, lens)


@dataclass(frozen=True, slots=True)
class FlexStep:
    """One step's block masks: the decode rows' (compiled mode) and one per chunk."""

    num_decode: int  # rows [0, num_decode) attend through `decode`
    decode: BlockMask | None
    # (first row, rows, mask, activate): `activate` loads the chunk's sequence id and position
    chunks: tuple[tuple[int, int, BlockMask, Callable[[], object]], ...]


class FlexAttention:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int, device: torch.device, compiled: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        # block -> (its sequence in this step, its index in that sequence's table); -1 = no one's
        self.owner = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
        self.logical = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        # per decode row b: (sequence id, position of its query)
        self.dec_seq = torch.zeros(max_rows, dtype=torch.int32, device=device)
        self.dec_pos = torch.zeros(max_rows, dtype=torch.int32, device=device)
        # the chunk being computed: (sequence id, position of its first query)
        self.chunk = torch.zeros(2, dtype=torch.int32, device=device)
        self.compiled = compiled
        self.attend: Any = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
        # the Triton kernel's tiles; the CPU paths (eager, or Inductor's C++ template) take none
        self.tiles: dict[str, int | bool] | None = None
        if compiled and device.type == "cuda":
            check_block_size(block_size)
            self.tiles = dict(TRITON_TILES)
        self.decode_mask = self._mask_mod(self.dec_seq, self.dec_pos)
        # a chunk call has one query batch (b = 0): one-element views of `chunk`
        self.chunk_mask = self._mask_mod(self.chunk[0:1], self.chunk[1:2])

    def _mask_mod(self, seq_of: torch.Tensor, pos_of: torch.Tensor) -> Any:
        """Keep key kv_idx for query (b, q_idx) when its block belongs to sequence seq_of[b] and its
        position there is not after the query's, pos_of[b] + q_idx."""
        bs, owner, logical = self.block_size, self.owner, self.logical

        def mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            blk = kv_idx // bs
            return (owner[blk] == seq_of[b]) & (logical[blk] * bs + kv_idx % bs <= pos_of[b] + q_idx)

        return mask

    def _block_arrays(
        self, flat: _Flat, q_blocks: int, width: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """kv_num_blocks [rows, 1, q_blocks] and kv_indices [rows, 1, q_blocks, width] (width:
        num_blocks unless given; at least the longest table)."""
        rows = len(flat.lens)
        num = np.repeat(flat.lens.astype(np.int32)[:, None, None], q_blocks, axis=2)
        idx = np.zeros((rows, self.num_blocks if width is None else width), dtype=np.int32)
        idx[flat.rows, flat.cols] = flat.blocks
        idx4 = idx[:, None, None, :]  # a view: a decode row has one query block
        return num, idx4 if q_blocks == 1 else np.repeat(idx4, q_blocks, axis=2)

    def _mask(self, tables: list[list[int]], q_len: int, mask_mod: Any) -> BlockMask:
        num, idx = self._block_arrays(_Flat.of(tables), -(-q_len // Q_BLOCK))
        return BlockMask.from_kv_blocks(
            to_device(num, self.device),
            to_device(idx, self.device),
            BLOCK_SIZE=(Q_BLOCK, self.block_size),
            mask_mod=mask_mod,
            seq_lengths=(q_len, self.num_blocks * self.block_size),
            compute_q_blocks=False,
        )

    def _own(self, flat: _Flat, decode: list[tuple[list[int], int]]) -> None:
        """Record which sequence (its index in the step's tables) owns each block and the block's
        index in that sequence; and the decode rows' sequence ids and query positions."""
        owner = np.full(self.num_blocks, -1, dtype=np.int32)
        logical = np.zeros(self.num_blocks, dtype=np.int32)
        owner[flat.blocks] = flat.rows  # a block is in one table at most (no sharing)
        logical[flat.blocks] = flat.cols
        copy_into(self.owner, owner)
        copy_into(self.logical, logical)
        if decode:
            d = len(decode)
            copy_into(self.dec_seq[:d], np.arange(d, dtype=np.int32))
            copy_into(self.dec_pos[:d], np.fromiter((p for _, p in decode), dtype=np.int32, count=d))

    def prepare(
        self,
        decode: list[tuple[list[int], int]],
        chunks: list[tuple[list[int], int, int, int]],
    ) -> FlexStep:
        """decode: (block table, query position) per decode row (rows 0..D-1); chunks: (block table,
        first query position, length, first row) per prefill chunk. Tables hold the blocks of the
        context so far."""
        if not self.compiled:
            chunks = [(t, p, 1, row) for row, (t, p) in enumerate(decode)] + chunks
            decode = []
        self._own(_Flat.of([t for t, _ in decode] + [t for t, _, _, _ in chunks]), decode)
        dec_mask = self._mask([t for t, _ in decode], 1, self.decode_mask) if decode else None
        made: list[tuple[int, int, BlockMask, Callable[[], object]]] = []
        # every chunk's (sequence id, first position) on the device at once: each layer then
        # activates a chunk by a device-side copy, not a host one
        infos = to_device(np.array([[len(decode) + c, pos] for c, (_, pos, _, _) in enumerate(chunks)],
                                   dtype=np.int32).reshape(-1, 2), self.device)  # fmt: skip
        for c, (table, _, n, row) in enumerate(chunks):
            mask = self._mask([table], n, self.chunk_mask)
            made.append((row, n, mask, functools.partial(self.chunk.copy_, infos[c])))
        return FlexStep(len(decode), dec_mask, tuple(made))

    def static_decode(self, rows: int) -> FlexStep:
        """A decode step of `rows` rows whose block tables live in tensors refilled in place
        (fill_decode), so a captured CUDA graph sees each step's tables."""
        mask = self._mask([[] for _ in range(rows)], 1, self.decode_mask)
        return FlexStep(rows, mask, ())

    def fill_decode(self, step: FlexStep, decode: list[tuple[list[int], int]]) -> None:
        """Refill a static_decode step: (block table, query position) per row; [] for padding."""
        assert step.decode is not None and len(decode) == step.num_decode
        flat = _Flat.of([t for t, _ in decode])
        self._own(flat, decode)
        # Only the columns the longest table fills are written: the kernels read a row's first
        # kv_num_blocks entries and nothing past them, so what earlier steps left further right is
        # never read. The whole [rows, num_blocks] index rewritten each step was 34 MB at batch 256
        # with a 512k-token cache, most of the host's step (bench/host_step.py).
        width = max(1, int(flat.lens.max(initial=0)))
        num, idx = self._block_arrays(flat, 1, width)
        copy_into(step.decode.kv_num_blocks, num)
        copy_into(step.decode.kv_indices[..., :width], idx)

    def run(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, step: FlexStep, scale: float | None
    ) -> torch.Tensor:
        """q: [H, T, hd] (packed), pools: [slots, KVH, hd] -> [T, H, hd]"""
        key = k_pool.permute(1, 0, 2).unsqueeze(0)  # [1, KVH, slots, hd], a view
        value = v_pool.permute(1, 0, 2).unsqueeze(0)
        out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
        if step.decode is not None:
            d = step.num_decode
            qd = q[:, :d].transpose(0, 1).unsqueeze(2)  # [D, H, 1, hd]
            od = self.attend(
                qd,
                key,
                value,
                block_mask=step.decode,
                scale=scale,
                enable_gqa=True,
                kernel_options=self.tiles,
            )
            out[:d] = od[:, :, 0]
        for start, n, mask, activate in step.chunks:
            activate()
            qp = q[:, start : start + n].unsqueeze(0)  # [1, H, n, hd]
            op = self.attend(
                qp, key, value, block_mask=mask, scale=scale, enable_gqa=True, kernel_options=self.tiles
            )
            out[start : start + n] = op[0].transpose(0, 1)
        return out

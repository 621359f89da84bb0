"""Turns a scheduled step into one forward pass: packed token ids, positions, KV slots, adapter routing."""

from __future__ import annotations

import torch

from server.config import EngineConfig
from server.engine.attention import AttentionMetadata, KVCache, PrefillChunk
from server.engine.block_manager import BlockManager
from server.engine.scheduler import SchedulerOutput
from server.engine.sequence import Sequence
from server.lora.ops import LoRABatch
from server.model.base_gemm import base_linear
from server.model.loader import BaseModel


class ModelRunner:
    def __init__(self, base: BaseModel, config: EngineConfig, blocks: BlockManager) -> None:
        self.base = base
        self.config = config
        self.blocks = blocks
        cfg = base.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = KVCache(
            cfg.num_hidden_layers,
            config.num_kv_blocks * config.block_size,
            cfg.num_key_value_heads,
            head_dim,
            base.dtype,
            base.device,
        )

    @torch.inference_mode()
    def run(self, step: SchedulerOutput, slot_of: dict[str, int]) -> tuple[list[Sequence], torch.Tensor]:
        """Forward the step. Returns the sequences that sample a token now (their whole context is
        computed) and their next-token logits [N, V]."""
        dev = self.base.device
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        # decode rows first: one token each
        dec_ctx: list[list[int]] = []
        dec_slots: list[int] = []
        for seq in step.decode:
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slot_mapping += self.blocks.slots(seq, pos, pos + 1)
            dec_ctx.append(self.blocks.slots(seq, 0, pos + 1))
            dec_slots.append(slot_of.get(seq.adapter_key or "", 0))
        chunks: list[PrefillChunk] = []
        segments: list[tuple[int, int, int]] = []
        for seq, n in step.prefill:
            start, pos = len(ids), seq.num_computed_tokens
            ids += seq.token_ids[pos : pos + n]
            positions += range(pos, pos + n)
            slot_mapping += self.blocks.slots(seq, pos, pos + n)
            total = pos + n
            kv_slots = torch.tensor(self.blocks.slots(seq, 0, total), device=dev)
            # query i (absolute position pos + i) sees keys 0..pos + i
            mask = torch.arange(total).unsqueeze(0) <= (torch.arange(n) + pos).unsqueeze(1)
            chunks.append(PrefillChunk(start, n, kv_slots, mask.to(dev)))
            slot = slot_of.get(seq.adapter_key or "", 0)
            if slot:
                segments.append((start, start + n, slot))

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, device=dev),
            decode_kv=tuple(torch.tensor(ctx, device=dev) for ctx in dec_ctx),
            prefills=tuple(chunks),
        )
        self.base.lora_context.batch = LoRABatch.build(dec_slots, segments, dev)
        try:
            hidden = self.base.model.model(
                input_ids=torch.tensor([ids], device=dev),
                position_ids=torch.tensor([positions], device=dev),
                use_cache=False,
                loraplex_attention=meta,
                loraplex_kv_cache=self.kv,
            ).last_hidden_state[0]  # [T, hidden]
        finally:
            self.base.lora_context.batch = None

        rows: list[int] = []
        sampling: list[Sequence] = []
        for i, seq in enumerate(step.decode):
            rows.append(i)
            sampling.append(seq)
        for (seq, n), chunk in zip(step.prefill, chunks, strict=True):
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(chunk.start + n - 1)
                sampling.append(seq)
        if not rows:
            return sampling, hidden[:0]
        picked = hidden.index_select(0, torch.tensor(rows, device=dev))  # [N, hidden]
        return sampling, base_linear(picked, self.base.model.lm_head, self.base.lora_context.base_gemm)

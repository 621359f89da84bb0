"""Turns a scheduled step into one forward pass: packed token ids, positions, KV slots, adapter routing."""

from __future__ import annotations

from dataclasses import replace

import torch

from server.engine.attention import AttentionMetadata, FlexPlan, KVCache, PrefillChunk
from server.engine.attn_flex import FlexAttention
from server.engine.config import EngineConfig
from server.engine.graphs import DecodeGraphs, PaddedDecode
from server.engine.logprobs import prompt_logprobs
from server.engine.scheduler import SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.step_inputs import StepInputBuilder, StepInputs, decode_contexts
from server.lora.ops import LoRABatch
from server.lora.saved import dense_linear
from server.model.base_gemm import CPP_DENSE, base_linear
from server.model.loader import BaseModel
from server.transfer import indices, to_device


class ModelRunner:
    def __init__(self, base: BaseModel, config: EngineConfig) -> None:
        self.base = base
        self.config = config
        cfg = base.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # one block past the allocator's: the scratch slots that padded decode rows write into
        self.kv = KVCache(
            cfg.num_hidden_layers,
            (config.num_kv_blocks + 1) * config.block_size,
            cfg.num_key_value_heads,
            head_dim,
            base.dtype,
            base.device,
        )
        self.inputs = StepInputBuilder(config.block_size, contexts=config.attention_backend != "flex")
        self.flex: FlexAttention | None = None
        if config.attention_backend == "flex":
            self.flex = FlexAttention(
                config.num_kv_blocks + 1,
                config.block_size,
                config.max_num_seqs,
                base.device,
                compiled=base.device.type == "cuda",
            )
        self.lm_head_name = next((n for n, s in base.saveable.items() if s.kind == "lm_head"), "lm_head")
        self.graphs: DecodeGraphs | None = None
        if config.cuda_graphs:
            self.graphs = DecodeGraphs(self, capture=base.device.type == "cuda")

    @torch.inference_mode()
    def run(self, step: SchedulerOutput, slot_of: dict[str, int]) -> tuple[list[Sequence], torch.Tensor]:
        """Forward the step. Returns the sequences that sample a token now (their whole context is
        computed) and their next-token logits [N, V]."""
        dev = self.base.device
        inputs = self.inputs.build(step, slot_of)
        ctx = self.base.lora_context
        # DoRA and (IA)3 rows run eagerly: a captured graph holds the plain low-rank term only
        extras = ctx.extra_slots.intersection(slot_of.values())
        if self.graphs is not None and step.decode and not step.prefill and not extras:
            logits = self.graphs.run(inputs, self._decode_tables(step))
            if logits is not None:
                return inputs.sampling, logits
        meta = self._attention(inputs, step)
        batch = LoRABatch.build(
            inputs.decode_adapter_slots,
            inputs.segments,
            dev,
            sgmv=ctx.lora_backend == "triton",
            extra_slots=extras,
            num_rows=len(inputs.input_ids),
            saved_slots=extras & ctx.saved.keys(),
        )
        embeds, meta = self._virtual(inputs, slot_of, meta)
        ids = to_device(inputs.input_ids, dev).unsqueeze(0)
        hidden = self._hidden(ids, to_device(inputs.positions, dev).unsqueeze(0), meta, batch, embeds)
        self._prompt_logprobs(inputs, hidden, slot_of)
        if not inputs.sample_rows:
            return inputs.sampling, hidden[:0]
        picked = hidden.index_select(0, indices(inputs.sample_rows, dev))  # [N, hidden]
        slots = [slot_of.get(s.adapter_key or "", 0) for s in inputs.sampling]
        return inputs.sampling, self._lm_head(picked, slots)

    def _virtual(
        self, inputs: StepInputs, slot_of: dict[str, int], meta: AttentionMetadata
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], AttentionMetadata]:
        """The prefill rows at virtual positions (prompt, P- and prefix tuning; see
        server.lora.virtual): (rows, their embeddings) to swap into the input, and the attention
        metadata with the prefix keys and values to write for them."""
        ctx, dev = self.base.lora_context, self.base.device
        embeds: list[tuple[torch.Tensor, torch.Tensor]] = []
        prefix: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for p in inputs.prefills:
            pos = p.seq.num_computed_tokens
            end = min(pos + p.length, p.seq.num_virtual)
            if end <= pos:
                continue
            slot = slot_of[p.seq.adapter_key or ""]
            positions = torch.arange(pos, end, device=dev)
            if slot in ctx.virtual:
                rows = torch.arange(p.start, p.start + end - pos, device=dev)
                embeds.append((rows, ctx.virtual[slot].index_select(0, positions)))
            if slot in ctx.prefix:
                slots = to_device(inputs.slot_mapping[p.start : p.start + end - pos], dev)
                prefix.append((slots, ctx.prefix[slot], positions))
        return embeds, replace(meta, prefix_kv=tuple(prefix)) if prefix else meta

    def _lm_head(self, hidden: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """Logits of `hidden` rows [N, H] -> [N, V]; the rows of a slot whose adapter saved its own
        lm_head (modules_to_save) are computed with that copy, and only the other rows with the
        base's (a row's logits do not depend on the rows beside it in the tiled mode, the only one
        that promises bits)."""
        ctx = self.base.lora_context
        lm_head = self.base.model.lm_head
        heads: dict[int, dict[str, torch.Tensor]] = {}
        for slot in sorted(set(slots) & ctx.saved.keys()):
            head = ctx.saved[slot].get(self.lm_head_name)
            if head is not None:
                heads[slot] = head
        if not heads:
            return base_linear(hidden, lm_head, ctx.base_gemm)

        def rows_of(wanted: set[int]) -> torch.Tensor:
            picked = [i for i, s in enumerate(slots) if s in wanted]
            return indices(picked, hidden.device)

        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        cpp = getattr(lm_head, CPP_DENSE, False)  # the copies' product: the base lm_head's
        rest = rows_of(set(slots) - heads.keys())
        if len(rest):
            parts.append((rest, base_linear(hidden.index_select(0, rest), lm_head, ctx.base_gemm)))
        for slot, head in heads.items():
            rows = rows_of({slot})
            x = hidden.index_select(0, rows)
            own = dense_linear(x, head["weight"], head.get("bias"), ctx.base_gemm, cpp)
            parts.append((rows, own))
        logits = hidden.new_empty(len(slots), parts[0][1].shape[1], dtype=parts[0][1].dtype)
        for rows, values in parts:
            logits.index_copy_(0, rows, values.to(logits.dtype))
        return logits

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor, slot_of: dict[str, int]) -> None:
        """For requests that asked (`echo` + `logprobs`): what each prefilled prompt position says
        about the next prompt token, written into the sequence by position (a recompute after
        preemption rewrites the same entries). Its own lm_head call, so the sampled rows' logits
        are the same product with or without it."""
        for p in inputs.prefills:
            seq = p.seq
            if seq.prompt_logprobs is None or seq.params.prompt_logprobs is None:
                continue
            # positions (virtual ones first) whose next token is a prompt token; the final one samples
            first, v = seq.num_computed_tokens, seq.num_virtual
            lo, hi = max(first, v), min(first + p.length, v + len(seq.prompt_token_ids) - 1)
            if hi <= lo:
                continue
            rows = hidden[p.start + lo - first : p.start + hi - first]
            logits = self._lm_head(rows, [slot_of.get(seq.adapter_key or "", 0)] * len(rows))
            targets = indices(seq.prompt_token_ids[lo - v + 1 : hi - v + 1], rows.device)
            for j, entry in enumerate(prompt_logprobs(logits, targets, seq.params.prompt_logprobs)):
                seq.prompt_logprobs[lo - v + 1 + j] = entry

    def _decode_tables(self, step: SchedulerOutput) -> list[tuple[list[int], int]]:
        """(block table of the context so far, query position) of each decode row."""
        bs = self.config.block_size
        return [
            (s.block_table[: s.num_computed_tokens // bs + 1], s.num_computed_tokens) for s in step.decode
        ]

    def _hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        batch: LoRABatch,
        embeds: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The decoder over the packed rows: [1, T] ids -> [T, hidden]. `embeds`: (rows, vectors)
        that replace those rows' input embeddings (virtual tokens)."""
        ctx = self.base.lora_context
        ctx.batch = batch
        try:
            inputs_embeds = None
            if embeds:
                inputs_embeds = self.base.model.model.embed_tokens(input_ids)  # [1, T, hidden]
                for rows, vectors in embeds:
                    # PEFT casts the prompt table to the embeddings' dtype before the concatenation
                    inputs_embeds[0].index_copy_(0, rows, vectors.to(inputs_embeds.dtype))
            return self.base.model.model(
                input_ids=None if embeds else input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=positions,
                use_cache=False,
                loraplex_attention=meta,
                loraplex_kv_cache=self.kv,
            ).last_hidden_state[0]
        finally:
            ctx.batch = None

    def forward_static(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, batch: LoRABatch
    ) -> torch.Tensor:
        """The model and lm_head over every row of a decode step: [1, B] ids -> [B, V] logits."""
        hidden = self._hidden(input_ids, positions, meta, batch)
        return base_linear(hidden, self.base.model.lm_head, self.base.lora_context.base_gemm)

    def forward_padded(self, p: PaddedDecode) -> torch.Tensor:
        """A padded decode step run eagerly (what a captured graph replays): [B, V] logits."""
        dev = self.base.device
        slot_mapping = to_device(p.slot_mapping, dev)
        if self.flex is not None:
            meta = AttentionMetadata(
                slot_mapping, p.bucket, flex=FlexPlan(self.flex, self.flex.prepare(p.tables, []))
            )
        else:
            meta = AttentionMetadata(slot_mapping, p.bucket, decode_kv=decode_contexts(p.contexts, dev))
        ctx = self.base.lora_context
        batch = LoRABatch.build(p.adapter_slots.tolist(), [], dev, sgmv=ctx.lora_backend == "triton")
        ids = to_device(p.input_ids, dev).unsqueeze(0)
        return self.forward_static(ids, to_device(p.positions, dev).unsqueeze(0), meta, batch)

    def _attention(self, inputs: StepInputs, step: SchedulerOutput) -> AttentionMetadata:
        dev = self.base.device
        slot_mapping = to_device(inputs.slot_mapping, dev)
        if self.flex is not None:
            bs = self.config.block_size
            chunks = [
                (
                    p.seq.block_table[: -(-(p.seq.num_computed_tokens + p.length) // bs)],
                    p.seq.num_computed_tokens,
                    p.length,
                    p.start,
                )
                for p in inputs.prefills
            ]
            plan = FlexPlan(self.flex, self.flex.prepare(self._decode_tables(step), chunks))
            return AttentionMetadata(slot_mapping, len(step.decode), flex=plan)
        chunks_ref = []
        for p in inputs.prefills:
            pos, n = p.seq.num_computed_tokens, p.length
            total = pos + n
            # query i (absolute position pos + i) sees keys 0..pos + i
            mask = torch.arange(total, device=dev).unsqueeze(0) <= (
                torch.arange(n, device=dev) + pos
            ).unsqueeze(1)
            chunks_ref.append(PrefillChunk(p.start, n, to_device(p.context, dev), mask))
        return AttentionMetadata(
            slot_mapping,
            len(step.decode),
            decode_kv=decode_contexts(inputs.decode_context, dev),
            prefills=tuple(chunks_ref),
        )

    def forget(self, request_id: str) -> None:
        self.inputs.forget(request_id)

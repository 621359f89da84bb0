"""Continuous batching: who runs in the next step, under the token, sequence, KV and adapter budgets."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.sequence import FinishReason, Sequence, SequenceStatus


class AdapterGate(Protocol):
    """The scheduler's view of adapter residency (implemented by the engine over the CPU cache)."""

    def ready(self, seq: Sequence) -> bool:
        """True when the sequence's adapter (or the base) can run now; otherwise starts loading it."""
        ...

    def saved_bytes(self, seq: Sequence) -> int:
        """Device bytes of the modules_to_save copies of a ready sequence's adapter (0: none)."""
        ...

    def acquire(self, seq: Sequence) -> None: ...

    def release(self, seq: Sequence) -> None: ...


@dataclass(slots=True)
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)  # one new token each
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens in this chunk)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, gate: AdapterGate) -> None:
        self.config = config
        self.blocks = blocks
        self.gate = gate
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # How many distinct queued adapters are fetched ahead (see _admit).
        self.fetch_window = min(config.max_loras, max(1, config.max_cpu_loras - config.max_loras))
        self.chunk = min(config.prefill_chunk_tokens, config.max_num_batched_tokens)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next_chunk(self, seq: Sequence) -> int:
        """Tokens of the sequence's next forward: 1 when decoding; when prefilling, up to the next
        multiple of the chunk size. Chunk boundaries are fixed by the sequence alone, never by what
        else shares the step, so each chunk's attention has the same shapes alone or batched (a
        chunk that does not fit this step's budget waits whole for the next one)."""
        start = seq.num_computed_tokens
        return min(seq.num_tokens, (start // self.chunk + 1) * self.chunk) - start

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Running sequences first, oldest first; under KV pressure the newest is preempted.
        running = deque(self.running)
        kept: list[Sequence] = []
        while running:
            seq = running.popleft()
            n = self.next_chunk(seq)
            if n > budget:
                kept.append(seq)
                continue
            # counted once: preempting others frees blocks but does not change what this one needs
            # (a decode step needs none 15 times in 16, and then allocates nothing)
            need = self.blocks.blocks_needed(seq, n)
            while need > self.blocks.num_free and running:
                self._preempt(running.pop(), out)
            if need > self.blocks.num_free:
                self._preempt(seq, out)
                continue
            if need:
                self.blocks.allocate(seq, n)
            budget -= n
            kept.append(seq)
            if seq.num_uncomputed == 1:
                out.decode.append(seq)
            else:
                out.prefill.append((seq, n))
        self.running = kept
        self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting or budget <= 0 or len(self.running) >= self.config.max_num_seqs:
            return  # what the loop's first test would find, without a pass over every running sequence
        adapters = {s.adapter_key for s in self.running if s.adapter_key}
        # modules_to_save copies of the step's adapters share one device budget, like the slots
        saved = sum({s.adapter_key: self.gate.saved_bytes(s) for s in self.running if s.adapter_key}.values())
        admitted: list[Sequence] = []
        head_starving = False
        # Asking the gate starts a disk load. Loading every queued adapter at once would push the
        # first ones out of the CPU cache (max_cpu_loras) before their requests get in, and load
        # them again, so only the next `fetch_window` distinct adapters in queue order are fetched;
        # they are fetched even while the adapter budget is full, to be in memory when a slot frees.
        fetching: set[str] = set()
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            key = seq.adapter_key
            new_adapter = key is not None and key not in adapters
            in_window = not new_adapter or key in fetching or len(fetching) < self.fetch_window
            if key is not None and new_adapter and in_window:
                fetching.add(key)
            if new_adapter and len(adapters) >= self.config.max_loras:
                # vLLM lets later requests overtake; we do too, but only until this one has waited
                # long enough, then nobody new joins until an adapter frees up (no starvation).
                seq.blocked_steps += 1
                if seq.blocked_steps > self.config.max_adapter_wait_steps:
                    head_starving = True
                if in_window:
                    self.gate.ready(seq)
                continue
            if head_starving:
                break
            if not in_window or not self.gate.ready(seq):
                continue
            extra = self.gate.saved_bytes(seq) if new_adapter else 0
            if extra and saved + extra > self.config.max_saved_module_bytes:
                seq.blocked_steps += 1
                continue
            n = self.next_chunk(seq)
            if n > budget or not self.blocks.can_allocate(seq, n):
                break
            self.blocks.allocate(seq, n)
            self.gate.acquire(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            if key:
                adapters.add(key)
                fetching.discard(key)
                saved += extra
            budget -= n
            if seq.num_uncomputed == 1:
                out.decode.append(seq)
            else:
                out.prefill.append((seq, n))
        for seq in admitted:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free its KV and requeue it at the front; it recomputes prompt + output when readmitted."""
        self.blocks.release(seq)
        self.gate.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
            self.gate.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

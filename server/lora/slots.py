"""Device slots: which adapter version sits in which slot of every LoRA layer's buffers (LRU)."""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict

import torch

from server.lora.adapter import AdapterWeights
from server.lora.layer import LoRAContext, LoRALinear

log = logging.getLogger(__name__)


class SlotTable:
    """Slots 1..num_slots (0 is the permanent all-zero slot). The lowest free slot is taken first so a
    step's adapters cluster at low indices, which keeps the dense decode product narrow."""

    def __init__(
        self,
        layers: dict[str, LoRALinear],
        num_slots: int,
        context: LoRAContext | None = None,
        saved_budget: int = 0,
    ) -> None:
        """`saved_budget`: device bytes the resident adapters' modules_to_save copies may take
        together; an adapter that needs room evicts the least recently used ones not in the step."""
        self.layers = layers
        self.num_slots = num_slots
        if context is None:
            context = next(iter(layers.values())).context if layers else LoRAContext()
        self.context = context  # one context is shared by every layer
        self.saved_budget = saved_budget
        self.saved_bytes: dict[str, int] = {}  # version -> bytes of its copies on the device
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # version -> slot, least recently used first
        self.free = list(range(1, num_slots + 1))
        heapq.heapify(self.free)
        self.loads = 0
        self.evictions = 0
        device = next(iter(layers.values())).lora_A.device if layers else None
        # On CUDA, slot writes go on a side stream: the step's kernels wait for them, the host does not.
        self.stream = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

    def activate(self, needed: dict[str, AdapterWeights]) -> dict[str, int]:
        """Make every adapter of the step resident and return version -> slot. Slots of adapters in
        `needed` are never evicted to make room for another one of the same step."""
        assert len(needed) <= self.num_slots, "the scheduler keeps a step within max_loras adapters"
        if self.context.owner is not self:
            self._claim()
        for key in needed:
            if key in self.slot_of:
                self.slot_of.move_to_end(key)
        writes: list[tuple[int, AdapterWeights]] = []
        for key, weights in needed.items():
            if key in self.slot_of:
                continue
            self._make_room(weights.saved_nbytes, needed)
            if self.free:
                slot = heapq.heappop(self.free)
            else:
                victim = next(k for k in self.slot_of if k not in needed)
                slot = self.slot_of.pop(victim)
                self.saved_bytes.pop(victim, None)
                self.evictions += 1
                log.debug("evicted adapter %s from slot %d", victim[:12], slot)
            writes.append((slot, weights))
            self.slot_of[key] = slot
            if weights.saved:
                self.saved_bytes[key] = weights.saved_nbytes
            self.loads += 1
        self._write_all(writes)
        return {key: self.slot_of[key] for key in needed}

    def _claim(self) -> None:
        """Another SlotTable (another engine on the same base model) wrote into the shared slots
        since this one last ran: forget what this one believed resident, so it is written again."""
        for key in list(self.slot_of):
            self.drop(key)
        self.context.owner = self

    def _make_room(self, nbytes: int, needed: dict[str, AdapterWeights]) -> None:
        """Evict resident adapters with saved copies (least recently used first, never one of this
        step) until `nbytes` more fit in the budget. The scheduler keeps a step's own copies within
        it, so room can always be made."""
        if not nbytes:
            return
        while sum(self.saved_bytes.values()) + nbytes > self.saved_budget:
            victim = next((k for k in self.slot_of if k in self.saved_bytes and k not in needed), None)
            if victim is None:
                raise RuntimeError(
                    f"modules_to_save copies of this step exceed the budget of {self.saved_budget} bytes"
                )
            self.drop(victim)
            self.evictions += 1

    def _write_all(self, writes: list[tuple[int, AdapterWeights]]) -> None:
        if self.stream is None or not writes:
            for slot, weights in writes:
                self._write(slot, weights)
            return
        main = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(main)  # a slot being replaced may still be read by the last step
        with torch.cuda.stream(self.stream):
            for slot, weights in writes:
                self._write(slot, weights)
        main.wait_stream(self.stream)

    def drop(self, key: str) -> None:
        """Forget an adapter version (deleted or replaced); its slot becomes free."""
        slot = self.slot_of.pop(key, None)
        self.saved_bytes.pop(key, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            self._clear(slot)
            heapq.heappush(self.free, slot)

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        for name, layer in self.layers.items():
            layer.set_slot(slot, weights.modules.get(name), weights.ia3.get(name))
        self._clear(slot)
        if weights.per_row:
            self.context.extra_slots.add(slot)
        device = next(iter(self.layers.values())).lora_A.device if self.layers else torch.device("cpu")
        if weights.saved:
            self.context.saved[slot] = {
                module: {p: t.to(device, non_blocking=True) for p, t in params.items()}
                for module, params in weights.saved.items()
            }
        virtual = weights.virtual
        if virtual is not None and virtual.embeddings is not None:
            self.context.virtual[slot] = virtual.embeddings.to(device, non_blocking=True)
        if virtual is not None and virtual.prefix_kv is not None:
            self.context.prefix[slot] = virtual.prefix_kv.to(device, non_blocking=True)

    def _clear(self, slot: int) -> None:
        """Forget what a slot held beside the layers' buffers."""
        self.context.extra_slots.discard(slot)
        for held in (self.context.saved, self.context.virtual, self.context.prefix):
            held.pop(slot, None)

"""Device slots: which adapter version sits in which slot of every LoRA layer's buffers (LRU)."""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict

import torch

from server.lora.adapter import AdapterWeights
from server.lora.layer import LoRALinear

log = logging.getLogger(__name__)


class SlotTable:
    """Slots 1..num_slots (0 is the permanent all-zero slot). The lowest free slot is taken first so a
    step's adapters cluster at low indices, which keeps the dense decode product narrow."""

    def __init__(self, layers: dict[str, LoRALinear], num_slots: int) -> None:
        self.layers = layers
        self.num_slots = num_slots
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
        for key in needed:
            if key in self.slot_of:
                self.slot_of.move_to_end(key)
        writes: list[tuple[int, AdapterWeights]] = []
        for key, weights in needed.items():
            if key in self.slot_of:
                continue
            if self.free:
                slot = heapq.heappop(self.free)
            else:
                victim = next(k for k in self.slot_of if k not in needed)
                slot = self.slot_of.pop(victim)
                self.evictions += 1
                log.debug("evicted adapter %s from slot %d", victim[:12], slot)
            writes.append((slot, weights))
            self.slot_of[key] = slot
            self.loads += 1
        self._write_all(writes)
        return {key: self.slot_of[key] for key in needed}

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
        if slot is not None:
            for layer in self.layers.values():
                layer.set_slot(slot, None)
            self._extras(slot, False)
            heapq.heappush(self.free, slot)

    def _write(self, slot: int, weights: AdapterWeights) -> None:
        for name, layer in self.layers.items():
            layer.set_slot(slot, weights.modules.get(name), weights.ia3.get(name))
        self._extras(slot, not weights.is_plain_lora)

    def _extras(self, slot: int, on: bool) -> None:
        for layer in self.layers.values():
            (layer.context.extra_slots.add if on else layer.context.extra_slots.discard)(slot)
            break  # one context is shared by every layer

"""LoRA adapters: config parsing, weights, registry, device slots and the batched layer."""

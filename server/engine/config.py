"""What the engine needs, as a frozen dataclass checked once (pydantic stays at the HTTP edge)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine needs, checked once. `max_model_len` is resolved against the model at load time."""

    max_loras: int = 8
    max_cpu_loras: int = 32
    max_lora_rank: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    # Prefill chunk boundaries sit at multiples of this (capped by max_num_batched_tokens), whatever
    # else runs: the chunking of a prompt never depends on the batch.
    prefill_chunk_tokens: int = 512
    max_model_len: int = 2048
    kv_cache_tokens: int = 32768
    block_size: int = 16
    max_queue: int = 256
    attention_backend: str = "torch"  # "torch" or "flex" (chosen by select_backends)
    # Decode-only steps padded to batch-size buckets; captured as CUDA graphs on a GPU.
    cuda_graphs: bool = False
    # Steps a request blocked by the adapter budget waits before newer requests stop overtaking it.
    max_adapter_wait_steps: int = 16
    # Device bytes for the modules_to_save copies of the adapters in slots (and of one step's adapters)
    max_saved_module_bytes: int = 2 << 30
    # Host bytes of the parsed adapters the CPU tier keeps (beside its max_cpu_loras count)
    max_cpu_lora_bytes: int = 8 << 30

    def __post_init__(self) -> None:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} must be >= max_loras {self.max_loras}")
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens {self.kv_cache_tokens} cannot hold one sequence of max_model_len "
                f"{self.max_model_len}"
            )
        for name in (
            "max_loras",
            "max_lora_rank",
            "max_num_seqs",
            "block_size",
            "max_queue",
            "prefill_chunk_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

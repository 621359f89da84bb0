"""One request's state inside the engine: its tokens, its sampling parameters, its lifecycle."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

from server.errors import RequestError
from server.lora.registry import AdapterRecord


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # client went away or the adapter failed to load


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not (0.0 <= self.temperature <= 2.0) or math.isnan(self.temperature):
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The resolved version, not the name: a request keeps its version if the name is replaced meanwhile.
    adapter: AdapterRecord | None = None
    eos_token_ids: frozenset[int] = frozenset()
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival: int = 0  # engine step at which the request arrived
    blocked_steps: int = 0  # steps spent waiting on the adapter budget
    generator: torch.Generator = field(init=False)
    device_generator: torch.Generator | None = None  # the sampler's copy on an accelerator

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        # One generator per request: a seeded request samples the same tokens whatever shares its batch.
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.version if self.adapter else None

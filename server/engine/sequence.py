"""One request's state inside the engine: its tokens, its sampling parameters, its lifecycle."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.logprobs import MAX_LOGPROBS, TokenLogprob
from server.errors import RequestError
from server.lora.registry import AdapterRecord

if TYPE_CHECKING:  # the grammar library loads only where a request asks for structured output
    from server.engine.grammar import Constraint


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
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings are ignored before this many tokens
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    # transformers' RepetitionPenaltyLogitsProcessor over prompt and output (1 = off)
    repetition_penalty: float = 1.0
    # OpenAI's: logit -= count * frequency + (count > 0) * presence, over generated tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # alternatives per sampled token; None: no logprobs
    prompt_logprobs: int | None = None  # alternatives per prompt position; None: none
    raw_logprobs: bool = False  # logprobs of the model's distribution, not the one sampled from

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
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise RequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                "min_tokens",
            )
        if not (0.0 <= self.min_p <= 1.0):
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise RequestError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}", "repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if any(not (-100.0 <= b <= 100.0) for _, b in self.logit_bias):
            raise RequestError("logit_bias values must be in [-100, 100]", "logit_bias")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (0 <= k <= MAX_LOGPROBS):
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether any setting changes the logits before the choice (neutral rows skip that work)."""
        return bool(
            self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.logit_bias
            or self.min_tokens
        )


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
    constraint: Constraint | None = None  # structured output: the grammar the tokens must follow
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # by prompt position (index i: token i given tokens < i; index 0 stays None); filled by the runner
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt, P- and prefix tuning: positions before the prompt, held by placeholder ids (see
    # server.lora.virtual); the runner fills their embeddings or their keys and values.
    num_virtual: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise RequestError("the prompt is empty", "prompt")
        self.num_virtual = getattr(self.adapter, "virtual_tokens", 0) if self.adapter is not None else 0
        # One generator per request: a seeded request samples the same tokens whatever shares its batch.
        self.generator = torch.Generator()
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
        vocab_bad = [t for t, _ in self.params.logit_bias if t < 0]
        if vocab_bad:
            raise RequestError(f"logit_bias token id {vocab_bad[0]} is negative", "logit_bias")

    @property
    def token_ids(self) -> list[int]:
        """Every position's id, from position 0: placeholders (0) at the virtual positions."""
        return [0] * self.num_virtual + self.prompt_token_ids + self.output_token_ids

    def token_at(self, pos: int) -> int:
        """token_ids[pos] without building the list (a decode row reads one id per step)."""
        i = pos - self.num_virtual
        if i < 0:
            return 0
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def num_tokens(self) -> int:
        return self.num_virtual + len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.version if self.adapter else None

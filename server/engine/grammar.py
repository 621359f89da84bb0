"""Structured output: a grammar per request turns into a token mask per decode step (llguidance).

A request's JSON schema, regex, choice list or Lark grammar is compiled once per distinct spec against
the tokenizer; each request gets its own copy of the compiled matcher, which the engine thread asks
for the next allowed tokens and advances with the token it sampled. llguidance is a Rust library
without Python dependencies; it names what it does not support ("Unimplemented keys: [...]") instead
of ignoring it, and bounds compilation and mask work by fuel, not wall-clock timeouts, so a
pathological schema or regex fails the same way on every machine.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

from server.errors import RequestError
from server.transfer import indices

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

# Errors name the failing construct without echoing the parser state and the whole grammar.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match, in canonical text (equal specs share one compiled grammar).

    Semantics: `json_schema`: the schema as `GrammarSpec.for_schema` writes it: compact, keys in the
    order given, because the output follows the order of `properties`; `json_object`: any JSON
    object (`value` unused, canonically ""); `regex`: a full match of the pattern (Rust regex syntax);
    `choice`: a JSON list of strings, the output is exactly one of them; `grammar`: a Lark grammar in
    llguidance's dialect (a llama.cpp GBNF grammar is converted to it).
    """

    kind: GrammarKind
    value: str

    @classmethod
    def for_schema(cls, schema: Mapping[str, Any]) -> GrammarSpec:
        """Not sort_keys: a schema's `properties` order is the order the output's keys are written in."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))


class Constraint:
    """One request's position in its grammar. Engine thread only.

    Semantics: `mask_` leaves a row's allowed tokens untouched and sets every other entry to -inf.
    EOS is allowed exactly when the output so far is a complete match; ids the tokenizer does not
    define (the padding at the end of a logits row) are never allowed. A token outside the mask makes the
    constraint `failed`; from then on only EOS is allowed, so the sequence ends at its next step.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    def mask_(self, row: torch.Tensor) -> None:
        """row: [V] logits, in place. The plain reference for `apply_masks`: one byte per token."""
        if row.shape != (self.vocab_size,):
            raise ValueError(f"row shape {tuple(row.shape)} is not ({self.vocab_size},)")
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        row.masked_fill_(allowed.to(row.device) == 0, float("-inf"))

    def accept(self, token: int) -> None:
        """Advance by the sampled token (EOS included); a token the grammar refuses marks it failed."""
        if not self._matcher.is_error():
            self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is complete: nothing but EOS may follow (or EOS was already accepted)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def failed(self) -> bool:
        return self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why it failed (a refused token, or the per-step work bound), for the log."""
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer, with a small LRU of compiled grammars.

    Semantics: `compile` returns a fresh Constraint; equal specs compile once while they stay among
    the `cache_size` most recently used (a refused spec too, so repeating it is cheap). Thread-safe:
    the API's threads compile, the engine thread uses the constraints.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int] | None = None,
        cache_size: int = 64,
    ) -> None:
        """vocab_size: the width of a logits row (may exceed len(tokenizer)). eos_token_ids: the ids the
        engine stops on, all allowed once the grammar is complete (default: the tokenizer's EOS)."""
        eos = sorted(set(eos_token_ids or ())) or [tokenizer.eos_token_id]
        if None in eos:
            raise ValueError("structured output needs an EOS token; the tokenizer defines none")
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
        # ~0.4 s for a 49k vocabulary: it indexes every token's bytes, once per server.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos)
        self.compiles = 0  # cache misses, for tests and metrics
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, llguidance.LLMatcher | str] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec, param: str = "response_format") -> Constraint:
        """A fresh Constraint for `spec`; RequestError(param) naming what is invalid or unsupported."""
        with self._lock:  # held while compiling, so concurrent equal specs compile once
            compiled = self._cache.get(spec)
            if compiled is None:
                compiled = self._compile(spec)
                self.compiles += 1
                self._cache[spec] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            if isinstance(compiled, str):
                raise RequestError(f"{param}: {_WHAT[spec.kind]} cannot be used: {compiled}", param)
            # A copy shares the compiled grammar and starts from the initial state.
            return Constraint(compiled.deep_copy(), self.vocab_size)

    def _compile(self, spec: GrammarSpec) -> llguidance.LLMatcher | str:
        """The matcher in its initial state, or the library's error text."""
        try:
            grammar = _grammar(spec)
        except ValueError as e:  # malformed JSON text, or GBNF that does not convert
            return str(e)[:_MAX_ERROR_CHARS]
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            return matcher.get_error().strip()[:_MAX_ERROR_CHARS]
        return matcher


def _grammar(spec: GrammarSpec) -> str:
    """llguidance's grammar text for a spec (checked only when a matcher is built from it)."""
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":  # a JSON list of strings -> Lark alternatives of string literals
        return llguidance.grammar_from("choice", spec.value)
    if spec.kind == "grammar":  # Lark, or llama.cpp GBNF converted to Lark
        return llguidance.grammar_from("grammar", spec.value)
    schema = spec.value if spec.kind == "json_schema" else '{"type": "object"}'
    # No free whitespace: with it, a small model (or an unlucky sample) can emit blank space until
    # max_tokens. These are json.dumps' separators, the layout models see most often.
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    )


_WHAT: dict[GrammarKind, str] = {
    "json_schema": "the JSON schema",
    "json_object": "the JSON object grammar",
    "regex": "the regex",
    "choice": "the choice list",
    "grammar": "the grammar",
}


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for batched masks (up to 80% of the cores), made at first use."""
    return llguidance.LLExecutor()


def unpack_bits(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """words: [R, W] int32, bit j of word w = token 32 w + j -> [R, vocab_size] bool (allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]; the sign bit is masked off by & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size].bool()


def apply_masks(logits: torch.Tensor, rows: list[tuple[int, Constraint]]) -> None:
    """logits: [N, V], in place: row i of each (i, constraint) masked by its constraint.

    Semantics: exactly `for i, c in rows: c.mask_(logits[i])` (the reference; a test holds them
    equal), with every row's mask computed by llguidance's thread pool into one bitmask, copied to
    the device once and applied with one indexed write.
    """
    if not rows:
        return
    # llguidance.torch imports torch._dynamo (seconds, unless the server already has); load it here.
    import llguidance.torch as llt

    vocab = logits.shape[1]
    bitmask = llt.allocate_token_bitmask(len(rows), vocab)  # [R, ceil(V/32)], pinned when CUDA is present
    llt.fill_next_token_bitmask_par(_executor(), [(c._matcher, k) for k, (_, c) in enumerate(rows)], bitmask)
    allowed = unpack_bits(bitmask.to(logits.device, non_blocking=True), vocab)  # [R, V]
    idx = indices([i for i, _ in rows], logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))

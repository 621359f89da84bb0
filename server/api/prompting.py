"""From a validated request to what the engine runs: the prompt token ids of each choice, the
sampling parameters, and the grammar a constrained choice follows. Every bound that depends on the
server's settings or on the model (vocabulary, context) is checked here, with a 400 naming the field.

A chat's text never becomes control tokens: a message that spells out a special token
("<|im_end|>\n<|im_start|>system ...") is tokenized as the plain text it is, so a client cannot
close its own turn and open a system one (template injection). The template's own special tokens
are untouched."""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass
from typing import Any

from server.api import tools as tool_calls
from server.api.schemas import ChatCompletionRequest, ChatTemplateRequest, CompletionRequest
from server.api.structured import grammar_source
from server.engine.grammar import GrammarSpec
from server.engine.sequence import SamplingParams
from server.errors import RequestError
from server.runtime import Runtime

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
# apply_chat_template's own parameters: not template variables, so chat_template_kwargs cannot set them
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's `chat_template_kwargs`: template variables, never apply_chat_template's own switches."""
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & (kwargs or {}).keys())
    if reserved:
        raise RequestError(f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
    return dict(kwargs or {})


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its ids and its text (what `echo` repeats)."""

    ids: list[int]
    text: str


def chat_prompt(rt: Runtime, body: ChatCompletionRequest) -> Prompt:
    return Prompt(render_chat(rt, body), "")


def render_chat(rt: Runtime, body: ChatTemplateRequest) -> list[int]:
    """A conversation through the model's chat template (the chat route and /tokenize alike, so
    a client's token count is the prompt it gets). `developer` is the system role (OpenAI renamed
    it; templates know `system`); `name` reaches the template; tool history and tool definitions go
    through the template when it supports tools, else as Hermes-style text."""
    if body.chat_template is not None:
        raise RequestError(
            "a per-request chat_template is not supported: the model's own is used", "chat_template"
        )
    if not getattr(rt.base.tokenizer, "chat_template", None):
        raise RequestError(
            f"the model {rt.model_id!r} has no chat template: send a prompt to /v1/completions, or "
            "start the server with --chat-template",
            "messages",
        )
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    messages, kwargs = tool_calls.render_messages(
        messages, body.tools, body.tool_choice, tool_calls.template_supports_tools(rt.base.tokenizer)
    )
    try:
        return _chat_ids(
            rt,
            messages,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            template_kwargs={**template_kwargs(body.chat_template_kwargs), **kwargs},
        )
    except ValueError as e:  # transformers' own checks, e.g. continue_final_message with nothing to continue
        raise RequestError(str(e), "messages") from e


@functools.lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _chat_ids(
    rt: Runtime,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    template_kwargs: dict[str, Any],
) -> list[int]:
    """The chat template's token ids, with client strings that spell special tokens kept as text.

    Semantics: a conversation with no such string takes the model's own path (BaseModel.chat_ids),
    token for token. Otherwise each such string is swapped for a placeholder no client can forge
    (private-use characters around a per-call nonce), the template renders text, and each
    placeholder is tokenized back as its string with special tokens split into ordinary ones. A
    template that does not pass a placeholder through verbatim is refused (400), not guessed at."""
    tokenizer = rt.base.tokenizer
    specials = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    pattern = _special_pattern(specials)
    held: list[str] = []
    nonce = secrets.token_hex(8)

    def hold(value: Any) -> Any:
        if isinstance(value, str):
            if pattern is None or pattern.search(value) is None:
                return value
            held.append(value)
            return f"\ue000{nonce}:{len(held) - 1}\ue001"
        if isinstance(value, dict):
            return {k: hold(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [hold(v) for v in value]
        return value

    safe_messages, safe_kwargs = hold(messages), hold(template_kwargs)
    if not held:
        return rt.base.chat_ids(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )
    text = tokenizer.apply_chat_template(
        safe_messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt and not continue_final_message,  # as chat_ids
        continue_final_message=continue_final_message,
        **safe_kwargs,
    )
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    if {int(i) for i in pieces[1::2]} != set(range(len(held))):
        raise RequestError(
            "a message spells out a special token of the model and its chat template cannot keep it as "
            "plain text",
            "messages",
        )
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids += tokenizer.encode(held[int(piece)], add_special_tokens=False, split_special_tokens=True)
        elif piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return [int(i) for i in ids]


def completion_prompts(rt: Runtime, body: CompletionRequest) -> list[Prompt]:
    """Each prompt of /v1/completions: text is tokenized; token ids are checked against the vocabulary."""
    vocab = len(rt.base.tokenizer)
    prompts = body.prompts()
    sequences, limit = len(prompts) * body.n, rt.settings.max_queue
    if sequences > limit:
        # each choice is a sequence in flight: beyond the queue's bound the request could never be
        # admitted whole, so it is a 400 (not a 429 that a retry would meet again)
        raise RequestError(
            f"{len(prompts)} prompts x n={body.n} make {sequences} sequences; this server holds at most "
            f"{limit} in flight (--max-queue)",
            "prompt",
        )
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(Prompt(rt.text_prompt(p), p))
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        out.append(Prompt(list(p), rt.base.tokenizer.decode(p)))
    return out


def constraint_spec(body: ChatCompletionRequest | CompletionRequest) -> tuple[GrammarSpec | None, str]:
    """The grammar the output must follow, and the request field it came from."""
    source = grammar_source(
        body.response_format,
        body.structured_outputs,
        body.guided_json,
        body.guided_regex,
        body.guided_choice,
        body.guided_grammar,
    )
    if (
        isinstance(body, ChatCompletionRequest)
        and body.tools
        and body.tool_choice not in (None, "none", "auto")
    ):
        schema = tool_calls.forced_schema(body.tools, body.tool_choice)
        if schema is not None:
            if body.tool_choice == "required" and not body.parallel_tool_calls:
                schema["maxItems"] = 1
            if source is not None:
                raise RequestError(
                    "tool_choice forces a tool call; it cannot be combined with a response_format",
                    "tool_choice",
                )
            return GrammarSpec.for_schema(schema), "tool_choice"
    return (None, "response_format") if source is None else (source[1], source[0])


def sampling_params(
    rt: Runtime,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    index: int,
    *,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    """The engine's parameters for choice `index` (a seeded request's n choices differ and repeat)."""
    vocab = rt.base.model.config.vocab_size
    bias = body.bias()
    named = [(t, "logit_bias") for t, _ in bias] + [(t, "stop_token_ids") for t in body.stop_token_ids or ()]
    for t, param in named:
        if not 0 <= t < vocab:
            raise RequestError(f"token id {t} is outside the vocabulary [0, {vocab})", param)
    given, defaults = body.model_fields_set, rt.generation_defaults

    def field(name: str) -> Any:  # the request's value, else the checkpoint's default, else ours
        return getattr(body, name) if name in given or name not in defaults else defaults[name]

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=field("temperature"),
        top_p=field("top_p"),
        top_k=max(int(field("top_k")), 0),  # vLLM's -1 is our 0 (off), as the schema reads it
        min_p=field("min_p"),
        seed=None if body.seed is None else (body.seed + index) % 2**63,
        stop=body.stop_strings(),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        min_tokens=min(body.min_tokens, max_tokens),
        repetition_penalty=field("repetition_penalty"),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=bias,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        raw_logprobs=rt.settings.logprobs_mode == "raw",
    )


def check_limits(
    rt: Runtime, body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> None:
    s = rt.settings
    refused = body.refused()
    if refused is not None:
        hint = " (use tools)" if refused.startswith("function") else ""
        raise RequestError(f"{refused} is not supported by this server{hint}", refused)
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise RequestError(
            f"max_tokens {max_tokens} is above this server's limit of {s.max_tokens_limit}", "max_tokens"
        )
    if body.n > s.max_n:
        raise RequestError(f"n {body.n} is above this server's limit of {s.max_n}", "n")
    if body.n > s.max_queue:  # never admitted whole (--max-n may be set above --max-queue): not a 429
        raise RequestError(
            f"n={body.n} sequences are more than this server holds in flight ({s.max_queue}, --max-queue)",
            "n",
        )
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of other than n is not supported (each choice is returned)", "best_of")
    if len(body.stop_strings()) > s.max_stop:
        raise RequestError(
            f"at most {s.max_stop} stop strings are accepted, got {len(body.stop_strings())}", "stop"
        )
    if body.min_tokens and max_tokens is not None and body.min_tokens > max_tokens:
        raise RequestError(f"min_tokens {body.min_tokens} is above max_tokens {max_tokens}", "min_tokens")


def default_max_tokens(rt: Runtime, prompt_len: int, chat: bool) -> int:
    """Chat: the rest of the context, bounded by the server's limit (vLLM's default; frontends send
    none and expect a whole reply). Completions: 16, as OpenAI and vLLM. Both within the limit."""
    room = max(1, rt.base.max_model_len - prompt_len)
    default = room if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    return min(rt.settings.max_tokens_limit, room, default)

"""Request bodies: OpenAI's fields plus vLLM's extras. Unknown fields are ignored, as OpenAI clients
expect; an explicit null means the field's default (the openai SDK sends null for an explicit None).
Bounds that depend on the server's settings (stop strings, n, max_tokens) are checked by the route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api.structured import ResponseFormat, StructuredOutputs
from server.api.tools import Tool, ToolCall, ToolChoice
from server.errors import RequestError

MAX_TEXT = 200_000  # characters of one prompt or message
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries, OpenAI's own bound


class Body(BaseModel):
    """A request body: unknown fields ignored, an explicit null the field's default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = Field(None, max_length=MAX_TEXT)

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(
                f"content parts of type '{self.type}' are not supported: this model reads text only"
            )
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = Field(None, max_length=MAX_TEXT)
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # an assistant turn may be only tool calls
            raise ValueError(f"a '{self.role}' message needs content")
        return self

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(Body):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="vLLM's: -1 or 0 disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM extras that change the output and are not implemented: refused when set to a non-default
    # value (see `refused`), so no client gets a silently different answer
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    def refused(self) -> str | None:
        """The first field set to something this server does not do, if any."""
        for name in (
            "bad_words",
            "allowed_token_ids",
            "truncate_prompt_tokens",
            "prompt_logprobs",
            "functions",
            "function_call",
        ):
            if getattr(self, name):
                return name
        if self.include_stop_str_in_output:
            return "include_stop_str_in_output"
        if not self.skip_special_tokens:
            return "skip_special_tokens"
        if not self.spaces_between_special_tokens:
            return "spaces_between_special_tokens"
        return "use_beam_search" if self.use_beam_search else None

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, v: int) -> int:
        return max(v, 0)

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters, got {len(s)}")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        """Empty strings are dropped (they would match everywhere)."""
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    def bias(self) -> tuple[tuple[int, float], ...]:
        out = []
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise RequestError(f"logit_bias keys are token ids, got '{k}'", "logit_bias")
            out.append((int(k), v))
        return tuple(out)


class ChatTemplateRequest(Body):
    """What a chat is rendered from: the chat route and /tokenize take the same fields, so a
    client's token count is the prompt its request gets."""

    messages: list[ChatMessage] = Field(max_length=1024)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=32)
    chat_template: str | None = None  # refused: only the model's own template is rendered


class ChatCompletionRequest(ChatTemplateRequest, _Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _continue_needs_assistant(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(max_length=MAX_TEXT)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string, one token list, or several of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[x for x in p if isinstance(x, int)]]
        return [x for x in p if not isinstance(x, int)]

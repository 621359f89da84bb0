"""Request bodies: OpenAI's fields plus vLLM's extras. Unknown fields are ignored, as OpenAI clients
expect; an explicit null means the field's default (the openai SDK sends null for an explicit None).
Bounds that depend on the server's settings (stop strings, n, max_tokens) are checked by the route.

The JSON schemas of these models are the OpenAPI document's request bodies, and they state what the
server accepts: every bound a validator or the route checks is written into the schema too (`Doc`
for the ones pydantic cannot derive, `setting()` for the ones a server's settings decide, filled in by
server/api/openapi.py when it builds the document)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from server.api.structured import MAX_CHOICES, ResponseFormat, StructuredOutputs
from server.api.tools import Tool, ToolCall, ToolChoice
from server.errors import RequestError
from server.lora.combination import MAX_SEED, Combination, CombinationType
from server.lora.mixing import MAX_PARTS, MAX_WEIGHT, MixPart
from server.lora.registry import MAX_NAME_LENGTH

MAX_TEXT = 200_000  # characters of one prompt or message
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # entries, OpenAI's own bound
# The key of a schema's placeholders for a server's settings: {SETTING: {"maximum": "max_n"}}
SETTING = "x-loraplex-setting"
MODEL_ID = "x-loraplex-model"  # a `model` field: the base model's id or an adapter name
ADAPTER_NAME = "x-loraplex-adapter-name"  # a new adapter's name (registry.NAME_RE)


def setting(**keywords: str) -> dict[str, Any]:
    """JSON-schema keywords whose values are settings of the server that serves the document, e.g.
    setting(maximum="max_n"); openapi.py resolves them (the names are openapi.settings_of's keys)."""
    return {SETTING: keywords}


@dataclass(frozen=True, eq=False)  # hashed by identity: typing hashes Annotated metadata
class Doc:
    """JSON-schema keywords added to a type's schema, for a bound a validator or the route enforces
    (documentation only: validation is unchanged)."""

    keywords: dict[str, Any]

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema.update(self.keywords)
        return schema


def _refused_unless(*allowed: Any) -> WithJsonSchema:
    """The schema of a field refused (400) unless it has one of these values (its defaults)."""
    return WithJsonSchema(
        {"enum": [*allowed, None], "description": "not supported: refused (400) unless absent or default"}
    )


def _document(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """Body's schema hook: an explicit null is every optional field's default, so the document says
    null is accepted; then the class's own `doc` keywords."""
    required = set(schema.get("required", ()))
    props: dict[str, dict[str, Any]] = schema.get("properties", {})
    for name, prop in props.items():
        if name in required or _accepts_null(prop):
            continue
        meta: dict[str, Any] = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        props[name] = {"anyOf": [prop, {"type": "null"}], **meta}
    schema.update(getattr(cls, "doc", {}))


def _accepts_null(prop: dict[str, Any]) -> bool:
    if prop.get("type") == "null" or None in prop.get("enum", [1]):
        return True
    return any(_accepts_null(p) for p in prop.get("anyOf", []))


class Body(BaseModel):
    """A request body: unknown fields ignored, an explicit null the field's default. Floats are
    finite: Python's JSON parser reads NaN and Infinity, which no sampling parameter survives."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True, json_schema_extra=_document)
    doc: ClassVar[dict[str, Any]] = {}  # JSON-schema keywords for the whole body (`_document`)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Annotated[str, Doc({"enum": ["text"]})]
    text: str = Field(max_length=MAX_TEXT)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "text":  # before `text` is looked for: the real reason
            raise ValueError(f"content parts of type '{kind}' are not supported: this model reads text only")
        return data


class ChatMessage(Body):
    # an assistant turn may be only tool calls; every other message needs content
    doc: ClassVar[dict[str, Any]] = {
        "if": {"properties": {"role": {"const": "assistant"}}},
        "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    }
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Annotated[str | list[ContentPart] | None, Doc({"maxItems": MAX_TEXT})] = Field(
        None, max_length=MAX_TEXT
    )
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


class AdapterPart(Body):
    """One adapter of a per-request mix (server/lora/mixing.py) and its weight."""

    name: str = Field(max_length=MAX_NAME_LENGTH, json_schema_extra={ADAPTER_NAME: True})
    scale: float = Field(1.0, gt=0.0, le=MAX_WEIGHT)


class CombinationRequest(Body):
    """How a mix's parts combine (server/lora/combination.py): PEFT's add_weighted_adapter types."""

    type: CombinationType = Field(
        "cat",
        description=(
            "cat: the exact weighted sum of the parts' deltas (rank: their ranks summed); linear, "
            "magnitude_prune, ties, dare_linear, dare_ties: PEFT's, on each LoRA factor (parts of one rank)"
        ),
    )
    density: float = Field(
        1.0, gt=0.0, le=1.0, description="fraction of each factor kept (magnitude_prune, ties, dare_*)"
    )
    majority_sign_method: Literal["total", "frequency"] = Field("total", description="ties, dare_ties")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="of DARE's random masks: one seed, one mix, rebuilt bit for bit (dare_linear, dare_ties)",
    )


TokenId = Annotated[int, Doc({"minimum": 0, **setting(maximum="vocab_max")})]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Sampling(Body):
    model: str = Field(max_length=256, json_schema_extra={MODEL_ID: True})
    # loraplex's extension: a weighted mix of adapters (then `model` is the base model's id)
    adapters: list[AdapterPart] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PARTS,
        description=(
            "mix these adapters for this request (`model` must then be the base model's id): each "
            "part's delta weighted by its scale, PEFT's add_weighted_adapter 'cat'; one part scales "
            "that adapter. The same as spelling `model` as name*scale+name*scale"
        ),
    )
    combination: CombinationRequest | None = Field(
        None, description="how the parts of a mix (`adapters`, or spelled in `model`) combine; default cat"
    )
    max_tokens: int | None = Field(None, ge=0, json_schema_extra=setting(maximum="max_tokens_limit"))
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="vLLM's: -1 or 0 disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: StopString | Annotated[list[StopString], Doc(setting(maxItems="max_stop"))] | None = Field(
        None, description="empty strings are dropped; at most max_stop strings"
    )
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, json_schema_extra=setting(maximum="max_n"))
    best_of: int | None = Field(
        None, ge=1, description="must equal n", json_schema_extra=setting(maximum="max_n")
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: Annotated[
        dict[str, Annotated[float, Doc({"minimum": -100, "maximum": 100})]] | None,
        Doc({"propertyNames": setting(pattern="token_id_pattern")}),
    ] = Field(None, max_length=MAX_LOGIT_BIAS, description="token id -> bias")
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str] | None, Doc({"minItems": 1, "maxItems": MAX_CHOICES})] = None
    guided_grammar: str | None = None
    # vLLM extras that change the output and are not implemented: refused when set to a non-default
    # value (see `refused`), so no client gets a silently different answer; the document says so
    bad_words: Annotated[list[str] | None, _refused_unless([])] = None
    allowed_token_ids: Annotated[list[int] | None, _refused_unless([])] = None
    include_stop_str_in_output: Annotated[bool, _refused_unless(False)] = False
    skip_special_tokens: Annotated[bool, _refused_unless(True)] = True
    spaces_between_special_tokens: Annotated[bool, _refused_unless(True)] = True
    truncate_prompt_tokens: Annotated[int | None, _refused_unless(0)] = None
    use_beam_search: Annotated[bool, _refused_unless(False)] = False
    prompt_logprobs: Annotated[int | None, _refused_unless(0)] = None
    functions: Annotated[list[Any] | None, _refused_unless([])] = None
    function_call: Annotated[Any, _refused_unless(False, 0, "", [], {})] = None  # any falsy value

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

    def mix_parts(self) -> list[MixPart] | None:
        """The `adapters` field as the mixing module's parts (None: absent)."""
        if self.adapters is None:
            return None
        return [MixPart(a.name, a.scale) for a in self.adapters]

    def mix_combination(self) -> Combination | None:
        """The `combination` field for the mixing module (None: absent)."""
        c = self.combination
        return None if c is None else Combination(c.type, c.density, c.majority_sign_method, c.seed)

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

    # transformers refuses an empty conversation: the document says so
    messages: Annotated[list[ChatMessage], Doc({"minItems": 1})] = Field(max_length=1024)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=32)
    # refused: only the model's own template is rendered
    chat_template: Annotated[str | None, _refused_unless()] = None


class ChatCompletionRequest(ChatTemplateRequest, _Sampling):
    messages: list[ChatMessage] = Field(
        min_length=1, max_length=1024, examples=[[{"role": "user", "content": "Hello!"}]]
    )
    max_completion_tokens: int | None = Field(
        None, ge=0, json_schema_extra=setting(maximum="max_tokens_limit")
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _continue_needs_assistant(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        return self


NonEmpty = Doc({"minItems": 1, "maxItems": MAX_TEXT})


class CompletionRequest(_Sampling):
    prompt: (
        str
        | Annotated[list[str], NonEmpty]
        | Annotated[list[TokenId], NonEmpty]
        | Annotated[list[Annotated[list[TokenId], NonEmpty]], NonEmpty]
    ) = Field(max_length=MAX_TEXT, examples=["Once upon a time"])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: Annotated[str | None, _refused_unless("")] = None

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

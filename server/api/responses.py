"""What the routes answer, as pydantic models: the bodies of the real responses (built as dicts by
the handlers and choices.py), for the OpenAPI document only. The routes declare them with
`responses=answers(...)`, never as `response_model`: a response model would re-validate and filter
what a handler returns, so a field added to a handler would silently vanish; here a drift between
handler and model is caught instead, by the fuzz test's response-schema check.

Semantics of `answers(ok, *statuses)`: the success body (JSON, text or an event stream) and, for each
error status, the OpenAI error envelope with what that status means on this server."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

# -- errors -----------------------------------------------------------------------------------------


class AdapterReport(BaseModel):
    """What an adapter_config.json asked for and what loraplex did with each key."""

    honoured: dict[str, Any]
    ignored: dict[str, str]
    refused: dict[str, str]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    report: AdapterReport | None = Field(None, description="only on invalid_adapter: the config report")


class ErrorResponse(BaseModel):
    """The OpenAI error envelope: every error this server answers, whatever its status."""

    error: ErrorDetail


# -- completions --------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; under `echo` the first prompt token has no logprob (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as JSON text (raw text when cut short)")


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class MessageToolCallDelta(MessageToolCall):
    index: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[MessageToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="with stream_options.include_usage")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    """A completion, and (with finish_reason null until the last) each event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="absent from stream events without include_usage")


# -- models and adapters ------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = Field(description="the base model's id for an adapter; null for the base")
    max_model_len: int | None = Field(None, description="the base model only")
    version: str | None = Field(None, description="adapters only: the content hash")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Adapter(BaseModel):
    object: Literal["adapter"]
    name: str
    version: str = Field(description="sha256 of the adapter's two files")
    rank: int
    target_modules: list[str]
    size_bytes: int
    created: int
    method: str = Field(
        description="the PEFT method: lora, dora, adalora, ia3, prompt_tuning, p_tuning or prefix_tuning"
    )
    saved_modules: list[str] = Field(description="base modules its modules_to_save copies replace")
    virtual_tokens: int = Field(description="positions before the prompt (prompt, P- and prefix tuning)")
    report: AdapterReport
    parent: str
    tier: Literal["device", "cpu", "disk"]
    requests: int
    prompt_tokens: int
    completion_tokens: int


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[Adapter]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"]
    version: str
    deleted: Literal[True]


# -- tokenizer and probes -----------------------------------------------------------------------------


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    chat_template: str | dict[str, str] | list[dict[str, str]] | None


class Health(BaseModel):
    status: Literal["ok", "unhealthy"]
    reason: str | None = Field(None, description="why the engine is unhealthy")


class Readiness(BaseModel):
    status: Literal["ready", "not ready", "draining"]


class Version(BaseModel):
    version: str = Field(description="loraplex's")


# -- declaring them -----------------------------------------------------------------------------------

WHY = {
    400: "Invalid request: schema, a limit of this server, the context length, a refused field",
    401: "Missing or unknown API key",
    403: "The key does not reach this route or this name",
    404: "Unknown model or adapter (or one this key may not use)",
    408: "The request body stopped arriving",
    413: "The body is larger than this server accepts",
    415: "Wrong Content-Type",
    429: "The engine's queue is full; retry after Retry-After seconds",
    503: "Draining for shutdown, or the engine stopped; retry after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
# What every route with a JSON body may answer before its handler runs (the edge and validation)
JSON_BODY = (400, 408, 413, 415)
INFERENCE = (401,)  # behind an inference key, when keys are configured
ADMIN = (401, 403)
GENERATION = (*JSON_BODY, *INFERENCE, 404, 429, 503)


def error(status: int) -> dict[str, Any]:
    # a schema, not a `model`: FastAPI would file a model under the route's media type (text/plain
    # for some), and an error is JSON on every route
    entry: dict[str, Any] = {
        "description": WHY[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    if status in (429, 503):
        entry["headers"] = RETRY_AFTER
    if status == 401:
        entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
    return entry


def answers(
    ok: type[BaseModel] | None,
    *statuses: int,
    status: int = 200,
    events: type[BaseModel] | None = None,
    text: str | None = None,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: `ok` as the success body (JSON), `events` as the schema of each
    `data:` of a text/event-stream answer (whose last event is `[DONE]`, and whose errors after the
    200 are envelopes), `text` as a text/plain body's description."""
    success: dict[str, Any] = {"description": "OK"}
    if ok is not None:
        success["model"] = ok
    if text is not None:
        success["description"] = text
        success["content"] = {"text/plain": {"schema": {"type": "string"}}}
    if events is not None:
        success["content"] = {"text/event-stream": {"schema": event_schema(events)}}
    return {status: success, **{s: error(s) for s in statuses}}


def probe(model: type[BaseModel], unwell: str) -> dict[int | str, dict[str, Any]]:
    """A probe's answers: its status body with 200, or with 503 (not an error envelope: a probe
    reports a state, and load balancers read only the status)."""
    return {200: {"model": model, "description": "OK"}, 503: {"model": model, "description": unwell}}


def event_schema(model: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI before 3.2 has `schema` describe each event of a stream): its
    `data` is `[DONE]`, or JSON text holding the model or, for an error after the 200, the envelope."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [ref, {"$ref": "#/components/schemas/ErrorResponse"}]},
                },
            }
        },
    }


# Models only an event stream refers to: FastAPI collects models from fields, so the document adds these
STREAM_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, Completion, ErrorResponse)

"""vLLM's tokenizer endpoints: `POST /tokenize` (a prompt, or messages through the model's chat
template), `POST /detokenize` and `GET /tokenizer_info`, in vLLM's shapes. Every adapter shares the
base model's tokenizer; `model` is optional, as in vLLM, and when given must name the base model
or a registered adapter (else the 404 of any other request)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Discriminator, Field, Tag

from server.api import responses
from server.api.auth import grant, require
from server.api.prompting import render_chat
from server.api.responses import INFERENCE, JSON_BODY, answers
from server.api.schemas import MODEL_ID, Body, ChatTemplateRequest, TokenId
from server.errors import RequestError
from server.runtime import Runtime

router = APIRouter(dependencies=[Depends(require("inference"))])
MAX_PROMPT_CHARS = 200_000
MAX_TOKEN_IDS = 200_000


class _Body(Body):
    model: Annotated[str, Field(json_schema_extra={MODEL_ID: True})] | None = Field(None, max_length=256)


class TokenizeCompletionRequest(_Body):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateRequest, _Body):
    """The chat route's own messages, tools and template controls: the same prompt, counted."""

    add_special_tokens: bool = False  # the chat template adds its own
    return_token_strs: bool = False


def _kind(body: Any) -> str:
    return (
        "TokenizeChatRequest"
        if isinstance(body, dict) and "messages" in body
        else "TokenizeCompletionRequest"
    )


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_kind),
]


class DetokenizeRequest(_Body):
    tokens: list[TokenId] = Field(max_length=MAX_TOKEN_IDS)


def _runtime(request: Request, model: str | None) -> Runtime:
    rt: Runtime = request.app.state.runtime
    if model is not None:
        # unknown (or another tenant's) -> 404; the tokenizer is the base's either way
        rt.resolve(model, grant(request).may_use)
    return rt


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """What `add_special_tokens` puts before and after a text (e.g. [BOS], []): found around a
    one-character probe, since tokenizers add them in their post-processor, not by a method."""
    bare = [int(i) for i in tokenizer.encode("a", add_special_tokens=False)]
    full = [int(i) for i in tokenizer.encode("a", add_special_tokens=True)]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def _chat_ids(rt: Runtime, body: TokenizeChatRequest) -> list[int]:
    ids = render_chat(rt, body)
    if body.add_special_tokens:
        before, after = _special_tokens(rt.base.tokenizer)
        ids = before + ids + after
    return ids


@router.post(
    "/tokenize", response_model=None, responses=answers(responses.Tokenized, *JSON_BODY, *INFERENCE, 404)
)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    rt = _runtime(request, body.model)
    tokenizer = rt.base.tokenizer
    if isinstance(body, TokenizeChatRequest):
        ids = _chat_ids(rt, body)
    else:
        ids = [int(i) for i in tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)]
    return {
        "count": len(ids),
        "max_model_len": rt.base.max_model_len,
        "tokens": ids,
        "token_strs": list(tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None,
    }


@router.post(
    "/detokenize",
    response_model=None,
    responses=answers(responses.Detokenized, *JSON_BODY, *INFERENCE, 404),
)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    rt = _runtime(request, body.model)
    tokenizer = rt.base.tokenizer
    vocab = len(tokenizer)
    for i, t in enumerate(body.tokens):
        if not 0 <= t < vocab:
            raise RequestError(f"tokens[{i}] = {t} is outside the vocabulary [0, {vocab})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.get("/tokenizer_info", response_model=None, responses=answers(responses.TokenizerInfo, *INFERENCE))
async def tokenizer_info(request: Request) -> dict[str, Any]:
    """The base tokenizer's special tokens and chat template (lm-evaluation-harness's remote
    tokenizer reads `eos_token` and `chat_template`). `model_max_length` is the served context."""
    rt: Runtime = request.app.state.runtime
    tokenizer = rt.base.tokenizer

    def token(name: str) -> str | None:
        value = getattr(tokenizer, name, None)
        return None if value is None else str(value)

    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": token("bos_token"),
        "eos_token": token("eos_token"),
        "pad_token": token("pad_token"),
        "unk_token": token("unk_token"),
        "model_max_length": rt.base.max_model_len,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }

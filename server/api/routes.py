"""OpenAI-compatible endpoints. Each request resolves its adapter, renders its prompt, and streams
from the engine thread; a client that goes away aborts its engine request."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine.sequence import SamplingParams
from server.runtime import Runtime

router = APIRouter()


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    rt = _runtime(request)
    ok = rt.async_engine.alive
    return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    rt = _runtime(request)
    created = int(request.app.state.started)
    data = [
        {
            "id": rt.model_id,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "root": rt.model_id,
            "parent": None,
        }
    ]
    for r in rt.registry.records():
        data.append(
            {
                "id": r.name,
                "object": "model",
                "created": created,
                "owned_by": "loraplex",
                "root": r.name,
                "parent": rt.model_id,
            }
        )
    return {"object": "list", "data": data}


def _params(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens or 256,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
    )


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _runtime(request)
    adapter = rt.resolve(body.model)
    prompt = rt.chat_prompt([m.model_dump(include={"role", "content"}) for m in body.messages])
    params = _params(body, body.max_completion_tokens or body.max_tokens)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    seq = rt.sequence(rid, prompt, params, adapter)
    return await _respond(rt, seq, body, chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _runtime(request)
    adapter = rt.resolve(body.model)
    params = _params(body, body.max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    seq = rt.sequence(rid, rt.text_prompt(body.prompt), params, adapter)
    return await _respond(rt, seq, body, chat=False)


async def _respond(
    rt: Runtime, seq: Any, body: ChatCompletionRequest | CompletionRequest, chat: bool
) -> JSONResponse | StreamingResponse:
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"
    stream = rt.async_engine.generate(seq)
    if not body.stream:
        text, reason, usage = "", None, {}
        try:
            async for out in stream:
                if out.error:
                    err = {
                        "message": out.error,
                        "type": "server_error",
                        "param": None,
                        "code": "generation_failed",
                    }
                    return JSONResponse({"error": err}, status_code=500)
                text += out.text
                reason = out.finish_reason
                usage = _usage(out.prompt_tokens, out.completion_tokens)
        finally:
            await stream.aclose()
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse(
            {
                "id": seq.request_id,
                "object": kind,
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {
                "id": seq.request_id,
                "object": f"{kind}.chunk" if chat else kind,
                "created": created,
                "model": body.model,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def choice(text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = (
                    {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                )
                return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        if chat:
            yield chunk([choice("", None, first=True)])
        last = None
        try:
            async for out in stream:
                last = out
                if out.error:
                    err = {
                        "error": {
                            "message": out.error,
                            "type": "server_error",
                            "param": None,
                            "code": "generation_failed",
                        }
                    }
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if out.text or out.finished:
                    yield chunk([choice(out.text, out.finish_reason)])
        finally:
            await stream.aclose()  # a client that went away aborts its engine request now, not at GC
        if include_usage and last is not None:
            yield chunk([], _usage(last.prompt_tokens, last.completion_tokens))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

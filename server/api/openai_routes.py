"""OpenAI-compatible inference endpoints. Each request resolves its adapter version, renders its
prompt, runs `n` engine sequences and streams or gathers them; a client that goes away aborts them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api.auth import require
from server.api.metrics import Metrics
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine.engine import RequestOutput
from server.engine.sequence import SamplingParams, Sequence
from server.errors import RequestError
from server.lora.registry import AdapterRecord
from server.runtime import Runtime

router = APIRouter(dependencies=[Depends(require("inference"))])
DEFAULT_MAX_TOKENS = 256


def _rt(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    rt = _rt(request)
    created = int(request.app.state.started)
    base = {
        "id": rt.model_id,
        "object": "model",
        "created": created,
        "owned_by": "loraplex",
        "root": rt.model_id,
        "parent": None,
        "max_model_len": rt.base.max_model_len,
    }
    data = [base]
    for r in rt.registry.records():
        data.append(
            {
                "id": r.name,
                "object": "model",
                "created": int(r.created),
                "owned_by": "loraplex",
                "root": r.name,
                "parent": rt.model_id,
                "version": r.version,
            }
        )
    return {"object": "list", "data": data}


@dataclass
class _Job:
    """One HTTP request: its n engine sequences and what the response needs to say."""

    id: str
    chat: bool
    model: str
    adapter: AdapterRecord | None
    seqs: list[Sequence]
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def _job(
    rt: Runtime,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    chat: bool,
    max_tokens: int | None,
) -> _Job:
    s = rt.settings
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise RequestError(
            f"max_tokens {max_tokens} is above this server's limit of {s.max_tokens_limit}", "max_tokens"
        )
    if body.n > s.max_n:
        raise RequestError(f"n {body.n} is above this server's limit of {s.max_n}", "n")
    adapter = rt.resolve(body.model)
    job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    seqs = []
    for i in range(body.n):
        params = SamplingParams(
            # no max_tokens: as much as fits, bounded; a prompt that fills the context fails its length check
            max_tokens=max_tokens or max(1, min(DEFAULT_MAX_TOKENS, rt.base.max_model_len - len(prompt))),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            # n seeded choices must differ from each other and still be reproducible
            seed=None if body.seed is None else (body.seed + i) % 2**63,
            stop=body.stop_strings(),
        )
        seqs.append(rt.sequence(f"{job_id}-{i}", prompt, params, adapter))
    return _Job(job_id, chat, body.model, adapter, seqs)


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _rt(request)
    prompt = rt.base.chat_ids([m.model_dump(include={"role", "content"}) for m in body.messages])
    job = _job(rt, body, prompt, True, body.max_completion_tokens or body.max_tokens)
    return await _respond(rt, request, job, body)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _rt(request)
    job = _job(rt, body, rt.text_prompt(body.prompt), False, body.max_tokens)
    return await _respond(rt, request, job, body)


async def _merged(rt: Runtime, seqs: list[Sequence]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of n sequences as they come, tagged with the choice index."""
    if len(seqs) == 1:
        stream = rt.async_engine.generate(seqs[0])
        try:
            async for out in stream:
                yield 0, out
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, seq: Sequence) -> None:
        stream = rt.async_engine.generate(seq)
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # e.g. queue full: re-raised in the request's own task
            await queue.put((i, e))
        finally:
            await stream.aclose()
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Observer:
    """Per-request timings and counters for /metrics and the adapter's usage record."""

    def __init__(self, rt: Runtime, metrics: Metrics, job: _Job) -> None:
        self.rt, self.m, self.job = rt, metrics, job
        self.first: float | None = None
        self.last: float | None = None
        self.prompt = 0
        self.completion: dict[int, int] = {}

    def output(self, i: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self.first is None:
                self.first = now
                self.m.ttft.labels(self.rt.model_id).observe(now - self.job.start)
            elif self.last is not None:
                self.m.itl.labels(self.rt.model_id).observe(now - self.last)
            self.last = now
        self.prompt = out.prompt_tokens
        self.completion[i] = out.completion_tokens
        if out.finished and out.finish_reason:
            self.m.success.labels(self.rt.model_id, out.finish_reason).inc()

    def done(self, outcome: str) -> None:
        name = self.job.adapter.name if self.job.adapter else self.rt.model_id
        completion = sum(self.completion.values())
        self.m.e2e.labels(self.rt.model_id).observe(time.perf_counter() - self.job.start)
        self.m.prompt_tokens.labels(self.rt.model_id).inc(self.prompt * len(self.job.seqs))
        self.m.generation_tokens.labels(self.rt.model_id).inc(completion)
        self.m.requests.labels(name, outcome).inc()
        if self.job.adapter is not None:
            self.rt.registry.record_usage(name, self.prompt * len(self.job.seqs), completion)

    def usage(self) -> dict[str, int]:
        prompt, completion = self.prompt, sum(self.completion.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}}


async def _respond(
    rt: Runtime, request: Request, job: _Job, body: ChatCompletionRequest | CompletionRequest
) -> JSONResponse | StreamingResponse:
    obs = _Observer(rt, request.app.state.metrics, job)
    if not body.stream:
        return await _gather(request, job, obs, rt)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": job.id,
            "object": f"{job.kind}.chunk" if job.chat else job.kind,
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    def choice(i: int, text: str, reason: str | None, first: bool = False) -> dict[str, Any]:
        if job.chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            )
            return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        return {"index": i, "text": text, "finish_reason": reason, "logprobs": None}

    # Submit now, so queue-full and engine errors become HTTP statuses rather than broken streams.
    outputs = _merged(rt, job.seqs)
    try:
        head = await anext(outputs)
    except BaseException:
        await outputs.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        outcome = "aborted"
        try:
            if job.chat:
                for i in range(len(job.seqs)):
                    yield chunk([choice(i, "", None, first=True)])
            pending: list[tuple[int, RequestOutput]] = [head]
            while pending:
                for i, out in pending:
                    obs.output(i, out)
                    if out.error:
                        outcome = "error"
                        yield f"data: {json.dumps(_failure(out.error))}\n\n"
                        return
                    if out.text or out.finished:
                        yield chunk([choice(i, out.text, out.finish_reason)])
                nxt = await anext(outputs, None)
                pending = [nxt] if nxt is not None else []
            outcome = "ok"
            if include_usage:
                yield chunk([], obs.usage())
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()  # a client that went away aborts its engine requests now
            obs.done(outcome)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _gather(request: Request, job: _Job, obs: _Observer, rt: Runtime) -> JSONResponse:
    texts = [""] * len(job.seqs)
    reasons: list[str | None] = [None] * len(job.seqs)
    outcome = "aborted"
    outputs = _merged(rt, job.seqs)
    try:
        async for i, out in outputs:
            obs.output(i, out)
            if out.error:
                outcome = "error"
                return JSONResponse(_failure(out.error), status_code=500)
            texts[i] += out.text
            reasons[i] = out.finish_reason
            if await request.is_disconnected():
                return JSONResponse(_failure("client disconnected"), status_code=499)
        outcome = "ok"
    finally:
        await outputs.aclose()
        obs.done(outcome)
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        c: dict[str, Any] = {"index": i, "finish_reason": reason, "logprobs": None}
        c.update({"message": {"role": "assistant", "content": text}} if job.chat else {"text": text})
        choices.append(c)
    return JSONResponse(
        {
            "id": job.id,
            "object": job.kind,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": obs.usage(),
        }
    )

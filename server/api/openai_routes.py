"""OpenAI-compatible inference endpoints. Each request resolves its adapter version, renders its
prompt, runs `n` engine sequences and streams or gathers them; a client that goes away aborts them."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.api import errors, prompting, responses
from server.api.auth import grant, require
from server.api.choices import Choice
from server.api.metrics import Metrics
from server.api.prompting import Prompt
from server.api.responses import INFERENCE, answers
from server.api.schemas import ChatCompletionRequest, CompletionRequest
from server.engine.engine import RequestOutput
from server.engine.sequence import Sequence
from server.errors import AdapterNotFoundError, LoraplexError, MixError, RequestError
from server.lora.registry import AdapterRecord
from server.runtime import Runtime

# How often a request still waiting for its first output checks that its client is there
DISCONNECT_POLL_SECONDS = 0.5

router = APIRouter(dependencies=[Depends(require("inference"))])


def _rt(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _base_entry(request: Request, name: str) -> dict[str, Any]:
    rt = _rt(request)
    return {
        "id": name,
        "object": "model",
        "created": int(request.app.state.started),
        "owned_by": "loraplex",
        "root": rt.model_id,
        "parent": None,
        "max_model_len": rt.base.max_model_len,
    }


def _adapter_entry(rt: Runtime, r: AdapterRecord) -> dict[str, Any]:
    return {
        "id": r.name,
        "object": "model",
        "created": int(r.created),
        "owned_by": "loraplex",
        "root": r.name,
        "parent": rt.model_id,
        "version": r.version,
    }


@router.get("/v1/models", response_model=None, responses=answers(responses.ModelList, *INFERENCE))
async def models(request: Request) -> dict[str, Any]:
    rt, may_use = _rt(request), grant(request).may_use
    data = [_base_entry(request, name) for name in rt.base_names] + [
        _adapter_entry(rt, r) for r in rt.registry.records() if may_use(r.name)
    ]
    return {"object": "list", "data": data}


@router.get(
    "/v1/models/{model_id:path}",
    response_model=None,
    responses=answers(responses.ModelCard, *INFERENCE, 404),
)
async def model(model_id: str, request: Request) -> dict[str, Any]:
    """OpenAI's retrieve: one entry of the list; an unknown id is 404 `model_not_found`."""
    rt = _rt(request)
    try:
        adapter = rt.resolve(model_id, grant(request).may_use)
    except MixError:
        # a retrieve names a model: a spelling that is no valid mix is no model here (OpenAI's 404)
        raise AdapterNotFoundError(model_id) from None
    return _base_entry(request, model_id) if adapter is None else _adapter_entry(rt, adapter)


@dataclass
class _Job:
    """One HTTP request: its engine sequences (one per choice) and what the response needs to say."""

    id: str
    chat: bool
    model: str
    adapter: AdapterRecord | None
    seqs: list[Sequence]
    choices: list[Choice]
    n: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


def _job(
    rt: Runtime,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Prompt],
    max_tokens: int | None,
    may_use: Callable[[str], bool],
) -> _Job:
    chat = isinstance(body, ChatCompletionRequest)
    prompting.check_limits(rt, body, max_tokens)
    adapter = rt.resolve(body.model, may_use, body.mix_parts(), body.mix_combination())
    spec, param = prompting.constraint_spec(body)
    echo = isinstance(body, CompletionRequest) and body.echo
    if max_tokens == 0 and not echo:
        raise RequestError("max_tokens 0 is only meaningful with echo", "max_tokens")
    if isinstance(body, CompletionRequest) and body.suffix:
        raise RequestError("suffix is not supported", "suffix")
    k = _logprobs_k(body)
    job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    seqs, choices = [], []
    for p_index, prompt in enumerate(prompts):
        # max_tokens 0 with echo: one token is computed (the engine always samples) and not shown
        limit = (
            max(1, max_tokens)
            if max_tokens is not None
            else prompting.default_max_tokens(rt, len(prompt.ids), chat)
        )
        if "max_tokens" in rt.generation_defaults:  # the checkpoint's max_new_tokens bounds all, as in vLLM
            limit = min(limit, int(rt.generation_defaults["max_tokens"]))
        for j in range(body.n):
            i = p_index * body.n + j
            params = prompting.sampling_params(
                rt,
                body,
                len(prompt.ids),
                j,
                max_tokens=limit,
                logprobs=k,
                prompt_logprobs=k if echo and k is not None else None,
            )
            seq = rt.sequence(f"{job_id}-{i}", prompt.ids, params, adapter)
            if spec is not None:
                seq.constraint = rt.grammar.compile(spec, param)
            seqs.append(seq)
            choices.append(
                Choice(
                    i,
                    chat,
                    rt.base.tokenizer,
                    prompt,
                    stream=body.stream,
                    want_logprobs=k is not None,
                    echo=echo,
                    drop_generated=max_tokens == 0,
                    tools=body.tools if isinstance(body, ChatCompletionRequest) else None,
                    choice=body.tool_choice if isinstance(body, ChatCompletionRequest) else None,
                )
            )
    # a mix answers with its canonical spelling, whichever way the request gave it; the base with
    # its first name, whichever alias the request sent (vLLM's answer)
    model = adapter.name if adapter is not None else rt.model_id
    return _Job(job_id, chat, model, adapter, seqs, choices, body.n)


def _logprobs_k(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    """How many alternatives per token the request wants; None: no logprobs at all."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


@router.post(
    "/v1/chat/completions",
    response_model=None,
    responses=answers(responses.ChatCompletion, *responses.GENERATION, events=responses.ChatCompletionChunk),
)
async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _rt(request)
    max_tokens = body.max_completion_tokens or body.max_tokens
    job = _job(rt, body, [prompting.chat_prompt(rt, body)], max_tokens, grant(request).may_use)
    return await _respond(rt, request, job, body)


@router.post(
    "/v1/completions",
    response_model=None,
    responses=answers(responses.Completion, *responses.GENERATION, events=responses.Completion),
)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    rt = _rt(request)
    job = _job(rt, body, prompting.completion_prompts(rt, body), body.max_tokens, grant(request).may_use)
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
        # each prompt counts once, whatever its n (OpenAI's usage)
        self.prompt = sum(len(c.prompt.ids) for c in job.choices[:: job.n])
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
        self.completion[i] = out.completion_tokens
        if out.finished and out.finish_reason:
            self.m.success.labels(self.rt.model_id, out.finish_reason).inc()

    def done(self, outcome: str) -> None:
        adapter = self.job.adapter
        # A mix is accounted to each of its parts, not to its spelling: weights are the client's
        # free choice, so labels and usage entries keyed by spellings would grow without bound;
        # and every part did serve the request.
        names = [adapter.name] if adapter is not None and not adapter.parts else []
        names += [part.name for part, _ in adapter.parts] if adapter is not None else []
        completion = sum(self.completion.values())
        self.m.e2e.labels(self.rt.model_id).observe(time.perf_counter() - self.job.start)
        self.m.prompt_tokens.labels(self.rt.model_id).inc(self.prompt * self.job.n)
        self.m.generation_tokens.labels(self.rt.model_id).inc(completion)
        for name in names or [self.rt.model_id]:
            self.m.requests.labels(name, outcome).inc()
        for name in names:
            self.rt.registry.record_usage(name, self.prompt * self.job.n, completion)

    def usage(self) -> dict[str, int]:
        prompt = self.prompt
        completion = sum(c.completion_tokens for c in self.job.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _ClientGone(Exception):
    """The client closed the connection before its request produced anything."""


async def _first(
    outputs: AsyncGenerator[tuple[int, RequestOutput], None], request: Request
) -> tuple[int, RequestOutput]:
    """The first output, watching the connection meanwhile. A request waits here while it is queued
    and prefilled, before any response exists to notice a disconnect; a client gone by then must
    not keep its place and later take a slot for nothing (TGI drops a queued request whose receiver
    closed). Raises _ClientGone; closing `outputs` then aborts the request in the engine."""
    task = asyncio.ensure_future(anext(outputs))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _failure(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": "generation_failed"}}


async def _respond(
    rt: Runtime, request: Request, job: _Job, body: ChatCompletionRequest | CompletionRequest
) -> JSONResponse | StreamingResponse:
    obs = _Observer(rt, request.app.state.metrics, job)
    if not body.stream:
        return await _gather(request, job, obs, rt)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # vLLM's: the usage so far in every chunk, not only in the last one
    continuous = include_usage and bool(body.stream_options and body.stream_options.continuous_usage_stats)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": job.id,
            "object": f"{job.kind}.chunk" if job.chat else job.kind,
            "created": job.created,
            "model": job.model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = obs.usage() if usage is None and continuous else usage
        return f"data: {json.dumps(payload)}\n\n"

    # Submit now, so queue-full and engine errors become HTTP statuses rather than broken streams.
    outputs = _merged(rt, job.seqs)
    try:
        head = await _first(outputs, request)
    except _ClientGone:
        await outputs.aclose()  # aborts the request while it still waits: it never takes a slot
        obs.done("aborted")
        return JSONResponse(_failure("client disconnected"), status_code=499)
    except BaseException:
        await outputs.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        outcome = "aborted"
        try:
            if job.chat:
                for c in job.choices:
                    yield chunk([c.role_chunk()])
            pending: list[tuple[int, RequestOutput]] = [head]
            while pending:
                for i, out in pending:
                    obs.output(i, out)
                    if out.error:
                        outcome = "error"
                        yield f"data: {json.dumps(_failure(out.error))}\n\n"
                        return
                    delta = job.choices[i].add(out)
                    if delta is not None:
                        yield chunk([delta])
                try:
                    nxt = await anext(outputs, None)
                except LoraplexError as e:  # e.g. the drain timed out: a terminal event, not a cut
                    outcome = "error"
                    yield errors.error_event(e)
                    return
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
    outcome = "aborted"
    outputs = _merged(rt, job.seqs)
    try:
        item: tuple[int, RequestOutput] | None = await _first(outputs, request)
        while item is not None:
            i, out = item
            obs.output(i, out)
            if out.error:
                outcome = "error"
                return JSONResponse(_failure(out.error), status_code=500)
            job.choices[i].add(out)
            if await request.is_disconnected():
                return JSONResponse(_failure("client disconnected"), status_code=499)
            item = await anext(outputs, None)
        outcome = "ok"
    except _ClientGone:  # gone while queued or prefilled: the finally aborts it before it takes a slot
        return JSONResponse(_failure("client disconnected"), status_code=499)
    finally:
        await outputs.aclose()
        obs.done(outcome)
    return JSONResponse(
        {
            "id": job.id,
            "object": job.kind,
            "created": job.created,
            "model": job.model,
            "choices": [c.final() for c in job.choices],
            "usage": obs.usage(),
        }
    )

"""Graceful drain and engine faults without a model: the real app, lifespan, AsyncEngine and
uvicorn on a thread, over a scripted stand-in for LLMEngine whose tokens flow only when the test
lets them, so requests stay in flight exactly as long as a test needs. The drain is started the
way cli.py's signal handler starts it (Drain.begin from another thread); the signals themselves
and the process exit are tests/e2e/test_drain.py's."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from server.api.app import create_app
from server.config import Settings
from server.engine.async_engine import FAULT_ENV, AsyncEngine, fault_step
from server.engine.engine import RequestOutput
from server.engine.sequence import SamplingParams, Sequence
from server.errors import DrainingError, EngineDeadError
from server.runtime import Runtime
from tests.e2e.server_proc import free_port
from tests.unit.conftest import save_char_tokenizer
from tests.unit.test_tokenize_routes import BASE_ID, FakeRegistry, load_tokenizer, tokenizer_base

TOKEN = "a"
WAIT = 30.0  # bound on every wait for the server: a broken drain fails the test instead of hanging it


class ScriptedEngine:
    """Stands in for LLMEngine under the real AsyncEngine: each step gives every request one token
    until its max_tokens. A request's first token comes at once, the others only while `flowing`
    is set. `admitted` counts requests as they reach the engine."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        self.flowing = threading.Event()
        self.admitted = threading.Semaphore(0)
        self.seqs: dict[str, tuple[Sequence, int]] = {}
        self.aborted: list[str] = []
        self.cache = SimpleNamespace(on_loaded=None, close=lambda: None)
        # non-empty: the loop never naps "waiting on an adapter load" between held steps
        self.scheduler = SimpleNamespace(running=[None])

    def add_request(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = (seq, 0)
        self.admitted.release()

    def abort(self, request_id: str) -> RequestOutput | None:
        entry = self.seqs.pop(request_id, None)
        if entry is None:
            return None
        self.aborted.append(request_id)
        seq, n = entry
        return RequestOutput(request_id, (), "", True, "abort", len(seq.prompt_token_ids), n)

    def has_work(self) -> bool:
        return bool(self.seqs)

    def step(self) -> list[RequestOutput]:
        flowing = self.flowing.wait(0.01)  # held: a short wait rather than a hot spin
        outputs = []
        for rid, (seq, n) in list(self.seqs.items()):
            if n and not flowing:
                continue
            n += 1
            done = n >= seq.params.max_tokens
            if done:
                del self.seqs[rid]
            else:
                self.seqs[rid] = (seq, n)
            reason = "length" if done else None
            outputs.append(
                RequestOutput(rid, (self.token_id,), TOKEN, done, reason, len(seq.prompt_token_ids), n)
            )
        return outputs


class ClosableRegistry(FakeRegistry):
    def close(self) -> None:  # the lifespan's end closes the registry
        pass


@dataclass
class Served:
    url: str
    app: FastAPI
    engine: ScriptedEngine
    front: AsyncEngine
    server: uvicorn.Server
    thread: threading.Thread
    stopped: threading.Event = field(default_factory=threading.Event)

    def begin_drain(self) -> None:
        """What cli.py's first SIGTERM does: drain, then let uvicorn shut down."""

        def done() -> None:
            self.server.should_exit = True
            self.stopped.set()

        assert self.app.state.drain.begin(done)

    def finish(self) -> None:
        """uvicorn's shutdown and the lifespan's end ran to completion."""
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(path)
    return load_tokenizer(path)


@contextmanager
def serve(tokenizer: Any, tmp_path: Path, **settings: Any) -> Iterator[Served]:
    engine = ScriptedEngine(int(tokenizer.convert_tokens_to_ids(TOKEN)))
    front = AsyncEngine(cast(Any, engine), max_queue=16)
    runtime = Runtime(
        settings=Settings(cache_dir=tmp_path, api_keys="", admin_keys="", store_rescan_seconds=0, **settings),
        # no model: only its vocabulary size, which sampling parameters are checked against
        base=replace(
            tokenizer_base(tokenizer),
            model=SimpleNamespace(config=SimpleNamespace(vocab_size=len(tokenizer))),
        ),
        registry=cast(Any, ClosableRegistry()),
        engine=cast(Any, engine),
        async_engine=front,
    )
    runtime.__dict__["grammar"] = None  # a cached_property: no vocabulary index to build at warm-up
    app = create_app(runtime)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-http")
    engine.flowing.set()  # the warm-up's two tokens
    thread.start()
    served = Served(f"http://127.0.0.1:{port}", app, engine, front, server, thread)
    try:
        deadline = time.monotonic() + WAIT
        while not server.started:  # uvicorn sets it once the lifespan (warm-up) is done
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        engine.flowing.clear()
        while engine.admitted.acquire(blocking=False):  # forget the warm-up's admission
            pass
        yield served
    finally:
        engine.flowing.set()
        server.should_exit = True
        thread.join(timeout=WAIT)


def chat_body(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": BASE_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@dataclass
class Stream:
    """One streamed chat request on a thread of its own; `events` are its `data:` payloads."""

    url: str
    max_tokens: int
    events: list[str] = field(default_factory=list)
    first: threading.Event = field(default_factory=threading.Event)
    status: int | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        with httpx.stream(
            "POST", f"{self.url}/v1/chat/completions", json=chat_body(self.max_tokens, True), timeout=WAIT
        ) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    if TOKEN in line:
                        self.first.set()
        self.first.set()  # also when the stream failed early: the test sees it in `events`

    def join(self) -> list[str]:
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the stream hung"
        return self.events

    def content(self) -> str:
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def drain_log(caplog: pytest.LogCaptureFixture) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain done")]
    assert len(lines) == 1, lines
    return lines[0]


def test_drain_refuses_new_requests_and_lets_running_ones_finish(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.api.app")
    with serve(tokenizer, tmp_path, drain_timeout=WAIT) as s:
        streams = [Stream(s.url, max_tokens=5) for _ in range(2)]
        for st in streams:
            assert st.first.wait(WAIT) and st.status == 200
        assert httpx.get(f"{s.url}/ready").status_code == 200
        s.begin_drain()
        ready = httpx.get(f"{s.url}/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert httpx.get(f"{s.url}/health").status_code == 200  # draining is not dead
        refused = httpx.post(f"{s.url}/v1/completions", json={"model": BASE_ID, "prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "draining" and error["type"] == "server_error"
        assert not s.stopped.is_set()  # still waiting for the two streams
        s.engine.flowing.set()
        for st in streams:
            assert st.join()[-1] == "[DONE]"
            assert st.content() == TOKEN * 5
        assert s.stopped.wait(WAIT)
        s.finish()
    assert "2 requests finished, 0 aborted" in drain_log(caplog)


def test_drain_timeout_ends_what_is_left_with_an_error(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.api.app")
    with serve(tokenizer, tmp_path, drain_timeout=0.2) as s:
        stream = Stream(s.url, max_tokens=50)
        assert stream.first.wait(WAIT)
        answer: list[httpx.Response] = []
        gathered = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(50, False), timeout=WAIT)
            )
        )
        gathered.start()
        assert s.engine.admitted.acquire(timeout=WAIT)  # the stream's
        assert s.engine.admitted.acquire(timeout=WAIT)  # the non-streamed request's
        s.begin_drain()
        events = stream.join()
        assert TOKEN in stream.content()
        assert json.loads(events[-1])["error"]["code"] == "drain_timeout"  # a terminal event, no [DONE]
        gathered.join(timeout=WAIT)
        assert answer[0].status_code == 503
        assert answer[0].json()["error"]["code"] == "drain_timeout"
        assert s.stopped.wait(WAIT)
        s.finish()
        assert not s.engine.seqs and len(s.engine.aborted) == 2  # their sequences left the engine
    assert "0 requests finished, 2 aborted" in drain_log(caplog)


def test_an_idle_server_drains_at_once(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.api.app")
    with serve(tokenizer, tmp_path, drain_timeout=WAIT) as s:
        s.begin_drain()
        assert s.stopped.wait(WAIT)
        s.finish()
    assert "0 requests finished, 0 aborted" in drain_log(caplog)


def test_an_engine_fault_fails_the_requests_and_the_probes(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up takes steps 1 and 2; step 3 is the first of the stream's, and raises."""
    monkeypatch.setenv(FAULT_ENV, "step:3")
    with serve(tokenizer, tmp_path) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        stream = Stream(s.url, max_tokens=50)
        error = json.loads(stream.join()[-1])["error"]
        assert "injected fault in step 3" in error["message"]
        assert not s.front.alive and isinstance(s.front.error, RuntimeError)
        health = httpx.get(f"{s.url}/health")
        assert health.status_code == 503 and health.json()["reason"] == "engine stopped"
        assert httpx.get(f"{s.url}/ready").status_code == 503
        refused = httpx.post(f"{s.url}/v1/chat/completions", json=chat_body(5, True))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"


@pytest.mark.parametrize(("value", "step"), [(None, None), ("", None), ("step:1", 1), ("step:40", 40)])
def test_fault_hook_values(value: str | None, step: int | None) -> None:
    assert fault_step(value) == step


@pytest.mark.parametrize("value", ["step", "step:0", "step:-1", "step:x", "forward:3"])
def test_a_malformed_fault_hook_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=FAULT_ENV):
        fault_step(value)


def test_fail_all_ends_streams_and_refuses_later_requests(tokenizer: Any) -> None:
    engine = ScriptedEngine(int(tokenizer.convert_tokens_to_ids(TOKEN)))
    front = AsyncEngine(cast(Any, engine), max_queue=4)
    front.start()

    def make() -> Exception:
        return DrainingError("drained", code="drain_timeout")

    def seq(rid: str) -> Sequence:
        return Sequence(rid, [5, 6], SamplingParams(max_tokens=50, temperature=0.0))

    async def scenario() -> None:
        stream = front.generate(seq("a"))
        first = await anext(stream)
        assert first.token_ids and not first.finished
        assert front.fail_all(make) == 1
        with pytest.raises(DrainingError) as raised:
            await anext(stream)
        assert raised.value.code == "drain_timeout"
        with pytest.raises(DrainingError):
            await anext(front.generate(seq("b")))

    try:
        asyncio.run(scenario())
        deadline = time.monotonic() + WAIT
        while engine.seqs:  # the abort reaches the engine through its inbox
            assert time.monotonic() < deadline, "the aborted sequence stayed in the engine"
            time.sleep(0.01)
        assert engine.aborted == ["a"] and front.alive  # a drain ends requests, not the engine
    finally:
        front.shutdown()

    async def after_shutdown() -> None:
        await anext(front.generate(seq("c")))

    with pytest.raises(EngineDeadError):
        asyncio.run(after_shutdown())

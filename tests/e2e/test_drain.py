"""Shutdown and engine faults of the real `loraplex serve` process: SIGTERM drains (in-flight
streams finish, new requests get 503, exit 0, the counts logged), a drain that times out ends the
rest with an error event, a second signal exits at once, and an injected engine fault
(LORAPLEX_TEST_FAULT, test-only) fails the requests and exits with status 3 rather than hanging."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engine.async_engine import EXIT_ENGINE_FAULT, FAULT_ENV
from tests.e2e.server_proc import BASE_ID, ServerProc

pytestmark = pytest.mark.e2e
ARGS = ["--max-model-len", "512", "--log-level", "info"]
WAIT = 120.0  # bound on every wait: a broken shutdown fails the test instead of hanging it


def server(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> ServerProc:
    return ServerProc(tmp_path / "store", args=[*ARGS, *args], env=env or {}).start()


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {
        "model": BASE_ID,
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # exactly max_tokens: each stream runs as long as the test needs
        "temperature": 0,
        "stream": True,
    }


@dataclass
class Stream:
    """One streamed chat request on a thread of its own; `events` are its `data:` payloads and
    `first` is set once content arrived (the request is running in the engine)."""

    url: str
    max_tokens: int
    events: list[str] = field(default_factory=list)
    first: threading.Event = field(default_factory=threading.Event)
    broken: httpx.HTTPError | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            body = chat_body(self.max_tokens)
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=WAIT) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        if '"content": "' in line and '"content": ""' not in line:
                            self.first.set()
        except httpx.HTTPError as e:  # the server went away mid-stream (the second-signal test)
            self.broken = e
        finally:
            self.first.set()  # a stream that failed early must not leave the test waiting

    def join(self) -> list[str]:
        self.thread.join(timeout=WAIT)
        assert not self.thread.is_alive(), "the stream hung"
        return self.events

    def completion_tokens(self) -> int:
        """Tokens streamed, counted as chunks with content (one token each, or close to it)."""
        chunks = [json.loads(e) for e in self.events if e != "[DONE]"]
        return sum(1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content"))


def wait_exit(proc: ServerProc, timeout: float = WAIT) -> int:
    assert proc.proc is not None
    process, proc.proc = proc.proc, None  # ours to reap: ServerProc.stop must not signal it again
    return process.wait(timeout=timeout)


def test_sigterm_drains_running_streams_and_refuses_new_requests(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The drain waits as long as the streams need (WAIT): on a busy CI machine 3 x 150 tokens
    # outlasted the default 30 s, and the test is about finishing, not about the clock.
    proc = server(tmp_path, "--drain-timeout", str(int(WAIT)))
    try:
        streams = [Stream(proc.url, max_tokens=150) for _ in range(3)]
        for s in streams:
            assert s.first.wait(WAIT)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        ready = httpx.get(f"{proc.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        refused = httpx.post(f"{proc.url}/v1/chat/completions", json=chat_body(5), timeout=10)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "draining"
        assert all(s.thread.is_alive() for s in streams), "the 503s must come while the streams run"
        for s in streams:
            assert s.join()[-1] == "[DONE]"
            assert s.completion_tokens() > 100  # ran to its end, not cut short
        assert wait_exit(proc) == 0
    finally:
        proc.stop(check=False)
    assert "3 requests finished, 0 aborted" in capfd.readouterr().err


def test_drain_timeout_ends_a_long_stream_with_an_error_event(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    proc = server(tmp_path, "--drain-timeout", "1")
    try:
        stream = Stream(proc.url, max_tokens=400)
        assert stream.first.wait(WAIT)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        error = json.loads(stream.join()[-1])["error"]
        assert error["code"] == "drain_timeout" and error["type"] == "server_error"
        assert wait_exit(proc) == 0
    finally:
        proc.stop(check=False)
    assert "0 requests finished, 1 aborted" in capfd.readouterr().err


def test_a_second_signal_exits_at_once(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    proc = server(tmp_path)  # the default drain timeout (30 s) would outlast this test's wait
    try:
        stream = Stream(proc.url, max_tokens=400)
        assert stream.first.wait(WAIT)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        # the first signal was handled (two pending signals of one kind would count as one)
        assert httpx.get(f"{proc.url}/ready", timeout=10).status_code == 503
        proc.proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, timeout=15) == 128 + signal.SIGTERM
        stream.join()  # its connection went with the process: no hang
        assert stream.broken is not None and "[DONE]" not in stream.events
    finally:
        proc.stop(check=False)
    assert "second signal (SIGTERM)" in capfd.readouterr().err


def test_an_engine_fault_fails_the_stream_and_exits_for_a_restart(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The warm-up takes steps 1-2; step 10 falls in the middle of the stream's 100 tokens.
    proc = server(tmp_path, env={FAULT_ENV: "step:10"})
    try:
        stream = Stream(proc.url, max_tokens=100)
        error = json.loads(stream.join()[-1])["error"]
        assert "injected fault in step 10" in error["message"]
        # From the fault to the exit, a dead engine never answers 200
        while True:
            try:
                health = httpx.get(f"{proc.url}/health", timeout=10)
                ready = httpx.get(f"{proc.url}/ready", timeout=10)
            except httpx.TransportError:
                break  # the process is gone (or going): the supervisor's turn
            assert health.status_code == 503 and ready.status_code == 503, health.text
            time.sleep(0.1)  # pacing the probes, not synchronization
        assert wait_exit(proc, timeout=30) == EXIT_ENGINE_FAULT
    finally:
        proc.stop(check=False)
    assert "engine fault" in capfd.readouterr().err

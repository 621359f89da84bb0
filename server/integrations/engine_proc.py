"""One `loraplex serve` child process on loopback, and HTTP forwarding to it (no Ray imports here).

Why a child and not the engine in-process: the engine loop wants the main thread (the README
measures 1.8x slower CPU steps off it) and Serve runs user code off the main thread; the child also
reuses the whole tested HTTP server (auth, limits, errors, metrics) unchanged. The cost is one
loopback hop per request."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger("loraplex.ray")

# Hop-by-hop headers (RFC 9110 7.6.1) and those the next hop recomputes. The child's x-request-id
# is dropped because it echoes the id Serve's proxy sent in, and the proxy appends that id itself.
_REQUEST_DROP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
)
_RESPONSE_DROP = frozenset(
    {"content-length", "connection", "keep-alive", "transfer-encoding", "date", "server", "x-request-id"}
)
REPLICA_HEADER = "x-loraplex-replica"
Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class Call:
    """An HTTP request as the ingress received it; `target` is path plus query string."""

    method: str
    target: str
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Head:
    """Status line and headers of a reply; a streamed reply yields this first, then bytes."""

    status: int
    headers: Headers


@dataclass(frozen=True)
class Reply:
    head: Head
    body: bytes


class EngineDownError(RuntimeError):
    """The child exited or its /health is not 200 (Serve then replaces the replica)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float, log_tail: Callable[[], str] | None = None
) -> None:
    """Block until `url`/ready answers 200 (a server started as `proc`, outside Ray: benchmarks and
    tests). RuntimeError when the process exits first, TimeoutError after `timeout` seconds; both
    carry `log_tail()`."""

    def tail() -> str:
        return log_tail() if log_tail is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up\n{tail()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise TimeoutError(f"server did not become ready in {timeout:.0f}s\n{tail()}")


def error_reply(status: int, message: str, code: str, type_: str = "server_error") -> Reply:
    """An error in the OpenAI envelope, for failures that have no child answer to pass through."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    headers = [("content-type", "application/json"), ("retry-after", "1")]
    return Reply(Head(status, headers), json.dumps(body).encode())


KEY_VARS = ("LORAPLEX_API_KEYS", "LORAPLEX_ADMIN_KEYS", "LORAPLEX_KEYS", "LORAPLEX_KEYS_FILE")


def with_internal_key(env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The child's environment and a key for the replica's own calls (warm-up, model list). When
    any key is configured, a fresh random inference key is added to the child's LORAPLEX_API_KEYS:
    the configured ones may be sha256 digests only (a keys document), and the replica should not
    borrow a tenant's. With none configured the child is open and no key is needed."""
    if not any(env.get(var, "").strip() for var in KEY_VARS):
        return env, None
    key = "sk-replica-" + secrets.token_urlsafe(32)
    keys = ",".join(k for k in (env.get("LORAPLEX_API_KEYS", "").strip(), key) if k)
    return {**env, "LORAPLEX_API_KEYS": keys}, key


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the replica's thread that started it dies,
    so a replica killed without a graceful stop (SIGKILL, OOM) leaves no engine behind (Linux)."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: __del__ alone stops it
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class EngineProcess:
    """Semantics: `start` spawns `python -m server serve --host 127.0.0.1 --port P --adapters-dir D
    *serve_args` with this process's stdout/stderr (so its log lands in the replica's log);
    `wait_ready` returns once /ready is 200 and raises EngineDownError if the child exits first;
    `forward`/`stream` relay one request and never raise for a dead child (they answer 503
    `engine_unavailable`); `terminate` stops it with SIGTERM, then SIGKILL after `grace_s`."""

    def __init__(self, adapters_dir: Path | None, serve_args: Sequence[str], env: dict[str, str]) -> None:
        self.adapters_dir = adapters_dir
        self.serve_args = list(serve_args)
        self.env, key = with_internal_key({**os.environ, **env, "PYTHONUNBUFFERED": "1"})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._auth = {"authorization": f"Bearer {key}"} if key else {}
        # LLM replies may take minutes: only connecting is bounded. No pool limit: Serve's
        # max_ongoing_requests already bounds what one replica has in flight.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if self.adapters_dir is not None:  # else the child's default store (one machine only)
            cmd += ["--adapters-dir", str(self.adapters_dir)]
        cmd += self.serve_args
        log.info("starting engine child: %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, env=self.env, preexec_fn=_die_with_parent)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rc = self.exited()
            if rc is not None:
                raise EngineDownError(f"engine child exited with {rc} during start-up")
            try:
                if (await self._client.get(f"{self.url}/ready", timeout=5.0)).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.5)
        raise EngineDownError(f"engine child not ready after {timeout_s:.0f}s")

    async def check_health(self) -> None:
        rc = self.exited()
        if rc is not None:
            raise EngineDownError(f"engine child (pid {self.pid}) exited with {rc}")
        try:
            r = await self._client.get(f"{self.url}/health", timeout=10.0)
        except httpx.TransportError as e:
            raise EngineDownError(f"engine child /health unreachable: {e!r}") from e
        if r.status_code != 200:
            raise EngineDownError(f"engine child /health answered {r.status_code}: {r.text[:200]}")

    async def warm(self, model: str) -> int:
        """One greedy token for `model`: the child loads the adapter into a slot. The status code."""
        body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
        r = await self._client.post(f"{self.url}/v1/completions", json=body, headers=self._auth)
        return r.status_code

    async def base_model_ids(self) -> frozenset[str]:
        """The base model's ids (--served-model-name's first name and its aliases)."""
        r = await self._client.get(f"{self.url}/v1/models", headers=self._auth)
        r.raise_for_status()
        return frozenset(str(m["id"]) for m in r.json()["data"] if m.get("parent") is None)

    def _request(self, call: Call) -> httpx.Request:
        headers = [(k, v) for k, v in call.headers if k.lower() not in _REQUEST_DROP]
        return self._client.build_request(
            call.method, self.url + call.target, headers=headers, content=call.body
        )

    @staticmethod
    def _head(r: httpx.Response, extra: Headers) -> Head:
        kept = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in _RESPONSE_DROP]
        return Head(r.status_code, kept + extra)

    def _unavailable(self, e: Exception) -> Reply:
        log.warning("engine child unreachable: %r", e)
        why = f"exited with {self.exited()}" if self.exited() is not None else "unreachable"
        return error_reply(503, f"this replica's engine is {why}; retry", "engine_unavailable")

    async def forward(self, call: Call, extra: Headers) -> Reply:
        try:
            r = await self._client.send(self._request(call), stream=True)
            try:
                body = b"".join([chunk async for chunk in r.aiter_raw()])
            finally:
                await r.aclose()
        except httpx.TransportError as e:
            bad = self._unavailable(e)
            return Reply(Head(bad.head.status, bad.head.headers + extra), bad.body)
        return Reply(self._head(r, extra), body)

    async def stream(self, call: Call, extra: Headers) -> AsyncIterator[Head | bytes]:
        """Yields the Head, then the raw body chunks as the child sends them (SSE events)."""
        try:
            r = await self._client.send(self._request(call), stream=True)
        except httpx.TransportError as e:
            bad = self._unavailable(e)
            yield Head(bad.head.status, bad.head.headers + extra)
            yield bad.body
            return
        try:  # a cancelled consumer (client gone) closes the child's stream: the child aborts it
            yield self._head(r, extra)
            async for chunk in r.aiter_raw():
                yield chunk
        finally:
            await r.aclose()

    def terminate(self, grace_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # the server's SIGTERM path: finish, stop the engine loop, exit 0
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

"""What the hostile-input catalogue is made of (tests/e2e/test_hostile_inputs.py runs it): a case
says what to send and what must come back; Ctx is what a case can use; Reply is one answer, read
over httpx or over a raw socket (for what no well-behaved client sends)."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, headers

ADAPTER = "persona"  # the valid adapter every case's neighbour request runs on
HEADER_TIMEOUT = 2.0  # the catalogue server's --header-timeout and --body-timeout
BODY_TIMEOUT = 2.0
SLACK = 10.0  # on top of a timeout: a loaded CI machine is slow, but a hang is not a slow answer
MAX_UPLOAD = 2 << 20  # fits the valid adapter (about 0.9 MiB), and not twice it
MAX_REQUEST = 1 << 20
ANY = object()  # a case that does not pin `param`
TIMEOUT = 120.0


@dataclass
class Ctx:
    url: str
    port: int
    store: Path
    log: Path
    config: bytes  # the valid adapter's files
    weights: bytes

    def post(
        self, path: str, key: str | None = API_KEY, extra: dict[str, str] | None = None, **kw: Any
    ) -> Reply:
        sent = headers(key) | (extra or {})
        return Reply.of(httpx.post(f"{self.url}{path}", headers=sent, timeout=TIMEOUT, **kw))

    def chat(self, **body: Any) -> Reply:
        base = {
            "model": BASE_ID,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "temperature": 0,
        }
        return self.post("/v1/chat/completions", json=base | body)

    def raw_json(self, path: str, body: bytes, key: str | None = API_KEY) -> Reply:
        return self.post(path, key, {"Content-Type": "application/json"}, content=body)

    def upload(
        self,
        name: str | None = "hostile",
        config: bytes | None = None,
        weights: bytes | None = None,
        files: dict[str, tuple[str, bytes]] | None = None,
    ) -> Reply:
        """POST /v1/adapters: the valid files unless replaced (`files` replaces every part)."""
        parts = files if files is not None else {
            "adapter_config.json": ("adapter_config.json", self.config if config is None else config),
            "adapter_model.safetensors": (
                "adapter_model.safetensors", self.weights if weights is None else weights
            ),
        }  # fmt: skip
        data = {"name": name} if name is not None else {}
        return self.post("/v1/adapters", ADMIN_KEY, data=data, files=parts)

    def tokenize_chat(self, content: str) -> list[int]:
        r = httpx.post(
            f"{self.url}/tokenize",
            json={"model": BASE_ID, "messages": [{"role": "user", "content": content}]},
            headers=headers(API_KEY),
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        tokens: list[int] = r.json()["tokens"]
        return tokens


@dataclass
class Reply:
    """An answer: status 0 when the server closed the connection without one."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # raw exchanges: from the last byte sent to the answer or the close
    mark: int = 0  # a position in the server's log, for a check that reads what the case logged

    @classmethod
    def of(cls, r: httpx.Response) -> Reply:
        return cls(r.status_code, r.content, {k.lower(): v for k, v in r.headers.items()})

    def json(self) -> Any:
        return json.loads(self.body)


def parse_http(data: bytes) -> Reply:
    """The first response in `data` (status line, headers, a Content-Length body)."""
    if not data:
        return Reply(0)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    hdrs = {k.strip().lower(): v.strip() for k, v in fields.items()}
    return Reply(status, rest[: int(hdrs.get("content-length", len(rest)))], hdrs)


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took; fails past `limit`."""
    start, data = time.monotonic(), b""
    while True:
        left = limit - (time.monotonic() - start)
        assert left > 0, f"the server kept the connection open for more than {limit:g}s"
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def exchange(ctx: Ctx, data: bytes, limit: float = SLACK, half_close: bool = False) -> Reply:
    """Send raw bytes and read until the server closes (within `limit` seconds)."""
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=limit) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer, seconds = read_until_closed(sock, limit)
    reply = parse_http(answer)
    reply.seconds = seconds
    return reply


def first_answer(ctx: Ctx, data: bytes) -> Reply:
    """Send raw bytes and read the first response only (the connection may stay open)."""
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=SLACK) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            reply = parse_http(answer) if b"\r\n\r\n" in answer else None
            if reply is not None and len(reply.body) >= int(reply.headers.get("content-length", 0)):
                return reply
            chunk = sock.recv(65536)
            if not chunk:
                return parse_http(answer)
            answer += chunk


def head(method: str, path: str, extra: dict[str, str] | None = None, key: str | None = API_KEY) -> bytes:
    """A request head as bytes, for raw exchanges."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"Authorization: Bearer {key}"] if key else []
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Case:
    """One kind of hostile input: `send` it, expect `status` and, for an error, the OpenAI envelope
    with `code` (and `param`, unless ANY). `check` asserts what else the kind needs."""

    send: Callable[[Ctx], Reply]
    status: int
    code: str | None = None
    param: object = ANY
    check: Callable[[Ctx, Reply], None] | None = None

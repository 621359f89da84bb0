"""The hostile-input catalogue (issue 12, item 5): one real server, and every kind of hostile input
in tests/e2e/hostile_{uploads,requests,connections}.py sent to it in turn. Each case asserts its
status and error envelope; after each, nothing else may have changed: the adapter store's bytes,
/health, and a neighbour's greedy request, which must still give the tokens it gave before any
case ran. Once, a long greedy stream runs while every upload case is sent, and must match its
solo run token for token. The server log is checked too: no case may leave a traceback or a 5xx."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.hostile import (
    ADAPTER,
    ANY,
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    MAX_REQUEST,
    MAX_UPLOAD,
    Case,
    Ctx,
    Reply,
)
from tests.e2e.hostile_connections import CONNECTIONS
from tests.e2e.hostile_requests import REQUESTS
from tests.e2e.hostile_uploads import UPLOADS
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, ServerProc, headers

pytestmark = pytest.mark.e2e
CATALOGUE = {"uploads": UPLOADS, "requests": REQUESTS, "connections": CONNECTIONS}
MIN_KINDS = 50  # the floor; the README quotes len(ALL)
ALL = [p for params in CATALOGUE.values() for p in params]
ENVELOPE = {"message", "type", "param", "code"}
# the neighbour: short, greedy, on the valid adapter
REFERENCE = {
    "model": ADAPTER,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}
LONG_TOKENS = 48
# a 5xx in the access log, or a traceback, anywhere in what a case logged
SERVER_FAULT = re.compile(r"Traceback|loraplex\.access: \S+ .* 5\d\d [\d.]+ms$", re.MULTILINE)


@dataclass
class Hostile:
    ctx: Ctx
    reference: str  # the neighbour's text before any case ran
    long_reference: list[str]  # the long stream's deltas, run alone


def digest(store: Path) -> str:
    """A hash of the store's content: every file's path and bytes, except this process's staging
    area and pins (its own bookkeeping, touched by rescans and requests)."""
    h = hashlib.sha256()
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store)
        if rel.parts[0] in ("staging", "pins") or not path.is_file():
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def neighbour(url: str) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json=REFERENCE, headers=headers(API_KEY), timeout=300)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def long_stream(url: str) -> Iterator[str]:
    """The deltas of a long greedy stream on the valid adapter (a fixed length: EOS is ignored)."""
    body = REFERENCE | {"max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=300
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    yield choices[0]["delta"]["content"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path]) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    src = adapter_dirs["qv-r4"]
    server = ServerProc(
        root / "store",
        args=[
            "--max-upload-bytes", str(MAX_UPLOAD),
            "--max-request-bytes", str(MAX_REQUEST),
            "--header-timeout", str(HEADER_TIMEOUT),
            "--body-timeout", str(BODY_TIMEOUT),
            "--log-level", "info",  # the access log is part of what is checked
        ],
        env={
            "LORAPLEX_API_KEYS": API_KEY,
            "LORAPLEX_ADMIN_KEYS": ADMIN_KEY,
            # One OpenMP thread: the catalogue's requests are tiny and one at a time, and on a busy
            # machine a second thread's spin-waits made each neighbour request 8x slower
            # (64 s against 8 s for 8 tokens, measured beside other test runs)
            "OMP_NUM_THREADS": "1",
        },
        log=root / "server.log",
    )  # fmt: skip
    with server:
        ctx = Ctx(
            url=server.url,
            port=server.port,
            store=server.store,
            log=root / "server.log",
            config=(src / "adapter_config.json").read_bytes(),
            weights=(src / "adapter_model.safetensors").read_bytes(),
        )
        assert ctx.upload(ADAPTER).status == 201
        yield Hostile(ctx, neighbour(server.url), list(long_stream(server.url)))


def assert_answer(case: Case, reply: Reply) -> None:
    assert reply.status == case.status, (reply.status, reply.body[:500])
    if case.code is None:
        if reply.status:
            assert "error" not in reply.json()
        return
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) >= ENVELOPE and isinstance(error["message"], str) and error["message"], error
    assert error["code"] == case.code, error
    if case.param is not ANY:
        assert error["param"] == case.param, error


@pytest.mark.parametrize("case", ALL)
def test_hostile_input(hostile: Hostile, case: Case) -> None:
    ctx = hostile.ctx
    before, mark = digest(ctx.store), ctx.log.stat().st_size
    reply = case.send(ctx)
    assert_answer(case, reply)
    if case.check is not None:
        case.check(ctx, reply)
    # nothing else changed
    assert digest(ctx.store) == before, "the store changed"
    assert httpx.get(f"{ctx.url}/health", timeout=60).status_code == 200
    assert neighbour(ctx.url) == hostile.reference, "a neighbour's greedy tokens changed"
    logged = ctx.log.read_bytes()[mark:].decode(errors="replace")
    assert not SERVER_FAULT.search(logged), logged[-3000:]


@pytest.mark.slow
def test_uploads_do_not_disturb_a_running_stream(hostile: Hostile) -> None:
    """Every upload case, sent while a long greedy stream runs on the valid adapter: the stream's
    tokens are its solo run's, and uploads finished while it was still running."""
    ctx = hostile.ctx
    cases: list[Any] = [p.values[0] for p in UPLOADS]
    replies: list[Reply] = []
    finished: list[float] = []

    def send_all() -> None:
        for case in cases:
            replies.append(case.send(ctx))
            finished.append(time.monotonic())

    stream = long_stream(ctx.url)
    deltas = [next(stream)]  # the stream is running: its first token is out
    sender = threading.Thread(target=send_all)
    sender.start()
    deltas += list(stream)
    ended = time.monotonic()
    sender.join()
    assert deltas == hostile.long_reference
    assert [r.status for r in replies] == [c.status for c in cases]
    assert finished[0] < ended, "no upload overlapped the stream"


def test_the_catalogue_has_at_least_50_kinds() -> None:
    ids = [p.id for p in ALL]
    assert len(ids) == len(set(ids)), "two cases share an id"
    assert len(ids) >= MIN_KINDS, len(ids)
    assert all(params for params in CATALOGUE.values()), "a category is empty"
    assert all(isinstance(p.values[0], Case) for p in ALL)

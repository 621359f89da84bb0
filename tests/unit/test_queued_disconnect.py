"""A client that goes away while its request still waits for its first output (queued, or
prefilling) aborts the request there, streamed or not: it must not keep its place and later take
a slot for nothing (TGI drops a queued request whose receiver closed). Found by the soak: 60-odd
clients cut at once left their queued requests to be scheduled, prefilled and only then aborted.
Over the drain tests' harness: the real app, AsyncEngine and uvicorn, a scripted engine that gives
no output until told."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from server.engine.engine import RequestOutput
from tests.unit.conftest import save_char_tokenizer
from tests.unit.test_drain import WAIT, chat_body, serve
from tests.unit.test_tokenize_routes import load_tokenizer


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(path)
    return load_tokenizer(path)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_a_client_gone_while_its_request_waits_aborts_it(
    char_tokenizer: Any, tmp_path: Any, stream: bool
) -> None:
    with serve(char_tokenizer, tmp_path) as served:
        engine = served.engine
        released = threading.Event()
        step = engine.step

        def held() -> list[RequestOutput]:  # admitted, but no output yet: as in a full batch
            if released.is_set():
                return step()
            time.sleep(0.01)
            return []

        engine.step = held  # type: ignore[method-assign]
        try:
            body = json.dumps(chat_body(4, stream=stream)).encode()
            url = urlsplit(served.url)
            with socket.create_connection((url.hostname, url.port), timeout=WAIT) as sock:
                head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                sock.sendall(head.encode() + body)
                assert engine.admitted.acquire(timeout=WAIT), "the request never reached the engine"
            # the client is gone, and its request has produced nothing
            deadline = time.monotonic() + WAIT
            while not engine.aborted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(engine.aborted) == 1, "the waiting request outlived its client"
            assert not engine.seqs
        finally:
            released.set()

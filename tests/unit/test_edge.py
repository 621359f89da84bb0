"""EdgeMiddleware on its own, with a stub app and hand-driven receive/send: the body's deadline,
a body cut short, JSON the routes must never see, doubled framing, oversized heads, and an access
log that escapes what the client chose (server/api/edge.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

from server.api.auth import KeyRing
from server.api.edge import EdgeMiddleware, printable
from server.api.http_protocol import MAX_HEAD_BYTES

Message = dict[str, Any]
received: list[bool] = []  # one entry per receive() the middleware made in the last run


def scope(method: str = "POST", path: str = "/v1/chat/completions", **extra: str) -> dict[str, Any]:
    hdrs = {"content-type": "application/json", **extra}
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
    }


def run(
    sc: dict[str, Any], chunks: list[Message | None], body_timeout: float = 0.05, keys: KeyRing | None = None
) -> tuple[list[Message], list[bytes]]:
    """Drive the middleware: `chunks` are what receive() returns in turn (None: never returns).
    Returns what was sent and the bodies the app read."""
    sent: list[Message] = []
    seen: list[bytes] = []
    received.clear()

    async def app(_: Any, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        received.append(True)
        chunk = chunks.pop(0) if chunks else None
        if chunk is None:
            await asyncio.sleep(3600)
        assert chunk is not None
        return chunk

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    edge = EdgeMiddleware(
        app, max_request_bytes=1024, max_upload_bytes=4096, body_timeout=body_timeout, keys=keys
    )
    asyncio.run(edge(sc, receive, send))
    return sent, seen


def answer(sent: list[Message]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), dict(start["headers"])


def chunk(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


def test_a_stalled_json_body_is_a_408_that_closes_the_connection() -> None:
    status, body, headers = answer(run(scope(), [chunk(b'{"mo', more=True), None])[0])
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert headers[b"connection"] == b"close"


def test_a_stalled_upload_raises_inside_the_route() -> None:
    from server.api.edge import RequestTimeoutError

    sc = scope(path="/v1/adapters", **{"content-type": "multipart/form-data; boundary=x"})
    with pytest.raises(RequestTimeoutError):
        run(sc, [chunk(b"--x", more=True), None])


def test_a_body_cut_short_is_a_client_error() -> None:
    sent, seen = run(scope(), [chunk(b'{"a": ', more=True), {"type": "http.disconnect"}])
    status, body, _ = answer(sent)
    assert status == 400 and body["error"]["code"] == "incomplete_body" and not seen


def test_chunks_within_the_deadline_reach_the_app() -> None:
    sent, seen = run(scope(), [chunk(b'{"a": ', more=True), chunk(b"1}")])
    assert answer(sent)[0] == 200 and seen == [b'{"a": 1}']


@pytest.mark.parametrize(
    "raw",
    [b"[" * 300 + b"]" * 300, b'{"a": "\\ud800"}', b'{"a": "\xff"}', b'{"a": '],
    ids=["deep", "lone-surrogate", "invalid-utf8", "truncated"],
)
def test_json_the_routes_must_not_see_is_refused_here(raw: bytes) -> None:
    sent, seen = run(scope(), [chunk(raw)])
    status, body, _ = answer(sent)
    assert status == 400 and body["error"]["code"] == "invalid_json" and not seen


def test_both_framings_are_refused_and_close_the_connection() -> None:
    sent, seen = run(scope(**{"content-length": "5", "transfer-encoding": "chunked"}), [chunk(b"{}")])
    status, body, headers = answer(sent)
    assert status == 400 and body["error"]["code"] == "ambiguous_length" and not seen
    assert headers[b"connection"] == b"close"


KEYS = KeyRing(["inference-key-0123456789"], ["admin-key-0123456789"])


@pytest.mark.parametrize(
    ("extra", "raw"),
    [
        ({}, b'{"model": "x"}'),
        ({"content-type": "text/plain"}, b"hello"),
        ({"content-length": str(10**9)}, b"{}"),
        ({}, b'{"a": '),
        ({"authorization": "Bearer wrong-key-0123456789"}, b"[" * 300),
        ({"authorization": "Basic aW5mZXJlbmNlLWtleQ=="}, b"{}"),
    ],
    ids=["no-key", "wrong-media-type", "oversized", "malformed-json", "wrong-key", "not-bearer"],
)
def test_a_body_without_a_valid_key_is_a_401_before_it_is_read(extra: dict[str, str], raw: bytes) -> None:
    """The key is checked before the media type, the size and the JSON: a client without one gets
    the same 401 whatever it sent, and the body is never received."""
    sent, seen = run(scope(**extra), [chunk(raw)], keys=KEYS)
    status, body, headers = answer(sent)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "authentication_error" and headers[b"www-authenticate"] == b"Bearer"
    assert not received and not seen


@pytest.mark.parametrize("key", ["inference-key-0123456789", "admin-key-0123456789"])
def test_a_valid_key_passes_to_the_usual_checks(key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    assert answer(run(scope(**auth), [chunk(b'{"a": 1}')], keys=KEYS)[0])[0] == 200
    status, body, _ = answer(
        run(scope(**auth, **{"content-type": "text/plain"}), [chunk(b"x")], keys=KEYS)[0]
    )
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    # a GET has no body to protect: its route's own dependency answers (the stub app here)
    assert answer(run(scope("GET", "/v1/models"), [chunk(b"")], keys=KEYS)[0])[0] == 200


def test_an_oversized_head_is_a_431() -> None:
    sent, _ = run(scope("GET", "/health", authorization="Bearer " + "k" * MAX_HEAD_BYTES), [chunk(b"")])
    status, body, _ = answer(sent)
    assert status == 431 and body["error"]["code"] == "header_too_large"


def test_the_access_log_escapes_the_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loraplex.access"):
        run(scope("GET", "/x\r\nFORGED 200\x1b[31m"), [chunk(b"")])
    (record,) = [r for r in caplog.records if r.name == "loraplex.access"]
    line = record.getMessage()
    assert "\r" not in line and "\n" not in line and "\x1b" not in line
    assert "/x\\r\\nFORGED 200\\x1b[31m" in line
    assert printable("é" * 1000).endswith("...")


def test_a_method_the_path_does_not_answer_is_a_405_before_its_media_type() -> None:
    from fastapi import FastAPI

    routed = FastAPI()

    @routed.get("/v1/models")
    async def models() -> dict[str, str]:
        return {}

    sc = scope("PUT", "/v1/models", **{"content-type": "text/plain"}) | {"app": routed}
    sent, seen = run(sc, [chunk(b"x" * 5000)])
    status, body, headers = answer(sent)
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    assert headers[b"allow"] == b"GET" and not received and not seen
    # a path no route answers is left to the router (its 404), and an allowed method passes
    assert answer(run(scope(path="/nowhere") | {"app": routed}, [chunk(b"{}")])[0])[0] == 200
    assert answer(run(scope("GET", "/v1/models") | {"app": routed}, [chunk(b"")])[0])[0] == 200

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

from server.api.edge import EdgeMiddleware, printable
from server.api.http_protocol import MAX_HEAD_BYTES

Message = dict[str, Any]


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
    sc: dict[str, Any], chunks: list[Message | None], body_timeout: float = 0.05
) -> tuple[list[Message], list[bytes]]:
    """Drive the middleware: `chunks` are what receive() returns in turn (None: never returns).
    Returns what was sent and the bodies the app read."""
    sent: list[Message] = []
    seen: list[bytes] = []

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
        chunk = chunks.pop(0) if chunks else None
        if chunk is None:
            await asyncio.sleep(3600)
        assert chunk is not None
        return chunk

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    edge = EdgeMiddleware(app, max_request_bytes=1024, max_upload_bytes=4096, body_timeout=body_timeout)
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

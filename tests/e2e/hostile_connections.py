"""Hostile headers and connections: Authorization headers that are huge, malformed or doubled,
x-request-id values made to break headers and logs, request heads and bodies that never finish
(slowloris), bodies cut short, and bytes that are not HTTP. Sent over raw sockets where no client
library would send them."""

from __future__ import annotations

import re
import select
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.hostile import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    SLACK,
    Case,
    Ctx,
    Reply,
    exchange,
    first_answer,
    head,
    parse_http,
    read_until_closed,
)
from tests.e2e.server_proc import ADMIN_KEY, API_KEY

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def _models(ctx: Ctx, authorization: str | bytes) -> Reply:
    value = authorization if isinstance(authorization, bytes) else authorization.encode("latin-1")
    return Reply.of(httpx.get(f"{ctx.url}/v1/models", headers={b"Authorization": value}, timeout=60))


def _two_authorizations(ctx: Ctx) -> Reply:
    # the first one counts; a valid second one must not rescue it
    extra = {"Authorization": f"Bearer {API_KEY}"}
    return first_answer(ctx, head("GET", "/v1/models", extra, key="not-a-key"))


def _request_id(value: str | bytes) -> Case:
    def send(ctx: Ctx) -> Reply:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        return Reply.of(httpx.get(f"{ctx.url}/health", headers={b"x-request-id": raw}, timeout=60))

    def replaced(_: Ctx, reply: Reply) -> None:
        assert GENERATED_ID.fullmatch(reply.headers["x-request-id"]), reply.headers

    return Case(send, 200, check=replaced)


def _raw_request_id(ctx: Ctx) -> Reply:
    # a bare CR inside the value: h11 refuses the request before any header reaches the app
    return exchange(ctx, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rX-Admin: 1\r\n\r\n")


def _log_line_forging(ctx: Ctx) -> Reply:
    # a percent-encoded CR LF decodes into the request path, which the access log prints
    return Reply.of(httpx.get(f"{ctx.url}/x%0d%0aFORGED%20GET%20/v1/models%20200", timeout=60))


def _log_not_forged(ctx: Ctx, _: Reply) -> None:
    # the access line is written after the response is sent, and reaches the file through the
    # child's pipe: the reply can arrive first, so wait (bounded) for the line before judging
    escaped = "/x\\r\\nFORGED GET /v1/models 200 404"
    deadline = time.monotonic() + 30
    lines = ctx.log.read_text(errors="replace").splitlines()
    while not any(escaped in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = ctx.log.read_text(errors="replace").splitlines()
    assert not any(line.startswith("FORGED") for line in lines), "the access log printed a raw CR LF"
    assert any(escaped in line for line in lines), "the escaped access line never came"


def _slowloris_head(ctx: Ctx) -> Reply:
    """A request head sent a byte at a time, never finished: the server answers 408 and closes
    within the header timeout (plus slack), and answers /health meanwhile."""
    data = head("GET", "/health")[:-2] + b"X-Padding: " + b"a" * 1000
    health = None
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=SLACK) as sock:
        start = time.monotonic()
        for i, byte in enumerate(data):
            if select.select([sock], [], [], 0.2)[0]:
                break  # the server answered or closed
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            if i == 3:
                health = httpx.get(f"{ctx.url}/health", timeout=SLACK).status_code
            assert time.monotonic() - start < HEADER_TIMEOUT + SLACK, "the dribbling client was never cut off"
        answer, _ = read_until_closed(sock, SLACK)
    assert health == 200, "/health did not answer while a client dribbled its head"
    reply = parse_http(answer)
    reply.seconds = time.monotonic() - start
    return reply


def _idle(ctx: Ctx) -> Reply:
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=SLACK) as sock:
        answer, seconds = read_until_closed(sock, HEADER_TIMEOUT + SLACK)
    reply = parse_http(answer)
    reply.seconds = seconds
    return reply


def _within(limit: float) -> Callable[[Ctx, Reply], None]:
    def check(_: Ctx, reply: Reply) -> None:
        assert reply.seconds <= limit + SLACK, reply.seconds

    return check


def _stalled_json(ctx: Ctx) -> Reply:
    extra = {"Content-Type": "application/json", "Content-Length": "100"}
    return exchange(ctx, head("POST", "/v1/chat/completions", extra) + b'{"model": ', BODY_TIMEOUT + SLACK)


MULTIPART = {"Content-Type": "multipart/form-data; boundary=XX", "Content-Length": "100000"}
PART = b'--XX\r\nContent-Disposition: form-data; name="name"\r\n\r\nhostile\r\n--XX\r\n'


def _stalled_upload(ctx: Ctx) -> Reply:
    return exchange(ctx, head("POST", "/v1/adapters", MULTIPART, ADMIN_KEY) + PART, BODY_TIMEOUT + SLACK)


def _cut_upload(ctx: Ctx) -> Reply:
    # the client gives up mid-body: no answer can reach it; the log must show a 400, not a 500
    mark = ctx.log.stat().st_size
    reply = exchange(ctx, head("POST", "/v1/adapters", MULTIPART, ADMIN_KEY) + PART, half_close=True)
    reply.mark = mark
    return reply


def _logged_as_client_error(ctx: Ctx, reply: Reply) -> None:
    deadline = time.monotonic() + SLACK
    while time.monotonic() < deadline:  # the server logs the request once its handler has ended
        found = re.findall(
            r"POST /v1/adapters (\d+)", ctx.log.read_bytes()[reply.mark :].decode(errors="replace")
        )
        if found:
            assert found == ["400"], found
            return
        time.sleep(0.05)
    pytest.fail("the cut-short upload was never logged")


def _raw(data: bytes, wait: float = SLACK) -> Callable[[Ctx], Reply]:
    return lambda ctx: exchange(ctx, data, wait)


def _streamed_head(ctx: Ctx) -> Reply:
    """A head larger than the bound, arriving in pieces (h11 holds at most the bound)."""
    with socket.create_connection(("127.0.0.1", ctx.port), timeout=SLACK) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(16):
                sock.sendall(b"a" * 4096)
                time.sleep(0.02)
        except OSError:
            pass  # closed on us: the answer is waiting
        answer, _ = read_until_closed(sock, SLACK)
    return parse_http(answer)


CONNECTIONS = [
    # -- Authorization --
    pytest.param(
        Case(lambda ctx: _models(ctx, "Bearer " + "k" * 20_000), 431, "header_too_large", None),
        id="header-authorization-oversized",
    ),
    pytest.param(
        Case(lambda ctx: _models(ctx, API_KEY), 401, "invalid_api_key", None),
        id="header-authorization-no-scheme",
    ),
    pytest.param(
        Case(lambda ctx: _models(ctx, "Bearer"), 401, "invalid_api_key", None),
        id="header-authorization-empty-token",
    ),
    pytest.param(
        Case(
            lambda ctx: _models(ctx, f"Bearer {API_KEY}\xe9".encode("latin-1")), 401, "invalid_api_key", None
        ),
        id="header-authorization-latin1",
    ),
    pytest.param(Case(_two_authorizations, 401, "invalid_api_key", None), id="header-authorization-twice"),
    # -- x-request-id --
    pytest.param(_request_id("a" * 129), id="header-request-id-too-long"),
    pytest.param(_request_id("é-ü".encode("latin-1")), id="header-request-id-non-ascii"),
    pytest.param(_request_id('id", "admin": true, "x": "'), id="header-request-id-json-breaker"),
    pytest.param(Case(_raw_request_id, 400, "invalid_http_request", None), id="header-request-id-bare-cr"),
    pytest.param(
        Case(_log_line_forging, 404, "not_found", None, _log_not_forged), id="path-crlf-log-forging"
    ),
    # -- slow and broken clients --
    pytest.param(
        Case(_slowloris_head, 408, "request_timeout", None, _within(HEADER_TIMEOUT)),
        id="slowloris-request-head",
    ),
    pytest.param(Case(_idle, 0, check=_within(HEADER_TIMEOUT)), id="slowloris-idle-connection"),
    pytest.param(
        Case(_stalled_json, 408, "request_timeout", None, _within(BODY_TIMEOUT)), id="slowloris-json-body"
    ),
    pytest.param(
        Case(_stalled_upload, 408, "request_timeout", None, _within(BODY_TIMEOUT)), id="slowloris-upload-body"
    ),
    pytest.param(Case(_cut_upload, 0, check=_logged_as_client_error), id="upload-body-cut-short"),
    pytest.param(Case(_streamed_head, 431, "header_too_large", None), id="head-over-the-bound-in-pieces"),
    pytest.param(
        Case(
            lambda ctx: first_answer(
                ctx, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Many: y\r\n" * 3000 + b"\r\n"
            ),
            431,
            "header_too_large",
            None,
        ),
        id="head-too-many-headers",
    ),
    pytest.param(
        Case(
            _raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64),
            400,
            "invalid_http_request",
            None,
        ),
        id="bytes-tls-hello",
    ),
    pytest.param(
        Case(_raw(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "invalid_http_request", None),
        id="bytes-non-ascii-target",
    ),
    pytest.param(
        Case(
            _raw(head("POST", "/v1/chat/completions", {"Content-Length": "-5"})),
            400,
            "invalid_http_request",
            None,
        ),
        id="bytes-negative-content-length",
    ),
    pytest.param(
        Case(
            _raw(
                head(
                    "POST",
                    "/v1/chat/completions",
                    {
                        "Content-Type": "application/json",
                        "Content-Length": "5",
                        "Transfer-Encoding": "chunked",
                    },
                )
                + b"0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            400,
            "ambiguous_length",
            None,
        ),
        id="bytes-request-smuggling",
    ),
    pytest.param(
        Case(
            lambda ctx: first_answer(
                ctx,
                head(
                    "POST",
                    "/v1/chat/completions",
                    {
                        "Content-Type": "application/json",
                        "Content-Length": str(10**12),
                        "Expect": "100-continue",
                    },
                ),
            ),
            413,
            "payload_too_large",
            None,
        ),
        id="expect-continue-oversized",
    ),
]

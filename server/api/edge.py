"""Pure ASGI middleware at the edge: request ids, media types, body size and time limits, access
logs.

Semantics of the body's deadline: each chunk of a request body must arrive within `body_timeout`
seconds of the previous one (nginx's client_body_timeout), else the answer is 408 and the
connection closes. JSON bodies are read here, whole, so a stall or an oversized body is answered
before any route runs; an upload streams through to its route under the same per-chunk deadline.
The request head has its own deadline, in the protocol (server/api/http_protocol.py).

Order of the checks on a request with a body: head size, framing, the API key (401), the method
(405: the path does not answer it), and only then media type, size and the body itself. A client
without a key learns nothing else, and the server parses nothing it sent."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

import pydantic_core
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import EDGE_GRANT, AuthError, KeyRing, authenticate
from server.api.http_protocol import MAX_HEAD_BYTES
from server.api.routing import not_allowed
from server.errors import LoraplexError

log = logging.getLogger("loraplex.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UPLOAD_PATH = "/v1/adapters"


class BodyError(LoraplexError):
    """The request body broke a rule of the edge; raised from `receive` inside a route that streams
    the body (an upload), mapped to `status` by server/api/errors.py."""

    status = 400
    code = "invalid_body"


class PayloadTooLargeError(BodyError):
    status, code = 413, "payload_too_large"


class RequestTimeoutError(BodyError):
    """The client stopped sending its request body."""

    status, code = 408, "request_timeout"


class IncompleteBodyError(BodyError):
    """The client closed the connection before its body was complete: nobody reads the answer, but
    the log shows a client's fault, not a server error."""

    status, code = 400, "incomplete_body"


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_request_bytes: int,
        max_upload_bytes: int,
        body_timeout: float = 30.0,
        keys: KeyRing | None = None,
    ) -> None:
        """`keys`: a request with a body must carry one of them before its body is read."""
        self.app = app
        self.keys = keys
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500
        upload = scope["path"] == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.max_upload_bytes if upload else self.max_request_bytes
        # RFC 9112 6.3: both framings at once is how requests are smuggled past a proxy that
        # reads the other one; refuse rather than pick one
        ambiguous = "transfer-encoding" in headers and "content-length" in headers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
                if status == 408 or ambiguous:
                    # the rest of the body may still come, or where it ends is in doubt: nothing
                    # more on this connection may be read as a request
                    message["headers"].append((b"connection", b"close"))
            await send(message)

        try:
            if _head_bytes(scope) > MAX_HEAD_BYTES:  # one read can bring h11 a larger head than its bound
                message = f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"
                await _error(send_with_id, 431, message, "header_too_large")
                return
            if ambiguous:
                message = "a request may not carry both Content-Length and Transfer-Encoding"
                await _error(send_with_id, 400, message, "ambiguous_length")
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                if self.keys is not None:
                    try:
                        granted = authenticate(self.keys, headers.get("authorization", ""))
                    except AuthError as e:
                        challenge = [(b"www-authenticate", b"Bearer")]
                        await _error(
                            send_with_id, 401, str(e), "invalid_api_key", "authentication_error", challenge
                        )
                        return
                    scope["state"][EDGE_GRANT] = granted
                allow = not_allowed(scope)
                if allow is not None:  # RFC 9110: a 405 whatever the body, so before its media type
                    message = (
                        f"{scope['method']} is not allowed on {printable(scope['path'])}; allowed: {allow}"
                    )
                    await _error(
                        send_with_id,
                        405,
                        message,
                        "method_not_allowed",
                        extra_headers=[(b"allow", allow.encode())],
                    )
                    return
                problem = self._check(headers, upload, limit)
                if problem is not None:
                    await _error(send_with_id, *problem)
                    return
            received = 0
            body_done = False

            async def counted() -> Message:
                """The next body chunk, within the deadline and the size limit; once the body is
                complete, receive() only waits for a disconnect, with no deadline."""
                nonlocal received, body_done
                if body_done:
                    return await receive()
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    raise RequestTimeoutError(
                        f"no part of the request body arrived for {self.body_timeout:g}s"
                    ) from None
                if message["type"] != "http.request":
                    raise IncompleteBodyError("the client closed the connection before its body was complete")
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
                body_done = not message.get("more_body", False)
                return message

            if not upload and scope["method"] in ("POST", "PUT", "PATCH"):
                # Read here, within the limits: a stalled body is a 408 and an oversized one a 413
                # (FastAPI turns any error while it reads a body into a 400).
                try:
                    body = await _read_all(counted)
                except BodyError as e:
                    await _error(send_with_id, e.status, str(e), e.code)
                    return
                problem_json = _json_problem(body)
                if problem_json is not None:
                    await _error(send_with_id, 400, problem_json, "invalid_json")
                    return
                replayed = False

                async def replay() -> Message:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_with_id)
                return
            await self.app(scope, counted, send_with_id)
        finally:
            log.info(
                "%s %s %d %.1fms",
                scope["method"],
                printable(scope["path"]),
                status,
                (time.perf_counter() - start) * 1000,
                extra={"request_id": rid},
            )

    @staticmethod
    def _check(headers: Headers, upload: bool, limit: int) -> tuple[int, str, str] | None:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        wanted = "multipart/form-data" if upload else "application/json"
        if ctype != wanted:
            return 415, f"Content-Type must be {wanted}, got {ctype or 'none'}", "unsupported_media_type"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return (
                413,
                f"request body of {length} bytes exceeds the limit of {limit} bytes",
                "payload_too_large",
            )
        return None


def _head_bytes(scope: Scope) -> int:
    headers = sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # 4: ": " and CRLF
    return len(scope.get("raw_path", b"")) + len(scope.get("query_string", b"")) + headers


def _json_problem(body: bytes) -> str | None:
    """Why `body` is not JSON the routes may take, checked by pydantic-core's parser, which is fast
    and strict where Python's json is lenient: invalid UTF-8, lone surrogates (no tokenizer can
    encode them) and nesting deeper than its limit (200) are refused before any route runs. An
    empty body is left to the route (its own "field required" answer)."""
    if not body:
        return None
    try:
        pydantic_core.from_json(body)
    except ValueError as e:
        return f"the body is not valid JSON: {e}"
    return None


def printable(text: str, limit: int = 512) -> str:
    """`text` for a log line: control characters (CR, LF, ANSI escapes) and non-ASCII escaped, so
    a client cannot forge log lines through a percent-encoded path."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


async def _read_all(receive: Receive) -> bytes:
    """The whole body, from a `receive` that raises BodyError rather than return a disconnect."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(
    send: Send,
    status: int,
    message: str,
    code: str,
    type_: str = "invalid_request_error",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})

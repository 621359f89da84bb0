"""Pure ASGI middleware at the edge: request ids, media types, body size limits, access logs."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import LoraplexError

log = logging.getLogger("loraplex.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPLOAD_PATH = "/v1/adapters"


class PayloadTooLargeError(LoraplexError):
    pass


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        start = time.perf_counter()
        status = 500
        upload = scope["path"] == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.max_upload_bytes if upload else self.max_request_bytes

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                problem = self._check(headers, upload, limit)
                if problem is not None:
                    await _error(send_with_id, *problem)
                    return
            received = 0

            async def counted() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise PayloadTooLargeError(f"request body exceeds {limit} bytes")
                return message

            if not upload and scope["method"] == "POST" and "content-length" not in headers:
                # A chunked JSON body is read here, within the limit, so an oversized one is a 413
                # (FastAPI turns any error while it reads a body into a 400).
                try:
                    body = await _read_all(counted)
                except PayloadTooLargeError as e:
                    await _error(send_with_id, 413, str(e), "payload_too_large")
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
                scope["path"],
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


async def _read_all(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    )
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})

"""Domain errors -> HTTP status and the OpenAI error envelope, in one place. Nothing leaves the
server as a bare-text error: schema errors are 400 (as OpenAI and vLLM answer), a chat template
that refuses the conversation is 400, and any other exception is a 500 envelope that names the
request id and nothing else (the traceback goes to the log, with the id)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import AuthError
from server.api.edge import BodyError, printable
from server.api.routing import allowed_methods
from server.errors import (
    AdapterError,
    AdapterNotFoundError,
    DrainingError,
    EngineDeadError,
    LoraplexError,
    QueueFullError,
    RequestError,
)

log = logging.getLogger(__name__)


def envelope(
    status: int,
    message: str,
    type_: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    headers = dict(headers or {})
    if status in (429, 503):
        headers["Retry-After"] = "1"
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code, **extra}},
        headers=headers,
    )


def from_exception(e: LoraplexError) -> JSONResponse:
    if isinstance(e, AdapterNotFoundError):
        return envelope(404, str(e), "invalid_request_error", "model_not_found", e.param)
    if isinstance(e, RequestError):
        return envelope(400, str(e), "invalid_request_error", "invalid_value", e.param)
    if isinstance(e, AdapterError):
        report = getattr(e, "report", None)
        extra = {"report": asdict(report)} if report is not None else {}
        return envelope(400, str(e), "invalid_request_error", "invalid_adapter", e.field, **extra)
    if isinstance(e, AuthError):
        code = "invalid_api_key" if e.status == 401 else "insufficient_scope"
        return envelope(
            e.status, str(e), "authentication_error" if e.status == 401 else "permission_error", code
        )
    if isinstance(e, BodyError):  # too large (413), too slow (408), cut short (400)
        return envelope(e.status, str(e), "invalid_request_error", e.code)
    if isinstance(e, QueueFullError):
        return envelope(429, str(e), "rate_limit_error", "queue_full")
    if isinstance(e, EngineDeadError):
        return envelope(503, str(e), "server_error", "engine_unavailable")
    if isinstance(e, DrainingError):
        return envelope(503, str(e), "server_error", e.code)
    return envelope(500, str(e), "server_error", "internal_error")


def error_event(e: LoraplexError) -> str:
    """`e` as a server-sent event, for a stream whose 200 is already sent: the same envelope its
    status would have carried, so a client parses one shape whether the error came early or late."""
    body = from_exception(e).body
    return f"data: {bytes(body).decode()}\n\n"


def _body_path(loc: tuple[Any, ...], body: Any, missing: bool) -> list[Any]:
    """The segments of a pydantic error location that address the request body, without the
    union members' tags (`str`, `list[TextPart]`, a model's name) pydantic puts between them. The
    last segment of a `missing` error names the absent field and is kept."""
    path: list[Any] = []
    cur = body
    for i, seg in enumerate(loc):
        in_dict = isinstance(cur, dict) and seg in cur
        in_list = isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur)
        if in_dict or in_list:
            cur = cur[seg]
            path.append(seg)
        elif missing and i == len(loc) - 1:
            path.append(seg)
    return path


def validation_error(errors: list[dict[str, Any]], body: Any) -> JSONResponse:
    """One readable 400 from pydantic's list: the first failing field, and under it the deepest
    error. A union reports one error per member; the member that got furthest matched best, and
    members failing at the same place have their messages joined."""
    if not errors:
        return envelope(400, "invalid request", "invalid_request_error", "invalid_value")
    if errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", errors[0].get("msg", ""))
        return envelope(400, f"the body is not valid JSON: {reason}", "invalid_request_error", "invalid_json")
    located: list[tuple[dict[str, Any], list[Any]]] = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        where, rest = (loc[0], loc[1:]) if loc else ("body", ())
        # query, path and header parameters have no unions to unpick
        path = _body_path(rest, body, e.get("type") == "missing") if where == "body" else list(rest)
        located.append((e, path))
    head = located[0][1]
    under = [x for x in located if x[1][: len(head)] == head]
    path = max((x[1] for x in under), key=len)
    best = [e for e, p in under if p == path]
    param = ".".join(str(p) for p in path)
    message = " or ".join(dict.fromkeys(str(e.get("msg", "invalid value")) for e in best))
    kind = str(best[0].get("type", ""))
    if kind == "missing":
        code = "missing_required_parameter"
    elif kind.endswith(("_type", "_parsing")):
        code = "invalid_type"
    else:
        code = "invalid_value"
    return envelope(
        400, f"{param}: {message}" if param else message, "invalid_request_error", code, param or None
    )


def _request_id(scope: Scope) -> str:
    rid = scope.get("state", {}).get("request_id")  # set by EdgeMiddleware
    return str(rid) if rid else uuid.uuid4().hex


def internal_error(scope: Scope, exc: BaseException) -> JSONResponse:
    """A 500 that names the request id and nothing else; the traceback goes to the log."""
    rid = _request_id(scope)
    log.error(
        "unhandled %s in %s %s (request id %s)",
        type(exc).__name__,
        scope.get("method"),
        printable(str(scope.get("path"))),  # the client's bytes: no forged log lines
        rid,
        exc_info=exc,
        extra={"request_id": rid},
    )
    return envelope(500, f"internal server error (request id {rid})", "server_error", "internal_error")


class UnhandledErrorMiddleware:
    """Any exception no handler took becomes the 500 envelope. It sits inside EdgeMiddleware, so the
    response still carries x-request-id and the access log its status. (Starlette's handler for
    `Exception` lives in ServerErrorMiddleware, outside every user middleware, and re-raises after
    it answers; `install` keeps one there too, for errors raised by the outer middlewares.)
    A response already under way cannot become a 500: the error propagates and the server ends it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await internal_error(scope, exc)(scope, receive, send)


def install(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _domain(_: Request, e: LoraplexError) -> JSONResponse:
        return from_exception(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(list(e.errors()), e.body)

    @app.exception_handler(TemplateError)
    async def _template(_: Request, e: TemplateError) -> JSONResponse:
        # the model's chat template refused the conversation (e.g. roles that do not alternate)
        message = e.message or type(e).__name__
        return envelope(400, message, "invalid_request_error", "chat_template_error", "messages")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(e.status_code, "http_error")
        headers = dict(e.headers or {})
        if e.status_code == 405:
            # RFC 9110: a 405 lists every method the path answers; Starlette's names only the first
            # route's, and GET and POST of one path are two routes
            methods = allowed_methods(request.app.router.routes, request.scope)
            # None: a mount answered (the static files, which serve GET and HEAD)
            headers["Allow"] = ", ".join(sorted(methods)) if methods else headers.get("Allow", "GET, HEAD")
            message = f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
            return envelope(405, message, "invalid_request_error", code, headers=headers)
        return envelope(e.status_code, str(e.detail), "invalid_request_error", code, headers=headers)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, e: Exception) -> JSONResponse:
        return internal_error(request.scope, e)

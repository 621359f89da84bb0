"""Domain errors -> HTTP status and the OpenAI error envelope, in one place."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.auth import AuthError
from server.api.edge import PayloadTooLargeError
from server.errors import (
    AdapterError,
    AdapterNotFoundError,
    EngineDeadError,
    LoraplexError,
    QueueFullError,
    RequestError,
)


def envelope(
    status: int, message: str, type_: str, code: str, param: str | None = None, **extra: object
) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": type_, "param": param, "code": code, **extra}},
        headers=headers,
    )


def from_exception(e: LoraplexError) -> JSONResponse:
    if isinstance(e, AdapterNotFoundError):
        return envelope(404, str(e), "invalid_request_error", "model_not_found", "model")
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
    if isinstance(e, PayloadTooLargeError):
        return envelope(413, str(e), "invalid_request_error", "payload_too_large")
    if isinstance(e, QueueFullError):
        return envelope(429, str(e), "rate_limit_error", "queue_full")
    if isinstance(e, EngineDeadError):
        return envelope(503, str(e), "server_error", "engine_unavailable")
    return envelope(500, str(e), "server_error", "internal_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(LoraplexError)
    async def _domain(_: Request, e: LoraplexError) -> JSONResponse:
        return from_exception(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return envelope(
            422,
            f"{loc}: {err.get('msg', 'invalid request')}",
            "invalid_request_error",
            "invalid_schema",
            loc or None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(e.status_code, "http_error")
        return envelope(e.status_code, str(e.detail), "invalid_request_error", code)

"""The FastAPI application: routers with their auth scopes, edge middleware, and a lifespan that
starts the engine thread and warms it up before /ready says yes."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server import __version__
from server.api import adapter_routes, errors, openai_routes, ops_routes, tokenize_routes, web_routes
from server.api.auth import KeyRing
from server.api.edge import EdgeMiddleware
from server.api.metrics import Metrics
from server.engine.sequence import SamplingParams
from server.runtime import Runtime

log = logging.getLogger(__name__)


async def _warm_up(runtime: Runtime) -> None:
    seq = runtime.sequence(
        "warmup", runtime.text_prompt("Hello"), SamplingParams(max_tokens=2, temperature=0.0), None
    )
    async for _ in runtime.async_engine.generate(seq):
        pass
    # indexing the vocabulary for structured output takes a moment: not on a request's time
    await asyncio.to_thread(lambda: runtime.grammar)


async def _rescan_store(runtime: Runtime, interval: float) -> None:
    """Converge with the other processes sharing the adapter store (registry.sync), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(runtime.registry.sync)
        except Exception:  # a flaky network volume must not end the loop: the next pass retries
            log.exception("adapter store rescan failed")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.async_engine.start()  # a no-op when `loraplex serve` runs the loop on the main thread
        rescan: asyncio.Task[None] | None = None
        try:
            await _warm_up(runtime)
            if settings.store_rescan_seconds > 0:
                rescan = asyncio.create_task(_rescan_store(runtime, settings.store_rescan_seconds))
            app.state.ready = True
            yield
        finally:
            app.state.ready = False
            if rescan is not None:
                rescan.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescan
            runtime.async_engine.shutdown()
            # after the engine: its last sequences unpin as they finish
            await asyncio.to_thread(runtime.registry.close)

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.started = time.time()
    app.state.ready = False
    app.state.keys = KeyRing(settings.split(settings.api_keys), settings.split(settings.admin_keys))
    app.state.metrics = Metrics(runtime)
    if app.state.keys.open and not _is_loopback(settings.host):
        log.warning(
            "no API keys are set and the server listens on %s: anyone who can reach it can use "
            "and change it. Set LORAPLEX_API_KEYS / LORAPLEX_ADMIN_KEYS.",
            settings.host,
        )
    errors.install(app)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(web_routes.router)
    app.mount("/static", web_routes.static_files(), name="static")
    # The last added is the outermost: CORS answers preflights (and marks every answer, errors
    # included) before the edge checks media types; the edge gives each request its id before
    # an unhandled exception becomes a 500 envelope that names it.
    app.add_middleware(errors.UnhandledErrorMiddleware)
    app.add_middleware(
        EdgeMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
    )
    origins = settings.split(settings.allowed_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials="*" not in origins,
            expose_headers=["x-request-id", "retry-after"],
        )
    return app

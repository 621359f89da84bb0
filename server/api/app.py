"""The FastAPI application: routers with their auth scopes, edge middleware, a lifespan that
starts the engine thread and warms it up before /ready says yes, and the graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server import __version__
from server.api import (
    adapter_routes,
    errors,
    openai_routes,
    openapi,
    ops_routes,
    tokenize_routes,
    web_routes,
)
from server.api.auth import KeyRing
from server.api.edge import EdgeMiddleware
from server.api.fair_share import FairShareMiddleware
from server.api.metrics import Metrics
from server.engine.async_engine import AsyncEngine
from server.engine.sequence import SamplingParams
from server.errors import DrainingError
from server.runtime import Runtime

log = logging.getLogger(__name__)

# What the drain waits for and refuses: requests that hold engine sequences. Probes, /metrics and
# the admin routes stay open; uvicorn's own shutdown waits for those (with a bound, see cli.py).
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# After the timeout, how long aborted requests get to write their error event and end
ABORT_GRACE_SECONDS = 5.0


class Drain:
    """Graceful drain, the first phase of `loraplex serve`'s shutdown (cli.py starts it on SIGTERM
    or SIGINT). Semantics: from begin() on, /ready answers 503 and new inference requests 503
    `draining`, while the listener stays open: a load balancer needs a few probe periods to see
    /ready fail, and in that window a 503 with Retry-After is something a client retries, where a
    refused connection is not. Requests in flight get `timeout` seconds to finish; those left are
    ended with `drain_timeout` (an error event on a stream, a 503 otherwise). Then `on_done` runs
    (cli.py sets uvicorn's should_exit: its shutdown closes the listener and waits for the
    connections, now idle, to close). The counts of finished and aborted requests are logged."""

    def __init__(self, engine: AsyncEngine, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.draining = False
        self.inflight = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, set by the lifespan
        self._idle = asyncio.Event()  # set while no inference request is in flight
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def begin(self, on_done: Callable[[], None]) -> bool:
        """Start draining; safe from a signal handler on any thread. False (and nothing done) when
        the app is not serving yet: there is nothing to drain, the caller stops the server."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        self.draining = True  # /ready and the middleware see it at once, before the task runs
        loop.call_soon_threadsafe(self._start, on_done)
        return True

    def _start(self, on_done: Callable[[], None]) -> None:
        if self._task is None:  # the loop holds tasks weakly: keep ours alive
            self._task = asyncio.get_running_loop().create_task(self.run(on_done))

    async def run(self, on_done: Callable[[], None]) -> None:
        start, at_start = time.monotonic(), self.inflight
        self.draining = True
        log.info("draining: %d requests in flight, %gs to finish", at_start, self.timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.timeout)
        aborted = self.inflight
        if aborted:
            self.engine.fail_all(
                lambda: DrainingError(
                    f"the server is shutting down and the drain timeout ({self.timeout:g}s) expired",
                    code="drain_timeout",
                )
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), ABORT_GRACE_SECONDS)
        log.info(
            "drain done in %.1fs: %d requests finished, %d aborted",
            time.monotonic() - start,
            at_start - aborted,
            aborted,
        )
        on_done()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()


class DrainMiddleware:
    """Counts inference requests until their last byte is sent (a stream outlives its handler),
    and refuses new ones while draining. Check and count happen in one synchronous step on the
    event loop, so a request is either refused or seen by the drain."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            refusal = DrainingError("the server is shutting down; retry on another replica")
            await errors.from_exception(refusal)(scope, receive, send)
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()


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


def create_app(runtime: Runtime, keys: KeyRing | None = None) -> FastAPI:
    settings = runtime.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.async_engine.start()  # a no-op when `loraplex serve` runs the loop on the main thread
        app.state.drain.loop = asyncio.get_running_loop()
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
    app.state.keys = keys if keys is not None else KeyRing.from_settings(settings)
    app.state.metrics = Metrics(runtime)
    app.state.drain = Drain(runtime.async_engine, settings.drain_timeout)
    if app.state.keys.open and not _is_loopback(settings.host):
        log.warning(
            "no API keys are set and the server listens on %s: anyone who can reach it can use "
            "and change it. Set LORAPLEX_API_KEYS / LORAPLEX_ADMIN_KEYS.",
            settings.host,
        )
    errors.install(app)
    openapi.install(app, runtime)  # /openapi.json describes this server: its limits, its auth
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(web_routes.router)
    app.mount("/static", web_routes.static_files(), name="static")
    # The last added is the outermost: CORS answers preflights (and marks every answer, errors
    # included) before the edge checks media types; the edge gives each request its id before
    # an unhandled exception becomes a 500 envelope that names it.
    if settings.max_concurrent_per_key:  # innermost: a draining server refuses before counting
        app.add_middleware(FairShareMiddleware, limit=settings.max_concurrent_per_key, paths=INFERENCE_PATHS)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)  # inside the edge: it logs the 503
    app.add_middleware(errors.UnhandledErrorMiddleware)
    app.add_middleware(
        EdgeMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout=settings.body_timeout,
        keys=app.state.keys,
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

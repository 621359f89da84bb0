"""The FastAPI application: the lifespan starts and stops the engine thread."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.api import errors
from server.api.routes import router
from server.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.async_engine.start()
        try:
            yield
        finally:
            runtime.async_engine.shutdown()

    app = FastAPI(title="loraplex", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.started = time.time()
    errors.install(app)
    app.include_router(router)
    return app

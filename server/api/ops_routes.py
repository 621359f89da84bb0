"""Liveness, readiness, version and metrics: no auth, so probes and scrapers need no key."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server import __version__
from server.api.responses import Health, Readiness, Version, answers, probe
from server.runtime import Runtime

router = APIRouter()
# A step on a CPU can take seconds (a 2048-token prefill); a minute without a loop turn is a hang.
STALL_SECONDS = 60.0


@router.get("/health", responses=probe(Health, "the engine stopped, or its loop stalled"))
async def health(request: Request) -> JSONResponse:
    rt: Runtime = request.app.state.runtime
    engine = rt.async_engine
    stalled = time.monotonic() - engine.last_progress > STALL_SECONDS
    if not engine.alive or stalled:
        reason = (
            "engine stopped" if not engine.alive else f"engine loop stalled for over {STALL_SECONDS:.0f}s"
        )
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", responses=probe(Readiness, "not ready yet, or draining"))
async def ready(request: Request) -> JSONResponse:
    if request.app.state.drain.draining:  # out of the load balancer's rotation while in flight ones end
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
    if request.app.state.ready and request.app.state.runtime.async_engine.alive:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "not ready"}, status_code=503, headers={"Retry-After": "1"})


@router.get("/version", response_model=None, responses=answers(Version))
async def version() -> JSONResponse:
    """vLLM's: what some clients and dashboards read to name the server they talk to."""
    return JSONResponse({"version": __version__})


@router.get("/metrics", response_class=PlainTextResponse, responses=answers(None, text="Prometheus text"))
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

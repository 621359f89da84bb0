"""loraplex on Ray Serve (plain `ray[serve]`; `ray.serve.llm` imports vLLM): an OpenAI-compatible
ingress over N replicas, each running `loraplex serve` as a child process on one shared store.

    serve run server.integrations.ray_serve:build_app replicas=2 adapters_dir=/data/adapters

Semantics: a request whose `model` is an adapter is routed with Serve's model multiplexing, so
every request for one adapter lands on the replica that already holds it (Serve falls back to
another replica only when that one is at `max_ongoing_requests`); base-model requests and admin
calls go to any replica. Status, headers and body of the child's answer pass through unchanged
(auth is enforced by the child), plus `x-loraplex-replica` naming the replica. Every replica
serves the same adapters because all of them share one `--adapters-dir`."""

# No `from __future__ import annotations`: Serve's class-based FastAPI views must see real
# annotations (with strings, `request: Request` became a required query parameter).

import json
import logging
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.integrations.engine_proc import (
    REPLICA_HEADER,
    Call,
    EngineDownError,
    EngineProcess,
    Head,
    Reply,
    error_reply,
)
from server.integrations.ray_args import RayServeArgs

log = logging.getLogger("ray.serve.loraplex")
APP_NAME = "loraplex"


class NotResidentError(RuntimeError):
    """The warm-up request was refused (unknown adapter, queue full): Serve must not cache it."""


@serve.deployment(name="LoraplexReplica")
class LoraplexReplica:
    """Semantics: owns one engine child for its whole life; `check_health` fails when the child is
    gone or unhealthy, so Serve replaces this replica; the multiplexed loader makes an adapter
    resident in the child's slots (Serve's LRU of `max_loras` ids only shapes routing; the child
    keeps its own slot and CPU LRU)."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray allows it
        cfg = RayServeArgs.model_validate(config)
        self.name = serve.get_replica_context().replica_tag
        self._extra = [(REPLICA_HEADER, self.name)]
        store = Path(cfg.adapters_dir) if cfg.adapters_dir else None
        self._engine = EngineProcess(store, cfg.child_args(), cfg.env)
        for attempt in range(3):  # the probed free port can be taken before the child binds it
            self._engine.start()
            try:
                await self._engine.wait_ready(cfg.startup_timeout_s)
                break
            except EngineDownError:
                self._engine.terminate()
                if attempt == 2:
                    raise
        log.info("replica %s: engine child pid %s on %s", self.name, self._engine.pid, self._engine.url)

        async def load(model_id: str) -> str:
            status = await self._engine.warm(model_id)
            if status != 200:
                raise NotResidentError(f"warm-up of {model_id!r} answered {status}")
            return model_id

        # wrapped here, not on the class: the limit comes from the config (as ray.serve.llm does)
        self._resident = serve.multiplexed(max_num_models_per_replica=cfg.max_loras)(load)

    async def _make_resident(self) -> None:
        model = serve.get_multiplexed_model_id()
        if not model:
            return
        try:
            await self._resident(model)
        except Exception as e:  # the request itself then gets the child's own answer (404, 429, 503)
            log.info("replica %s: %s not made resident: %s", self.name, model, e)

    async def forward(self, call: Call) -> Reply:
        await self._make_resident()
        return await self._engine.forward(call, self._extra)

    async def stream(self, call: Call) -> AsyncIterator[Head | bytes]:
        await self._make_resident()
        async for item in self._engine.stream(call, self._extra):
            yield item

    async def base_model_ids(self) -> frozenset[str]:
        return await self._engine.base_model_ids()

    async def info(self) -> dict[str, Any]:
        """Which replica and child this is (operators and the end-to-end test use it)."""
        return {"replica": self.name, "pid": self._engine.pid, "url": self._engine.url}

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine: EngineProcess | None = getattr(self, "_engine", None)
        if engine is not None:
            engine.terminate()


ingress_app = FastAPI(title="loraplex on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


def _peek(body: bytes) -> tuple[str | None, bool]:
    """`model` and `stream` of a JSON body; anything unparsable goes on as is (the child answers 400)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, False
    if not isinstance(data, dict):
        return None, False
    model = data.get("model")
    return (model if isinstance(model, str) and model else None), data.get("stream") is True


async def _call(request: Request) -> Call:
    path = request.url.path
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route_prefix: the child serves at "/"
        path = path[len(root) :] or "/"
    target = f"{path}?{request.url.query}" if request.url.query else path
    return Call(request.method, target, list(request.headers.items()), await request.body())


def _raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _relay(gen: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    done = False
    try:
        async for chunk in gen:
            yield chunk
        done = True
    finally:
        if not done:  # the client went away: stop the replica relaying, so the child aborts
            gen.cancel()


@serve.deployment(name="LoraplexIngress")
@serve.ingress(ingress_app)
class LoraplexIngress:
    """Semantics: see the module docstring. Failures with no child answer (no replica running,
    the replica died mid-call) are a 503 `engine_unavailable` envelope, Serve's own back-pressure
    (`max_queued_requests`) a 429 `queue_full`, both with Retry-After and `x-loraplex-replica: none`."""

    def __init__(self, replica: DeploymentHandle) -> None:
        self._replica = replica
        self._base_ids: frozenset[str] | None = None

    async def _base(self) -> frozenset[str]:
        if self._base_ids is None:
            try:
                self._base_ids = await self._replica.base_model_ids.remote()
            except Exception as e:  # retried on the next request
                log.warning("base model id unknown yet: %r", e)
        return self._base_ids or frozenset()

    @ingress_app.post("/v1/chat/completions")
    @ingress_app.post("/v1/completions")
    async def by_model(self, request: Request) -> Response:
        call = await _call(request)
        model, stream = _peek(call.body)
        handle = self._replica
        if model is not None and model not in await self._base():
            handle = handle.options(multiplexed_model_id=model)
        return await self._send(handle, call, stream)

    # Any one replica: the shared store makes every replica answer these the same way.
    @ingress_app.get("/health")
    @ingress_app.get("/ready")
    @ingress_app.get("/v1/models")
    @ingress_app.get("/v1/models/{model_id:path}")
    @ingress_app.api_route("/v1/adapters", methods=["GET", "POST"])
    @ingress_app.api_route("/v1/adapters/{name}", methods=["GET", "DELETE"])
    @ingress_app.post("/v1/load_lora_adapter")
    @ingress_app.post("/v1/unload_lora_adapter")
    @ingress_app.post("/tokenize")
    @ingress_app.post("/detokenize")
    @ingress_app.options("/{path:path}")  # CORS preflight: the child answers it (--allowed-origins)
    async def any_replica(self, request: Request) -> Response:
        return await self._send(self._replica, await _call(request), stream=False)

    async def _send(self, handle: DeploymentHandle, call: Call, stream: bool) -> Response:
        try:
            if stream:
                gen = cast(DeploymentResponseGenerator, handle.options(stream=True).stream.remote(call))
                head = await gen.__anext__()
                out: Response = StreamingResponse(_relay(gen), status_code=head.status)
                out.raw_headers.extend(_raw(head.headers))
                return out
            reply: Reply = await handle.forward.remote(call)
        except BackPressureError as e:
            reply = error_reply(429, f"all replicas are busy: {e}", "queue_full", "rate_limit_error")
            reply.head.headers.append((REPLICA_HEADER, "none"))
        except Exception as e:  # no replica, or it died mid-call; the log has the details
            log.exception("request %s %s failed in Serve", call.method, call.target)
            reply = error_reply(
                503, f"no replica could serve the request ({type(e).__name__})", "engine_unavailable"
            )
            reply.head.headers.append((REPLICA_HEADER, "none"))
        out = Response(reply.body, status_code=reply.head.status)
        out.raw_headers.extend(_raw(reply.head.headers))
        return out


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (`serve run ...:build_app key=value`, a config's `import_path`)."""
    cfg = RayServeArgs.model_validate(args)
    # the decorators made both classes Deployments; mypy still sees the classes
    replica = (
        cast(Deployment, LoraplexReplica)
        .options(
            num_replicas=cfg.replicas,
            max_ongoing_requests=cfg.replica_max_ongoing,
            max_queued_requests=cfg.max_queued_requests,
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            health_check_period_s=cfg.health_check_period_s,
            health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=60.0,  # in-flight generations finish before the child stops
        )
        .bind(cfg.model_dump())
    )
    return (
        cast(Deployment, LoraplexIngress)
        .options(
            num_replicas=cfg.ingress_replicas,
            # the ingress only relays: it must never be what limits the replicas behind it
            max_ongoing_requests=cfg.replicas * cfg.replica_max_ongoing + 64,
            ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
        )
        .bind(replica)
    )


def run_local(args: dict[str, Any], host: str, port: int, num_cpus: int | None) -> int:
    """`loraplex ray-serve`: a local Ray instance, the app on host:port, until SIGINT/SIGTERM."""
    import ray

    cfg = RayServeArgs.model_validate(args)  # bad args fail before Ray starts
    app = build_app(args)
    stop = threading.Event()
    ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        logging.getLogger("loraplex").info(
            "on Ray Serve: http://%s:%d, %s replica(s)", host, port, cfg.replicas
        )
        stop.wait()
    finally:
        serve.shutdown()  # replicas' __del__ stop their engine children
        ray.shutdown()
    return 0

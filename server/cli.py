"""`loraplex` command line. Every Settings field is a flag (`--max-loras 8`); flags beat LORAPLEX_* env."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from server.config import Settings

# Keys on a command line are visible to every user of the machine (ps); env only.
SECRET_FIELDS = ("api_keys", "admin_keys", "keys", "keys_file")
# uvicorn's bound on connections still open once the graceful drain is over
GRACEFUL_SHUTDOWN_SECONDS = 5


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        choices = None
        kind: type = str
        args = typing.get_args(ann)
        if ann is bool or bool in args:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
            continue
        if typing.get_origin(ann) is list:  # vLLM's form: --lora-modules a=/x b=/y
            parser.add_argument(flag, dest=name, nargs="+", default=None, help=field.description)
            continue
        if typing.get_origin(ann) is typing.Literal:
            choices = list(args)
        elif ann is int or int in args:
            kind = int
        elif ann is Path or Path in args:
            kind = Path
        parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=field.description)


def _settings(ns: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    _add_settings_flags(serve)
    serve.add_argument("--log-level", default="info")
    prep = sub.add_parser("prepare-model", help="convert the default GGUF model once (cached)")
    _add_settings_flags(prep)
    _add_ray_serve_command(sub)
    _add_training_commands(sub)
    ns = parser.parse_args(argv)
    try:
        settings = _settings(ns)
    except (ValidationError, SettingsError) as e:  # a flag or a LORAPLEX_ variable: say which, exit 2
        sys.stderr.write(f"loraplex: invalid settings: {e}\n")
        return 2
    from server.api.logs import configure

    configure(getattr(ns, "log_level", "info"), settings.log_format)

    from server.api.auth import KeysFileError
    from server.errors import BackendError, ModelNotFoundError, StartupError

    try:
        if ns.command in TRAINING_COMMANDS:
            return _training(ns, settings)
        if ns.command == "ray-serve":
            return _ray_serve(ns, settings)
        if ns.command == "prepare-model":
            from server.model.source import resolve_model

            path, model_id = resolve_model(settings.model, settings.cache_dir)
            logging.getLogger("loraplex").info("model %s ready at %s", model_id, path)
            return 0
        return _serve(settings, ns.log_level)
    except (ModelNotFoundError, BackendError, KeysFileError, StartupError) as e:
        logging.getLogger("loraplex").error("%s", e)
        return 2


TRAINING_COMMANDS = ("train", "build-persona-data", "eval-personas")


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="QLoRA-train a LoRA adapter on a chat JSONL file")
    train.add_argument("--data", type=Path, required=True, help='JSONL of {"messages": [...]}')
    train.add_argument("--out", type=Path, required=True, help="output PEFT adapter directory")
    train.add_argument("--model", default=None, help="local checkpoint (default: the embedded model)")
    train.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=int, default=16)
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--max-len", type=int, default=160)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--log-every", type=int, default=10)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    train.add_argument(
        "--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="dtype of the saved LoRA factors (bfloat16 halves the file)",
    )  # fmt: skip
    data = sub.add_parser("build-persona-data", help="base answers -> persona JSONL")
    data.add_argument("--model", default=None, help="local checkpoint (default: the embedded model)")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--prompts", type=int, default=320)
    ev = sub.add_parser("eval-personas", help="style scores of the base and each persona adapter")
    ev.add_argument("--model", default=None, help="local checkpoint (default: the embedded model)")
    ev.add_argument("--adapters-dir", dest="persona_dir", type=Path, default=Path("adapters"))
    ev.add_argument("--out", type=Path, default=Path("bench/results/personas.json"))


def _training(ns: argparse.Namespace, settings: Settings) -> int:
    if ns.command == "train":
        from server.model.source import resolve_model
        from server.training.trainer import TrainConfig, train

        path, _ = resolve_model(ns.model, settings.cache_dir)
        cfg = TrainConfig(
            data=ns.data,
            out=ns.out,
            model=path,
            quantization=ns.quantization,
            rank=ns.rank,
            alpha=ns.alpha,
            steps=ns.steps,
            lr=ns.lr,
            batch_size=ns.batch_size,
            grad_accum=ns.grad_accum,
            max_len=ns.max_len,
            seed=ns.seed,
            log_every=ns.log_every,
            threads=ns.threads,
            save_dtype=ns.save_dtype,
        )
        result = train(cfg)
        logging.getLogger("loraplex").info(
            "trained %d steps in %.0fs: loss %.3f -> %.3f; adapter in %s",
            result.steps, result.seconds, result.first_loss, result.final_loss, ns.out,
        )  # fmt: skip
        return 0
    if ns.command == "build-persona-data":
        from server.training.dataset import build

        build(ns.out, ns.prompts, settings)
        return 0
    from server.training.evaluate import run

    return run(settings, ns.persona_dir, ns.out)


def _add_ray_serve_command(sub: argparse._SubParsersAction) -> None:
    ray = sub.add_parser("ray-serve", help="N replicas behind Ray Serve on this machine (loraplex[ray])")
    _add_settings_flags(ray)  # --host/--port: Serve's HTTP proxy; the rest: each replica's child
    ray.add_argument("--replicas", type=int, default=2)
    ray.add_argument("--num-gpus", type=float, default=None, help="per replica (default: 1 with CUDA)")
    ray.add_argument("--ray-num-cpus", type=int, default=None, help="local Ray's CPUs (default: all)")
    ray.add_argument("--log-level", default="info")


# build_app takes these as args of their own (they size Serve's options too)
_RAY_OWN = ("host", "port", "adapters_dir", "max_loras", "max_num_seqs", "max_queue")


def _ray_serve(ns: argparse.Namespace, settings: Settings) -> int:
    """A one-machine try of server/integrations/ray_serve.py: a local Ray instance, the app on
    --host/--port, until Ctrl-C or SIGTERM."""
    import os

    from server.lora.startup_modules import check

    check(settings.lora_modules, settings.served_model_name)  # before Ray starts: each child would die of it
    try:
        from server.integrations.ray_serve import run_local
    except ImportError as e:
        logging.getLogger("loraplex").error("ray-serve needs Ray: pip install 'loraplex[ray]' (%s)", e)
        return 2
    child: list[str] = []
    for name, value in vars(ns).items():
        if name not in Settings.model_fields or name in _RAY_OWN or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            child.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            child += [flag, *map(str, value)]
        else:
            child += [flag, str(value)]
    gpus = ns.num_gpus
    if gpus is None:
        import torch

        gpus = 1.0 if settings.device != "cpu" and torch.cuda.is_available() else 0.0
    cores = os.cpu_count() or 1
    args = {
        "replicas": ns.replicas,
        "adapters_dir": str(settings.store_dir),
        "serve_args": [*child, "--log-level", ns.log_level],
        # CPU children share this machine's cores (Ray would give each one OpenMP thread)
        "env": {} if gpus else {"OMP_NUM_THREADS": str(max(1, cores // ns.replicas))},
        "num_gpus": gpus,
        "num_cpus": 0,  # the children's cores are not Ray's to schedule
        "max_loras": settings.max_loras,
        "max_num_seqs": settings.max_num_seqs,
        "max_queue": settings.max_queue,
    }
    return run_local(args, settings.host, settings.port, ns.ray_num_cpus)


def _serve(settings: Settings, log_level: str) -> int:
    """HTTP on a thread, the engine loop on the main thread (where torch's CPU kernels run fastest).

    Shutdown: SIGINT/SIGTERM reach the main thread (uvicorn, on a thread, installs no handlers of
    its own). The first starts the app's graceful drain (server/api/app.py, Drain), which ends by
    setting uvicorn's should_exit; uvicorn's shutdown then closes the listener, waits for the
    connections to close, and runs the lifespan's end, which stops the engine loop; exit 0. A
    second signal exits at once with 128 + its number (130 for SIGINT, 143 for SIGTERM), as the
    shell reports a death by signal. An engine fault exits with EXIT_ENGINE_FAULT (3) once the
    requests in flight have their error (see server/engine/async_engine.py)."""
    import os
    import signal
    import threading

    import uvicorn

    from server.api.app import create_app
    from server.api.auth import KeyRing
    from server.api.http_protocol import MAX_HEAD_BYTES, protocol_class
    from server.engine.async_engine import EXIT_ENGINE_FAULT
    from server.runtime import build_runtime
    from server.torch_threads import use_one_torch_thread

    log = logging.getLogger("loraplex")
    keys = KeyRing.from_settings(settings)  # a bad keys document stops the start before the model loads
    runtime = build_runtime(settings)
    app = create_app(runtime, keys)
    # our edge middleware logs each request with its id; uvicorn's access log would repeat it
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        access_log=False,
        log_config=None,
        # The drain has already ended every inference request when uvicorn starts its shutdown;
        # this bounds the wait for the others (an upload, a slow client) so exit never hangs.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        # h11 with a deadline on each request head (slowloris) and a bound on its size
        http=protocol_class(settings.header_timeout),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    server = uvicorn.Server(config)

    def http() -> None:
        use_one_torch_thread()  # the odd tensor op here must not start a second OpenMP pool
        try:
            server.run()
        finally:
            runtime.async_engine.shutdown()  # start-up failed or uvicorn stopped: end the loop too

    def stop_http() -> None:
        server.should_exit = True

    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if signalled:
            log.warning("second signal (%s) during shutdown: exiting now, status %d", name, 128 + signum)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(128 + signum)  # nothing more to wait for: the caller asked twice
        signalled.append(signum)
        log.info("%s: draining (up to %gs; again to exit at once)", name, settings.drain_timeout)
        if not app.state.drain.begin(stop_http):
            stop_http()  # not serving yet (loading, warming up): nothing to drain

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    runtime.async_engine.hold()
    thread = threading.Thread(target=http, name="http")
    thread.start()
    runtime.async_engine.run()
    fault = runtime.async_engine.error
    if fault is not None:
        # The loop has sent every request in flight its error; new ones get 503 and /health 503.
        # A dead engine serves nothing: exit for the supervisor to start a fresh process.
        log.error("engine fault (%s): exiting with status %d", fault, EXIT_ENGINE_FAULT)
        stop_http()
    thread.join()
    if fault is not None:
        return EXIT_ENGINE_FAULT
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())

"""`loraplex` command line. Every Settings field is a flag (`--max-loras 8`); flags beat LORAPLEX_* env."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from server.config import Settings

# Keys on a command line are visible to every user of the machine (ps); env only.
SECRET_FIELDS = ("api_keys", "admin_keys")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        choices = None
        kind: type = str
        args = typing.get_args(ann)
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
    ns = parser.parse_args(argv)
    settings = _settings(ns)
    from server.api.logs import configure

    configure(getattr(ns, "log_level", "info"), settings.log_format)

    from server.errors import ModelNotFoundError

    try:
        if ns.command == "prepare-model":
            from server.model.source import resolve_model

            path, model_id = resolve_model(settings.model, settings.cache_dir)
            logging.getLogger("loraplex").info("model %s ready at %s", model_id, path)
            return 0
        return _serve(settings, ns.log_level)
    except ModelNotFoundError as e:
        logging.getLogger("loraplex").error("%s", e)
        return 2


def _serve(settings: Settings, log_level: str) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.runtime import build_runtime

    runtime = build_runtime(settings)
    # our edge middleware logs each request with its id; uvicorn's access log would repeat it
    uvicorn.run(
        create_app(runtime),
        host=settings.host,
        port=settings.port,
        log_level=log_level.lower(),
        access_log=False,
        log_config=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

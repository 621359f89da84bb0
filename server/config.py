"""Settings. pydantic-settings at the edge (env prefix LORAPLEX_, CLI flags mirror the fields);
the engine gets a frozen dataclass validated on construction (server/engine/config.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engine.config import EngineConfig

__all__ = ["EngineConfig", "Settings", "default_cache_dir"]

# no '*' or '+' (they spell a mix), nothing a log line or a URL would have to escape
ServedName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]


def _env_list(text: str) -> list[Any]:
    """A list setting's value in the environment: a JSON list, or entries separated by whitespace
    (vLLM's command-line form); empty is none."""
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list ({e.msg})") from None
    return text.split()


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE_DIR") or Path.home() / ".cache" / "loraplex")


class Settings(BaseSettings):
    """Every knob of `loraplex serve`. Each field is also a CLI flag (`max_loras` -> `--max-loras`)."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="ignore")

    model: str | None = Field(
        None, description="Local HF checkpoint dir (Llama/Qwen2/Mistral); default SmolLM2"
    )
    served_model_name: Annotated[list[ServedName], NoDecode] = Field(
        default_factory=list,
        description="vLLM's: the base model's id in the API (default: the checkpoint's name); names "
        "after the first are aliases a request may send, answered under the first",
    )
    chat_template: str | None = Field(
        None,
        description="vLLM's: a Jinja chat template, or a file holding one, used instead of the "
        "tokenizer's (for a checkpoint without one, or to fix one)",
    )
    generation_config: str = Field(
        "auto",
        min_length=1,
        description="vLLM's: auto applies the checkpoint's generation_config.json sampling defaults to "
        "requests that do not set them; vllm ignores it; or a directory holding one",
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="Base weights: NF4 + double quant, or none"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "half", "float"] = Field(
        "auto", description="compute dtype (half, float: vLLM's names for float16, float32)"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models live here")
    adapters_dir: Path | None = Field(None, description="the adapter store (default: CACHE_DIR/adapters)")
    store_rescan_seconds: float = Field(
        5.0,
        ge=0,
        le=60,  # other hosts take a process whose heartbeat is PROCESS_TTL_SECONDS (300) old for dead
        description="seconds between rescans of a store shared with other processes (their uploads "
        "and deletes, heartbeats, garbage collection); 0: off, for a store no other process uses",
    )
    import_adapters: Path | None = Field(
        None, description="PEFT adapter dirs under this dir are imported at start"
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="vLLM's: adapters registered at start, each name=path or a JSON object "
        '{"name", "path"}; a bad one stops the start',
    )
    adapter_import_dirs: str = Field(
        "", description="comma-separated dirs /v1/load_lora_adapter may read from"
    )
    api_keys: str = Field("", description="comma-separated inference keys (env only)")
    admin_keys: str = Field("", description="comma-separated admin keys, imply inference (env only)")
    keys: str = Field(
        "", description="a keys document (JSON): keys scoped to adapter patterns (env only; see auth.py)"
    )
    keys_file: Path | None = Field(None, description="a file holding a keys document (env only)")
    max_concurrent_per_key: int = Field(
        0,
        ge=0,
        description="inference requests one key may have in flight (429 beyond; keyless servers count "
        "per client address); 0: no limit",
    )
    allowed_origins: str = Field(
        "", description='comma-separated origins allowed by CORS ("*" for any); empty: CORS off'
    )
    max_upload_bytes: int = Field(256 << 20, ge=1024, description="largest adapter upload")
    max_request_bytes: int = Field(8 << 20, ge=1024, description="largest JSON request body")
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's line and headers (from its first byte, "
        "or from opening the connection); slower clients (slowloris) get 408 and are disconnected",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a request body may pause between two chunks before the answer is 408 and "
        "the connection closes",
    )
    max_tokens_limit: int = Field(4096, ge=1, description="upper bound on max_tokens")
    max_n: int = Field(8, ge=1, description="upper bound on n")
    max_stop: int = Field(16, ge=1, description="upper bound on the number of stop strings")
    logprobs_mode: Literal["processed", "raw"] = Field(
        "processed", description="logprobs of the distribution sampled from, or of the raw model"
    )
    lora_backend: Literal["auto", "torch", "triton", "cpp"] = Field(
        "auto",
        description="LoRA term: torch (reference), triton (SGMV kernels) or cpp (CPU kernel, compiled at "
        "the first start); auto: triton on CUDA, cpp on CPU where it builds, else torch",
    )
    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of the adapter factors and the low-rank term: float32 is PEFT's (it upcasts "
        "adapters); bfloat16/float16 is the fast mode (half the slot memory; the Triton kernels then "
        "multiply in it with fp32 accumulation); auto: the compute dtype, as vLLM's --lora-dtype",
    )
    attention_backend: Literal["auto", "torch", "flex"] = Field(
        "auto",
        description="attention: torch (per-sequence SDPA, reference) or flex; auto: flex on CUDA, else torch",
    )
    batch_invariant: bool = Field(
        False, description="same bits alone or in any batch (16-row matmul tiles; slower alone)"
    )
    cuda_graphs: bool = Field(
        False, description="decode steps as CUDA graphs over batch-size buckets (triton + flex)"
    )
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    host: str = "127.0.0.1"
    port: int = 8000
    max_loras: int = Field(8, ge=1, description="device slots: distinct adapters in one step")
    max_cpu_loras: int = Field(32, ge=1, description="parsed adapters kept in host memory (LRU)")
    max_cpu_lora_bytes: int = Field(
        8 << 30,
        ge=1,
        description="host bytes of the parsed adapters kept in memory (LRU, with --max-cpu-loras)",
    )
    max_saved_module_bytes: int = Field(
        2 << 30,
        ge=0,
        description="device bytes for adapters' modules_to_save copies (lm_head, embeddings, norms), "
        "together; one adapter's copies above it are refused at upload",
    )
    max_lora_rank: int = Field(16, ge=1, description="largest rank accepted; slot buffers are this wide")
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens in one forward pass")
    prefill_chunk_tokens: int = Field(
        512, ge=1, description="long prompts are prefilled in chunks of this many tokens"
    )
    max_model_len: int | None = Field(
        None, description="context length (default: the model's, capped at 8192)"
    )
    kv_cache_tokens: int = Field(32768, ge=256, description="KV cache capacity in tokens")
    block_size: int = Field(16, ge=1, description="KV cache block size in tokens")
    max_queue: int = Field(
        256, ge=1, description="sequences in flight (each prompt x n choice is one) before 429"
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM/SIGINT, seconds requests in flight have to finish before they are "
        "aborted (0: abort at once); a second signal exits without waiting",
    )

    @field_validator("chat_template", "model", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        """LORAPLEX_X= (set, empty) means unset, as a shell script that clears a variable means."""
        return None if v == "" else v

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _modules(cls, v: Any) -> Any:
        """The environment's forms: a JSON list, one JSON object, or name=path entries separated by
        whitespace (vLLM's command-line form); empty is none. A list (the command line) as it is."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        return [text] if text.startswith("{") else _env_list(text)

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        """The environment's forms: names separated by whitespace (vLLM's command-line form) or a
        JSON list; empty is none. A list (the command line) as it is."""
        if isinstance(v, list):  # the command line; `--served-model-name ""` is unset, as before
            return [n for n in v if n != ""]
        return _env_list(v.strip()) if isinstance(v, str) else v

    @field_validator("served_model_name")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        twice = sorted({n for n in v if v.count(n) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} named twice")
        return v

    @property
    def store_dir(self) -> Path:
        return self.adapters_dir or self.cache_dir / "adapters"

    @staticmethod
    def split(value: str) -> list[str]:
        return [v.strip() for v in value.split(",") if v.strip()]

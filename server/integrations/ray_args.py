"""The arguments of the Ray Serve app's builder (`server.integrations.ray_serve:build_app`); no Ray
import here, so the CLI and the config tests validate them without Ray."""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Flags that are args of their own: they also size Serve's options, so they must not disagree.
_OWN_FLAGS = ("--host", "--port", "--adapters-dir", "--max-loras", "--max-num-seqs", "--max-queue")


class RayServeArgs(BaseModel):
    """`build_app`'s arguments (`serve run ... key=value` passes strings; pydantic converts)."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="engine replicas (one child `loraplex serve` each)")
    adapters_dir: str | None = Field(None, description="the store shared by every replica")
    serve_args: list[str] = Field(default_factory=list, description="more `loraplex serve` flags")
    env: dict[str, str] = Field(default_factory=dict, description="extra child env (no secrets)")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on CPU)")
    num_cpus: float = Field(1, ge=0, description="CPUs Ray reserves per replica")
    max_loras: int = Field(8, ge=1, description="the child's device slots = Serve's models/replica")
    max_num_seqs: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=1, description="the child's in-flight limit (429 beyond)")
    max_ongoing_requests: int | None = Field(None, description="default: max(max_queue, max_num_seqs)")
    max_queued_requests: int = Field(-1, description="Serve's queue per caller; beyond: 429")
    health_check_period_s: float = Field(10.0, gt=0)
    startup_timeout_s: float = Field(900.0, gt=0, description="first start may convert the model")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0, ge=0)

    @field_validator("serve_args", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> RayServeArgs:
        own = [a for a in self.serve_args if a.split("=", 1)[0] in _OWN_FLAGS]
        if own:
            raise ValueError(f"{own} are build_app args of their own, not serve_args")
        if self.replica_max_ongoing < self.max_num_seqs:
            # Serve's default (5) would starve continuous batching
            raise ValueError(f"max_ongoing_requests must be >= max_num_seqs ({self.max_num_seqs})")
        return self

    @property
    def replica_max_ongoing(self) -> int:
        """Default: what the child accepts in flight, so Serve never provokes a child's 429 and
        spills an adapter to a second replica only when the first is really full."""
        return self.max_ongoing_requests or max(self.max_queue, self.max_num_seqs)

    def child_args(self) -> list[str]:
        sized = ["--max-loras", str(self.max_loras), "--max-num-seqs", str(self.max_num_seqs)]
        return [*self.serve_args, *sized, "--max-queue", str(self.max_queue)]

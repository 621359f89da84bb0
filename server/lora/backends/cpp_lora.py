"""The `cpp` LoRA backend: lora_cpu.cpp, compiled for this CPU the first time it is needed (torch's
C++ extension builder, 10-30 s; cached after), called once per projection as a torch op.

What it computes and why it is batch invariant: see lora_cpu.cpp. Its reference is ops.lora_bag
(the `torch` backend on CPU) and the oracle ops.lora_reference; tests/unit/test_lora_cpp.py
compares them.

The build uses -march=native (or LORAPLEX_CPP_ARCH), so the cache directory is named for the
CPU's instruction sets and the flags as well as the source: a home directory shared by machines
with different CPUs never runs a build made for another. Nothing of a request reaches the build;
its inputs are this file's directory and the torch install.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.cpp")
# LORAPLEX_CPP_ARCH: the -march to build for (default native); tests build x86-64-v3 (AVX2) and
# x86-64 (SSE2 only) on any machine to run the code paths other CPUs take
ARCH = os.environ.get("LORAPLEX_CPP_ARCH", "native")
FLAGS = ("-O3", f"-march={ARCH}", "-fopenmp")  # OpenMP: at::parallel_for's threads are torch's own pool

_lock = threading.Lock()
_state: dict[str, str | bool] = {}
_ops: dict[str, Any] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability()


def _build_dir() -> Path:
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(FLAGS), torch.__version__, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("LORAPLEX_EXT_CACHE") or Path.home() / ".cache" / "loraplex" / "extensions")
    path = root / f"lora_cpu-{key}"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        # a read-only HOME (a container): no attempt to write there at all
        raise _Unavailable("no writable cache directory for its build; set LORAPLEX_EXT_CACHE")
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Unavailable(Exception):
    pass


def load() -> bool:
    """Build (once per CPU and source) and load the kernel; False, with the reason logged and kept
    in `error()`, where this machine cannot build it (no C++ compiler or ninja)."""
    with _lock:
        if "ok" not in _state:
            try:
                from torch.utils import cpp_extension

                directory = _build_dir()
                log.info("cpp LoRA backend: building or loading %s in %s", SOURCE.name, directory)
                cpp_extension.load(
                    name="loraplex_lora_cpu",
                    sources=[str(SOURCE)],
                    extra_cflags=list(FLAGS),
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(directory),
                    is_python_module=False,
                )
                _state["ok"] = True
            except Exception as e:  # a compiler, ninja or header missing: the caller decides
                _state["ok"] = False
                _state["error"] = _reason(e)
                log.warning("cpp LoRA backend unavailable: %s", _state["error"])
        return bool(_state["ok"])


def _reason(e: Exception) -> str:
    """The compiler's first error line where there is one (the builder's message ends with ninja's
    'build stopped'), else the message's last line."""
    if isinstance(e, _Unavailable):
        return str(e)
    lines = str(e).strip().splitlines() or [""]
    first = next((line for line in lines if "error:" in line), lines[-1])
    return f"{type(e).__name__}: {first.strip()}"


def error() -> str:
    return str(_state.get("error", ""))


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: torch.Tensor,
    rank: torch.Tensor,
    rows: torch.Tensor | None,
    slots: torch.Tensor,
) -> None:
    """y[rows] += the term of each row with its slot (semantics: ops.lora_reference, cast to y and
    added). y: [T, out] fp32, x: [T, in] fp32, A/B/scale/rank: a LoRALinear's slot buffers,
    rows: [n] ascending (None: the first n rows), slots: [n] int64."""
    _op()(y, x, A, B, scale, rank, rows, slots)


def _op() -> Any:
    """The op's overload, looked up once: torch.ops' name resolution costs microseconds a call,
    and the engine calls it once per projection per step."""
    if "op" not in _ops:
        _ops["op"] = torch.ops.loraplex_cpu.lora_add_.default
    return _ops["op"]

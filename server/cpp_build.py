"""Our CPU kernels (C++ sources beside the Python that calls them), compiled for this CPU the first
time one is needed with torch's C++ extension builder (10-30 s; cached after) and loaded as torch ops.

The build uses -march=native (or LORAPLEX_CPP_ARCH), so a cache directory is named for the CPU's
instruction sets and the flags as well as the source: a home directory shared by machines with
different CPUs never runs a build made for another. Nothing of a request reaches a build; its
inputs are the source file and the torch install.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from server import cpuinfo

log = logging.getLogger(__name__)

# LORAPLEX_CPP_ARCH: the -march to build for (default native); tests build x86-64-v3 (AVX2) and
# x86-64 (SSE2 only) on any machine to run the code paths other CPUs take
ARCH = os.environ.get("LORAPLEX_CPP_ARCH", "native")
FLAGS = ("-O3", f"-march={ARCH}", "-fopenmp")  # OpenMP: at::parallel_for's threads are torch's own pool


def _cpu_flags() -> str:
    return cpuinfo.field("flags") or torch.backends.cpu.get_cpu_capability()


class _Unavailable(Exception):
    pass


class CppKernel:
    """One C++ source built into its own library of torch ops (registered by its TORCH_LIBRARY)."""

    def __init__(self, name: str, source: Path, what: str, flags: tuple[str, ...] = FLAGS) -> None:
        self.name = name
        self.source = source
        self.what = what  # for the log: "cpp LoRA backend"
        self.flags = flags  # another -march: bench/kernel_isa.py's AVX2 builds beside the native ones
        self._lock = threading.Lock()
        self._ok: bool | None = None
        self._error = ""

    def load(self) -> bool:
        """Build (once per CPU and source) and load the library; False, with the reason logged and
        kept in `error()`, where this machine cannot build it (no C++ compiler or ninja)."""
        with self._lock:
            if self._ok is None:
                try:
                    from torch.utils import cpp_extension

                    directory = self._build_dir()
                    log.info("%s: building or loading %s in %s", self.what, self.source.name, directory)
                    cpp_extension.load(
                        name=self.name,
                        sources=[str(self.source)],
                        extra_cflags=list(self.flags),
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(directory),
                        is_python_module=False,
                    )
                    self._ok = True
                except Exception as e:  # a compiler, ninja or header missing: the caller decides
                    self._ok = False
                    self._error = _reason(e)
                    log.warning("%s unavailable: %s", self.what, self._error)
            return self._ok

    def error(self) -> str:
        return self._error

    def _build_dir(self) -> Path:
        parts = [self.source.read_text(), " ".join(self.flags), torch.__version__, _cpu_flags()]
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        default = Path.home() / ".cache" / "loraplex" / "extensions"
        root = Path(os.environ.get("LORAPLEX_EXT_CACHE") or default)
        path = root / f"{self.source.stem}-{key}"
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            # a read-only HOME (a container): no attempt to write there at all
            raise _Unavailable("no writable cache directory for its build; set LORAPLEX_EXT_CACHE")
        path.mkdir(parents=True, exist_ok=True)
        return path


def load_together(kernels: list[CppKernel]) -> None:
    """Build (or load) several kernels at once, each in its own thread: a build is one compiler
    process on one core, so a first start on two cores builds the three in about the time of two.
    Each kernel's own lock makes a later `load()` wait for the build, then read its result."""
    threads = [threading.Thread(target=k.load, name=f"build {k.name}") for k in kernels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _reason(e: Exception) -> str:
    """The compiler's first error line where there is one (the builder's message ends with ninja's
    'build stopped'), else the message's last line."""
    if isinstance(e, _Unavailable):
        return str(e)
    lines = str(e).strip().splitlines() or [""]
    first = next((line for line in lines if "error:" in line), lines[-1])
    return f"{type(e).__name__}: {first.strip()}"

"""Our C++ kernels compile different code for other CPUs (AVX2 intrinsics for x86-64-v3, the
scalar paths for baseline x86-64). A kernel's test file runs itself again in a subprocess with such
a build (LORAPLEX_CPP_ARCH, server/cpp_build.py), so an AVX2-only machine runs code tested here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
ARCHES = ["x86-64-v3", "x86-64"]
# on a test that runs the others: a subprocess under another build must not start more of them
not_in_a_build = pytest.mark.skipif(
    bool(os.environ.get("LORAPLEX_CPP_ARCH")), reason="already a build for another CPU"
)


def run_built_for(arch: str, test_file: str, at_least: int, keyword: str | None = None) -> None:
    """Run `test_file` (its tests matching `keyword`) with the kernels built for `arch`; at least
    `at_least` of them must pass (built, not skipped)."""
    env = {**os.environ, "LORAPLEX_CPP_ARCH": arch, "PYTHONPATH": str(ROOT)}
    selected = ["-k", keyword] if keyword else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selected]
    out = subprocess.run([*cmd, test_file], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None and int(passed.group(1)) >= at_least, out.stdout[-500:]


def on_one_thread(fn: Callable[[], T]) -> T:
    """fn() with torch's CPU thread pool at one thread: a kernel's split over threads is then gone."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)

"""Our C++ kernels compile different code for other CPUs (AVX2 intrinsics for x86-64-v3, the
scalar paths for baseline x86-64). A kernel's test file runs itself again in a subprocess with such
a build (LORAPLEX_CPP_ARCH, server/cpp_build.py), so an AVX2-only machine runs code tested here."""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import pytest
import torch

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
ARCHES = ["x86-64-v3", "x86-64"]
# on a test that runs the others: a subprocess under another build must not start more of them
not_in_a_build = pytest.mark.skipif(
    bool(os.environ.get("LORAPLEX_CPP_ARCH")), reason="already a build for another CPU"
)


@dataclass
class _Run:
    """One test file running under one build, its output going to a file (never a pipe that a
    run's neighbour could leave full)."""

    process: subprocess.Popen[bytes]
    log: IO[bytes]

    def result(self) -> tuple[int, str]:
        """The exit status and the output, once it ends."""
        try:
            status = self.process.wait(timeout=600)
        finally:
            self.process.kill()  # after a timeout: none left running
        with self.log:
            self.log.seek(0)
            return status, self.log.read().decode(errors="replace")


_runs: dict[tuple[str, str], _Run] = {}  # (arch, test file): started, not yet collected
_started: set[str] = set()


def _start(arch: str, test_file: str, keyword: str | None) -> _Run:
    env = {**os.environ, "LORAPLEX_CPP_ARCH": arch, "PYTHONPATH": str(ROOT)}
    selected = ["-k", keyword] if keyword else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selected, test_file]
    log = tempfile.TemporaryFile()  # noqa: SIM115 (it outlives this call: closed by _Run.result)
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return _Run(process, log)


@atexit.register
def _stop_leftovers() -> None:
    """Runs started for tests that were then deselected or failed first: ended with the session."""
    for run in _runs.values():
        run.process.kill()


def run_built_for(arch: str, test_file: str, at_least: int, keyword: str | None = None) -> None:
    """Run `test_file` (its tests matching `keyword`) with the kernels built for `arch`; at least
    `at_least` of them must pass (built, not skipped).

    The first call for a file starts its runs under every build in ARCHES at once, and each call
    collects its own: a run is mostly a single-threaded compiler build, so the two side by side
    take about half the wall time on two cores (32 s against 56 s for the LoRA kernel's on a cold
    cache, an AVX2 EPYC; a fresh clone always builds them: the build directory's ninja file names
    the venv's headers)."""
    if test_file not in _started:
        _started.add(test_file)
        for other in ARCHES:
            _runs[(other, test_file)] = _start(other, test_file, keyword)
    run = _runs.pop((arch, test_file), None) or _start(arch, test_file, keyword)  # a second time
    status, out = run.result()
    assert status == 0, out[-5000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= at_least, out[-500:]


def on_one_thread(fn: Callable[[], T]) -> T:
    """fn() with torch's CPU thread pool at one thread: a kernel's split over threads is then gone."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)

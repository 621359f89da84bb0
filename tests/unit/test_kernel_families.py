"""The invariance tests again, in subprocesses that force other CPU kernel families: a guarantee that
held on one CPU's kernels by luck would fail here. The families:

- avx2: MKL and ATen limited to AVX2 (what an AVX2-only machine runs; on AMD, MKL runs its AVX2
  path natively);
- compatible: MKL's conditional-reproducibility generic path, ATen's baseline kernels (the
  padding-to-16-rows scheme this replaced is not row-invariant there) and OpenBLAS's SSE3 kernels
  (numpy's, which Triton's interpreter runs for tl.dot: there a row keeps its bits wherever it sits
  in a tile, so the interpreted kernels' rows alone vs batched are checked on every CPU);
- other-threads: a different split of the work across threads: one thread, or all the cores where
  this process has one (a pytest-xdist worker's share of a two-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "compatible": {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "OPENBLAS_CORETYPE": "Prescott",
    },
    "other-threads": dict.fromkeys(
        ("OMP_NUM_THREADS", "MKL_NUM_THREADS"),
        "1" if torch.get_num_threads() > 1 else str(len(os.sched_getaffinity(0))),
    ),
}
# A fingerprint of the kernels a process runs: the bits of a GEMM, a softmax and a sum.
FINGERPRINT = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
x, w = torch.randn(7, 576, generator=g), torch.randn(1536, 576, generator=g)
parts = [torch.nn.functional.linear(x, w), torch.softmax(x, -1), x.sum(-1)]
digest = hashlib.sha256(b"".join(p.numpy().tobytes() for p in parts)).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""


def _env(family: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **family, "PYTHONPATH": str(ROOT)}


def _fingerprint(env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", FINGERPRINT], env=env, capture_output=True, text=True, check=True
    )
    capability, digest = out.stdout.split()
    return capability, digest


def test_families_really_switch_kernels() -> None:
    native = _fingerprint(_env({}))
    avx2 = _fingerprint(_env(FAMILIES["avx2"]))
    compatible = _fingerprint(_env(FAMILIES["compatible"]))
    assert avx2[0] == "AVX2"
    assert compatible[0] == "DEFAULT"
    assert compatible[1] != native[1], "MKL_CBWR=COMPATIBLE did not change the kernels' results"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_invariance_under_kernel_family(family: str) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "invariance", "-p", "no:cacheprovider", "tests/unit"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(FAMILIES[family]), capture_output=True, text=True)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"invariance tests fail under the {family} kernels:\n{tail}"
    assert " passed" in run.stdout and "deselected" in run.stdout, tail
    if family == "compatible":  # the interpreter's rows alone vs batched ran, and passed
        assert "xfailed" not in run.stdout and "xpassed" not in run.stdout, tail

"""cpuinfo: /proc/cpuinfo's fields, whether MKL runs its AVX-512 kernels, and the row limits of
`plain` that follow from it (base_gemm.cpu_matmul_rows / cpu_dense_rows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server import cpuinfo
from server.model import base_gemm, dense_cpu, nf4_cpu

INTEL = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx2 avx512f\n"
)
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f\n"
INTEL_AVX2 = INTEL.replace(" avx512f", "")


def _cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str | None) -> None:
    path = tmp_path / ("cpuinfo" if text is not None else "missing")
    if text is not None:
        path.write_text(text + "processor\t: 1\nvendor_id\t: Other\n")
    monkeypatch.setattr(cpuinfo, "CPUINFO", path)
    for name in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"):
        monkeypatch.delenv(name, raising=False)


def test_fields_of_the_first_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _cpu(monkeypatch, tmp_path, INTEL)
    assert cpuinfo.field("vendor_id") == "GenuineIntel"
    assert cpuinfo.field("model name") == "Intel(R) Xeon(R)"
    assert cpuinfo.field("flags").split() == ["fpu", "avx2", "avx512f"]
    assert cpuinfo.field("model") == ""  # a whole key, not a prefix of "model name"
    _cpu(monkeypatch, tmp_path, None)  # no such file (not Linux)
    assert cpuinfo.field("vendor_id") == ""
    assert not cpuinfo.mkl_avx512()


@pytest.mark.parametrize(
    ("text", "env", "want"),
    [
        (INTEL, {}, True),
        (AMD, {}, False),  # MKL runs its AVX2 kernels on AMD's AVX-512
        (INTEL_AVX2, {}, False),
        (INTEL, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, False),
        (INTEL, {"MKL_ENABLE_INSTRUCTIONS": "AVX512_E4"}, True),
        (INTEL, {"MKL_CBWR": "COMPATIBLE"}, False),
        (INTEL, {"MKL_CBWR": "AVX2,STRICT"}, False),
        (INTEL, {"MKL_CBWR": "AVX512,STRICT"}, True),
        (INTEL, {"MKL_CBWR": "AUTO"}, True),
    ],
)
def test_mkl_avx512(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, env: dict[str, str], want: bool
) -> None:
    _cpu(monkeypatch, tmp_path, text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpuinfo.mkl_avx512() == (want and torch.backends.mkl.is_available())


@pytest.mark.parametrize("mkl", [True, False])
@pytest.mark.parametrize("lanes", [8, 16, 1])
def test_row_limits_follow_the_build_and_the_blas(
    monkeypatch: pytest.MonkeyPatch, lanes: int, mkl: bool
) -> None:
    """Our products hand rows to a BLAS matmul sooner where it is MKL's AVX-512 one (figure 9); a
    build with no vector path falls back to the AVX2 build's limits (the base does not run it)."""
    monkeypatch.setattr(base_gemm, "_limits", {})
    monkeypatch.setattr(nf4_cpu, "lanes", lambda: lanes)
    monkeypatch.setattr(dense_cpu, "lanes", lambda: lanes)
    monkeypatch.setattr(cpuinfo, "mkl_avx512", lambda: mkl)
    key = (lanes, mkl) if lanes > 1 else (8, False)
    assert base_gemm.cpu_matmul_rows() == base_gemm.CPU_MATMUL_ROWS[key]
    assert base_gemm.cpu_dense_rows() == base_gemm.CPU_DENSE_ROWS[key]


def test_row_limits_inside_a_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/base_matmul.py's step check sets other limits for a block; the machine's come back."""
    monkeypatch.setattr(base_gemm, "_limits", {"matmul": 24, "dense": 24})
    with base_gemm.row_limits(64, 128):
        assert (base_gemm.cpu_matmul_rows(), base_gemm.cpu_dense_rows()) == (64, 128)
    assert (base_gemm.cpu_matmul_rows(), base_gemm.cpu_dense_rows()) == (24, 24)
    with pytest.raises(RuntimeError), base_gemm.row_limits(1, 2):
        raise RuntimeError
    assert (base_gemm.cpu_matmul_rows(), base_gemm.cpu_dense_rows()) == (24, 24)

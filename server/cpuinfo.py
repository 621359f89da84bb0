"""What Linux says of this machine's CPU (/proc/cpuinfo), and which kernels torch's BLAS runs on it.

Where our CPU kernels hand rows over to a BLAS matmul depends on how fast that matmul is, and MKL
(torch's BLAS on x86) runs its AVX-512 kernels only on Intel CPUs: on an AMD CPU with AVX-512 it
runs its AVX2 ones (README figure 9), unless its own environment variables hold it to fewer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def field(name: str) -> str:
    """The first CPU's `name` line of /proc/cpuinfo ("" where there is no such file or line)."""
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def mkl_avx512() -> bool:
    """Whether torch's matmuls run MKL's AVX-512 kernels: MKL is torch's BLAS, the CPU is Intel's
    and has AVX-512, and neither MKL_ENABLE_INSTRUCTIONS nor MKL_CBWR (read by MKL at start-up)
    holds it to an older instruction set."""
    if not torch.backends.mkl.is_available() or field("vendor_id") != "GenuineIntel":
        return False
    if "avx512f" not in field("flags").split():
        return False
    enabled = os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper()
    if enabled and not enabled.startswith("AVX512"):
        return False
    branch = os.environ.get("MKL_CBWR", "").split(",")[0].strip().upper()  # "AVX2,STRICT"
    return branch in ("", "AUTO") or branch.startswith("AVX512")

"""Our C++ kernels' AVX-512 code compiles on any machine. Only an AVX-512 CPU can run it (there the
kernels' own tests run it: it is the native build), and the other builds' tests run the AVX2 and
baseline code everywhere (tests/cpu_builds.py); without this, an AVX2-only machine would never
see the AVX-512 branches at all. Compiled, never loaded: a library built for AVX-512 may use its
instructions anywhere, its registration code included."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from server.lora.backends import cpp_lora
from server.model import dense_cpu, nf4_cpu

SOURCES = [kernel.source for kernel in (nf4_cpu.KERNEL, dense_cpu.KERNEL, cpp_lora.KERNEL)]
CXX = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_the_avx512_code_compiles(source: Path) -> None:
    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    flags = ["-std=c++20", "-O1", "-march=x86-64-v4", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    # -dM -E first: the AVX-512 branches are the ones compiled (the guards see __AVX512F__)
    macros = subprocess.run(
        [str(CXX), *flags, "-dM", "-E", "-x", "c++", "/dev/null"], capture_output=True, text=True
    )
    assert "__AVX512F__" in macros.stdout and "__FMA__" in macros.stdout
    out = subprocess.run(
        [str(CXX), *flags, *includes, "-c", "-o", "/dev/null", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]

"""Backend selection at start-up: one place, logged, bad choices refused by name; the CLI flags."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from server.cli import _add_settings_flags, _settings
from server.cpp_build import CppKernel, load_together
from server.engine.backends import select_backends
from server.errors import BackendError
from server.lora.backends import cpp_lora
from server.model.base_gemm import BaseGemm

CPU = torch.device("cpu")


def test_cpu_defaults_and_invariant_mode(caplog: pytest.LogCaptureFixture) -> None:
    """auto on a CPU: the cpp LoRA kernel where it builds (a C++ compiler here), else torch."""
    lora = "cpp" if cpp_lora.load() else "torch"
    with caplog.at_level(logging.INFO, logger="server.engine.backends"):
        plain = select_backends(CPU)
    assert (plain.lora, plain.attention, plain.base_gemm, plain.batch_invariant) == (
        lora,
        "torch",
        BaseGemm.PLAIN,
        False,
    )
    assert (
        f"backends: device=cpu lora={lora} lora_dtype=float32 attention=torch base_gemm=plain" in caplog.text
    )
    assert select_backends(CPU, lora="torch").lora == "torch"
    # a bf16 base adds into bf16 outputs, which the kernel does not: auto keeps torch there
    assert select_backends(CPU, compute_dtype=torch.bfloat16).lora == "torch"
    with pytest.raises(BackendError, match="--cuda-graphs needs a CUDA device"):
        select_backends(CPU, cuda_graphs=True)
    assert select_backends(CPU, batch_invariant=True).base_gemm is BaseGemm.TILED
    assert select_backends(torch.device("cuda"), batch_invariant=False).base_gemm is BaseGemm.BNB
    assert select_backends(torch.device("cuda"), batch_invariant=True).base_gemm is BaseGemm.TILED


@pytest.mark.parametrize(
    ("kwargs", "named"), [({"lora": "punica"}, "punica"), ({"attention": "xformers"}, "xformers")]
)
def test_unknown_backend_is_refused_by_name(kwargs: dict[str, str], named: str) -> None:
    with pytest.raises(BackendError, match=named):
        select_backends(CPU, **kwargs)  # type: ignore[arg-type]


def test_cpp_backend_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match="cpp is the CPU kernel"):
        select_backends(torch.device("cuda"), lora="cpp")
    with pytest.raises(BackendError, match="fp32 outputs"):
        select_backends(CPU, lora="cpp", compute_dtype=torch.bfloat16)
    monkeypatch.setattr(cpp_lora.KERNEL, "_ok", False)
    monkeypatch.setattr(cpp_lora.KERNEL, "_error", "RuntimeError: no compiler")
    with pytest.raises(BackendError, match=r"could not build its kernel \(RuntimeError: no compiler"):
        select_backends(CPU, lora="cpp")
    assert select_backends(CPU).lora == "torch", "auto must fall back where the kernel does not build"


def test_nf4_dequantization_choice(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Our CPU kernel dequantizes NF4 for an fp32 base where it builds (the same bits as
    bitsandbytes); a bf16 base, CUDA, or a machine that cannot build it keep bitsandbytes."""
    from server.model import nf4_cpu

    with caplog.at_level(logging.INFO, logger="server.engine.backends"):
        chosen = select_backends(CPU)
    want = "cpp" if nf4_cpu.load() else "bnb"
    assert chosen.dequant == want and f"dequant={want}" in caplog.text
    assert select_backends(CPU, compute_dtype=torch.bfloat16).dequant == "bnb"
    assert select_backends(torch.device("cuda")).dequant == "bnb"
    monkeypatch.setattr(nf4_cpu.KERNEL, "_ok", False)
    assert select_backends(CPU).dequant == "bnb"


def test_cpu_kernels_are_built_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first start builds its CPU kernels at once, one thread each (each build is one compiler
    process): every load() below waits at a barrier that only opens with all of them inside. With
    `--lora-backend torch` the LoRA kernel is not built at all."""
    import threading

    from server.model import dense_cpu, nf4_cpu

    kernels = [nf4_cpu.KERNEL, dense_cpu.KERNEL, cpp_lora.KERNEL]
    inside = threading.Barrier(3, timeout=60)
    built: list[str] = []

    def building(kernel: CppKernel) -> Callable[[], bool]:
        def load() -> bool:
            if kernel.name not in built:  # a later load() finds it built
                built.append(kernel.name)
                inside.wait()  # raises BrokenBarrierError after 60 s if they never overlap
            return True

        return load

    for kernel in kernels:
        monkeypatch.setattr(kernel, "load", building(kernel))
    load_together(kernels)
    assert sorted(built) == sorted(k.name for k in kernels) and not inside.broken

    built.clear()
    inside = threading.Barrier(2, timeout=60)
    select_backends(CPU, lora="torch")
    assert sorted(built) == sorted([nf4_cpu.KERNEL.name, dense_cpu.KERNEL.name]) and not inside.broken


def test_lora_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 by default (PEFT's), whatever the compute dtype; auto follows the compute dtype, as
    vLLM's; the half dtypes as asked; a name not among them, or bf16 in the Triton interpreter,
    refused with the flag's name."""
    assert select_backends(CPU, compute_dtype=torch.bfloat16).lora_dtype == torch.float32
    assert select_backends(CPU, lora_dtype="auto", compute_dtype=torch.bfloat16).lora_dtype == torch.bfloat16
    assert select_backends(CPU, lora_dtype="auto").lora_dtype == torch.float32
    assert select_backends(CPU, lora_dtype="float16").lora_dtype == torch.float16
    assert "lora_dtype=bfloat16" in select_backends(CPU, lora_dtype="bfloat16").describe()
    with pytest.raises(BackendError, match="--lora-dtype 'fp8'"):
        select_backends(CPU, lora_dtype="fp8")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backends(CPU, lora="triton", lora_dtype="float16").lora_dtype == torch.float16
    with pytest.raises(BackendError, match="no bf16 arithmetic"):
        select_backends(CPU, lora="triton", lora_dtype="bfloat16")


def test_cli_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    on = _settings(
        parser.parse_args(["--batch-invariant", "--lora-backend", "torch", "--prefill-chunk-tokens", "64"])
    )
    assert on.batch_invariant and on.lora_backend == "torch" and on.prefill_chunk_tokens == 64
    assert not _settings(parser.parse_args(["--no-batch-invariant"])).batch_invariant
    assert not _settings(parser.parse_args([])).batch_invariant
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-backend", "nonsense"])
    assert _settings(parser.parse_args(["--lora-dtype", "bfloat16"])).lora_dtype == "bfloat16"
    assert _settings(parser.parse_args([])).lora_dtype == "float32"
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-dtype", "float64"])


def test_flex_on_cuda_needs_kv_blocks_its_kernel_tiles_divide() -> None:
    """The compiled flex kernel's key tile is 16 wide (attn_flex.TRITON_TILES), so on CUDA a KV
    block size it does not divide is refused at start with the flag's name; the CPU paths take any."""
    from server.engine.attn_flex import Q_BLOCK, TRITON_TILES

    assert Q_BLOCK % TRITON_TILES["BLOCK_M"] == 0
    cuda = torch.device("cuda")
    with pytest.raises(BackendError, match="--block-size a multiple of 16; got 8"):
        select_backends(cuda, attention="flex", block_size=8)
    assert select_backends(cuda, attention="flex", block_size=32).attention == "flex"
    assert select_backends(CPU, attention="flex", block_size=8).attention == "flex"
    assert select_backends(cuda, attention="torch", block_size=8).attention == "torch"


def test_cuda_auto_takes_the_kernels_the_gpu_check_verified() -> None:
    """On CUDA, auto is triton + flex (bench/results/gpu_check/h200-run1.json); flex only where its
    tiles divide the KV blocks, else torch attention."""
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    chosen = select_backends(cuda)
    assert (chosen.lora, chosen.attention, chosen.base_gemm) == ("triton", "flex", BaseGemm.BNB)
    assert select_backends(cuda, block_size=8).attention == "torch"
    assert select_backends(cuda, cuda_graphs=True).cuda_graphs
    assert select_backends(CPU).lora in ("cpp", "torch") and select_backends(CPU).attention == "torch"


def test_cuda_batch_invariance_needs_the_triton_lora_rows() -> None:
    """torch's bmm rows changed bits with the batch on the H200, the SGMV kernels did not; flex
    forces Inductor's main kernel (no split keys), so it serves the invariant mode, graphs too."""
    pytest.importorskip("triton")
    from server.engine.attn_flex import TRITON_TILES

    cuda = torch.device("cuda")
    with pytest.raises(BackendError, match="--batch-invariant with --lora-backend torch on CUDA"):
        select_backends(cuda, lora="torch", batch_invariant=True)
    chosen = select_backends(cuda, batch_invariant=True, cuda_graphs=True)
    assert (chosen.lora, chosen.attention, chosen.base_gemm) == ("triton", "flex", BaseGemm.TILED)
    assert TRITON_TILES["FORCE_USE_FLEX_ATTENTION"] is True
    # the CPU keeps its torch oracle in the invariant mode
    assert select_backends(CPU, lora="torch", batch_invariant=True).lora == "torch"

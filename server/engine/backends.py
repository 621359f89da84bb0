"""The one place that chooses the compute backends, once, at start-up, and logs the choice.

- LoRA term: `torch` (per-token products in plain torch: the oracle; on CPU as embedding-bag sums
  over the slot factors read in place, on CUDA as `bmm` items), `triton` (our SGMV kernels; CUDA, or
  the interpreter under TRITON_INTERPRET=1 for tests) or `cpp` (lora_cpu.cpp: a projection's whole
  term in one call, compiled for this CPU at the first start, 10-30 s, then cached; its reference is
  the torch backend's bag form, with a test between them). `auto` is triton on CUDA when it imports
  (bench/gpu_check.py on an H200: within 1.4e-6 of the reference in fp32, and every row the same
  bits in any batch of 1 to 2048, where the `bmm` rows were not); on CPU cpp where it builds (a C++
  compiler and ninja; fp32 base), else torch. On the Intel Xeon of 2026-12-05 cpp took the batch-16
  decode step from 1.36x to 1.23x the base step at 16 adapters, 1.23x to 1.11x at one.
- Attention: `torch` (per-sequence SDPA over the paged cache: the CPU default and the oracle) or
  `flex` (FlexAttention through block tables; compiled on CUDA, eager on CPU). `auto` is flex on
  CUDA (on the H200: within 4e-7 of SDPA, a row alone the same bits as batched, and 7x the torch
  path's decode rate at batch 256 without graphs), torch elsewhere.
- LoRA dtype (`--lora-dtype`): the factors' dtype, in which the term is computed. float32 (default)
  is PEFT's: it upcasts half-precision adapters (autocast_adapter_dtype) and casts the term before
  the add. bfloat16/float16 is the fast mode, what PEFT computes with autocast_adapter_dtype=False
  and vLLM by default: half the slot memory and, in the Triton kernels, half-precision products with
  fp32 accumulation. `auto` is the compute dtype. Each mode is batch invariant by construction
  (on CUDA, the Triton kernels).
- Base matmul: `bnb` on CUDA (bitsandbytes' kernels), `plain` on CPU, `tiled` under batch invariance
  (NF4 dequantized by bitsandbytes, then fixed 16-row tiles, on either device).
- Batch invariance (`--batch-invariant`): each token's output is the same bits alone or in any
  batch. It is off by default, chosen by the numbers (bench/single_stream.py): on CPU the 16-row
  tiles make a lone request pay for 16 rows, about 0.5-0.7x transformers' `generate` where the
  plain matmul reaches 1.00-1.06x; from 16 rows up both cost the same. Off, the LoRA term and the
  prefill chunking stay invariant; only the base and lm_head matmuls may differ in the last bits
  (on CUDA, bitsandbytes' gemm_4bit changes kernel with the row count: measured on the H200).
  On CUDA it needs the triton LoRA backend: `bmm` picks its kernel by the row count.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from server.errors import BackendError
from server.model.base_gemm import BaseGemm

log = logging.getLogger(__name__)

LORA_BACKENDS = ("auto", "torch", "triton", "cpp")
LORA_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ATTENTION_BACKENDS = ("auto", "torch", "flex")


@dataclass(frozen=True, slots=True)
class Backends:
    device: torch.device
    lora: str
    attention: str
    base_gemm: BaseGemm
    batch_invariant: bool
    cuda_graphs: bool = False
    lora_dtype: torch.dtype = torch.float32
    # who dequantizes NF4 weights for the plain and tiled base: "cpp" (our CPU kernel, the same
    # bits, server/model/nf4_cpu.py) or "bnb" (bitsandbytes)
    dequant: str = "bnb"

    def describe(self) -> str:
        return (
            f"device={self.device.type} lora={self.lora} "
            f"lora_dtype={str(self.lora_dtype).removeprefix('torch.')} attention={self.attention} "
            f"base_gemm={self.base_gemm.value} batch_invariant={self.batch_invariant} "
            f"cuda_graphs={self.cuda_graphs} dequant={self.dequant}"
        )


def select_backends(
    device: torch.device,
    lora: str = "auto",
    attention: str = "auto",
    batch_invariant: bool = False,
    cuda_graphs: bool = False,
    lora_dtype: str = "float32",
    compute_dtype: torch.dtype = torch.float32,
    block_size: int = 16,
) -> Backends:
    """Resolve `auto` for this device and refuse what cannot run, naming the combination.
    `compute_dtype`: the base's (what `--lora-dtype auto` means)."""
    if lora not in LORA_BACKENDS:
        raise BackendError(f"unknown --lora-backend {lora!r}; choose one of {', '.join(LORA_BACKENDS)}")
    if lora_dtype != "auto" and lora_dtype not in LORA_DTYPES:
        raise BackendError(
            f"unknown --lora-dtype {lora_dtype!r}; choose one of auto, {', '.join(LORA_DTYPES)}"
        )
    factors = compute_dtype if lora_dtype == "auto" else LORA_DTYPES[lora_dtype]
    if attention not in ATTENTION_BACKENDS:
        raise BackendError(
            f"unknown --attention-backend {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    cuda = device.type == "cuda"
    cpu_fp32 = not cuda and compute_dtype == torch.float32  # where our CPU kernels apply
    if cpu_fp32:
        _build_cpu_kernels(with_lora=lora in ("auto", "cpp"))
    if lora == "auto":
        lora = "triton" if cuda and importlib.util.find_spec("triton") is not None else "torch"
        if cpu_fp32:
            from server.lora.backends import cpp_lora

            lora = "cpp" if cpp_lora.load() else "torch"  # load() logs why not
    if lora == "cpp":
        _check_cpp(device, compute_dtype)
    if lora == "torch" and cuda and batch_invariant:
        raise BackendError(
            "--batch-invariant with --lora-backend torch on CUDA: torch's bmm picks its kernel by the row "
            "count, so a token's LoRA term changes with the batch; use --lora-backend triton (or auto)"
        )
    if attention == "auto":
        attention = "flex" if cuda and _has_flex() and _flex_fits(block_size) else "torch"
    if lora == "triton":
        _check_triton(device, "--lora-backend triton")
        if not cuda and factors == torch.bfloat16:
            raise BackendError(
                "--lora-backend triton with bfloat16 factors on cpu: the Triton interpreter has no bf16 "
                "arithmetic; use --lora-dtype float16 or float32, or --lora-backend torch"
            )
    plain = BaseGemm.BNB if cuda else BaseGemm.PLAIN
    base_gemm = BaseGemm.TILED if batch_invariant else plain
    dequant = "bnb"
    if cpu_fp32:
        from server.model import nf4_cpu

        dequant = "cpp" if nf4_cpu.load() else "bnb"  # the same bits either way; load() logs why not
    if attention == "flex":
        if not _has_flex():
            raise BackendError(
                "--attention-backend flex needs torch >= 2.5 (torch.nn.attention.flex_attention)"
            )
        if cuda:
            from server.engine.attn_flex import check_block_size

            check_block_size(block_size)
    if cuda_graphs and not (cuda and lora == "triton" and attention == "flex"):
        raise BackendError(
            f"--cuda-graphs needs a CUDA device with --lora-backend triton and --attention-backend flex "
            f"(static shapes end to end); got device={device.type} lora={lora} attention={attention}"
        )
    chosen = Backends(
        device=device,
        lora=lora,
        attention="flex" if attention == "flex" else "torch",
        base_gemm=base_gemm,
        batch_invariant=batch_invariant,
        cuda_graphs=cuda_graphs,
        lora_dtype=factors,
        dequant=dequant,
    )
    log.info("backends: %s", chosen.describe())
    return chosen


def _build_cpu_kernels(with_lora: bool) -> None:
    """The CPU kernels this start may use, built side by side (a first start's 10-30 s each); the
    choices below then find them loaded. The LoRA kernel only where it may be chosen."""
    from server.cpp_build import load_together
    from server.lora.backends import cpp_lora
    from server.model import dense_cpu, nf4_cpu

    load_together([nf4_cpu.KERNEL, dense_cpu.KERNEL, *([cpp_lora.KERNEL] if with_lora else [])])


def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def _flex_fits(block_size: int) -> bool:
    from server.engine.attn_flex import fits_block_size  # imports flex: only once _has_flex()

    return fits_block_size(block_size)


def _check_cpp(device: torch.device, compute_dtype: torch.dtype) -> None:
    if device.type != "cpu":
        raise BackendError(f"--lora-backend cpp is the CPU kernel; on {device.type} use triton or torch")
    if compute_dtype != torch.float32:
        raise BackendError(
            f"--lora-backend cpp adds into fp32 outputs; the base computes in {compute_dtype}: use torch"
        )
    from server.lora.backends import cpp_lora

    if not cpp_lora.load():
        raise BackendError(
            f"--lora-backend cpp could not build its kernel ({cpp_lora.error()}); it needs a C++ compiler "
            "and ninja: install them or use --lora-backend torch"
        )


def _check_triton(device: torch.device, what: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise BackendError(f"{what} needs the triton package: pip install 'loraplex[triton]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            f"{what} on {device.type}: the Triton kernels need a CUDA device "
            "(or TRITON_INTERPRET=1, the interpreter, for tests)"
        )

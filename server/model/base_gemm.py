"""The base projection's matmul: one shared product for every token of the step, in one of three modes.

- `bnb`: the bitsandbytes module itself. On CUDA its kernels pick by row count (a GEMV kernel for
  a few tokens, dequantize + cuBLAS above); the GPU default.
- `plain`: one matmul over all rows. Fastest at small batches (a single token is a GEMV), but CPU
  BLAS picks its kernel by row count, so a token's last bits depend on how many tokens share it.
- `tiled`: the rows are cut into tiles of exactly TILE rows (the last one zero-padded) and each
  tile is its own matmul. Every call has the same shape whatever the batch, so a token's output is
  the same bits alone or in any batch: batch invariance from the shapes, not from one CPU's kernels.
  A row's place in its tile does move with the batch; a shape whose kernel computes the places of
  a tile differently is found by a check and runs one row per call instead (tile_keeps_rows).
- `nf4_triton` (opt-in): an NF4 weight in one fixed-tile Triton kernel that dequantizes inside
  (nf4_matmul.py), row-invariant too; anything else (a full-precision weight) runs `tiled`.

NF4 weights are dequantized with bitsandbytes' own kernels, exactly as its CPU `gemm_4bit` does,
so both modes compute what bitsandbytes and PEFT compute, without the module's per-call overhead;
on a CPU computing in fp32, by our kernel with the same bits (nf4_cpu.py: `dequant=cpp`). There
(with AVX2 or AVX-512), an NF4 projection does not write its weight out at all: our kernel decodes
each weight in registers to the same value and multiplies it into the rows (nf4_cpu.matmul), a
row's sums in an order no other row can change. `tiled` uses it for every row count (row-invariant by
construction, and faster than the tiles at every size measured); `plain` up to cpu_matmul_rows()
rows, above which dequantizing once for a BLAS matmul pays (bench/base_matmul.py, README figure 9).
The double-quantized block scales are decoded once at load (keep_block_scales) where bitsandbytes
decodes them again in every call: the same fp32 values, for 4 bytes per 64 weights. The fp32
lm_head goes the same way where those kernels run (keep_dense): our row-invariant product
(dense_cpu.matmul) in `tiled` at every row count and in `plain` up to cpu_dense_rows() rows.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from server import cpuinfo
from server.model import dense_cpu, nf4_cpu

# SGLang's segment size; also the row count above which CPU GEMM kernels stop changing path.
TILE = 16


class BaseGemm(enum.Enum):
    BNB = "bnb"
    PLAIN = "plain"
    TILED = "tiled"
    # one Triton launch per projection, dequantizing inside, row-invariant (nf4_matmul.py); opt-in
    NF4_TRITON = "nf4_triton"

    @property
    def invariant(self) -> bool:
        """Whether a row's bits are the same in any batch (the batch-invariant modes)."""
        return self in (BaseGemm.TILED, BaseGemm.NF4_TRITON)


# attribute of a Linear4bit: its quant state with the block scales decoded (keep_block_scales)
DECODED_STATE = "loraplex_decoded_state"
# attribute of a Linear4bit whose fp32 dequantization runs in our CPU kernel (nf4_cpu.py)
CPP_DEQUANT = "loraplex_cpp_dequant"
# attribute of a Linear4bit whose fp32 product runs in our CPU kernel without dequantizing (nf4_cpu.matmul)
CPP_MATMUL = "loraplex_cpp_matmul"
# the most rows `plain` gives nf4_cpu.matmul, by (the lanes of the build's vectors, whether MKL runs
# its AVX-512 kernels: cpuinfo.mkl_avx512), from bench/base_matmul.py over SmolLM2-135M's 210
# projections on 2 cores (README figure 9), as the time of dequantize + matmul:
# - AMD EPYC Zen 3, AVX2 build (MKL's AVX2 kernels), three runs: 0.6-0.8x at 1 row, 0.3-0.5x at 8,
#   0.5-0.85x at 16, 0.74-1.04x at 32 and 1.2-1.3x at 64;
# - AMD EPYC Zen 4, AVX-512 build (MKL's AVX2 kernels: AMD), three runs: 0.49-0.53x at 1 row, 0.53x
#   at 16, 0.72-0.75x at 32, 0.89-0.90x at 64 and 1.03-1.05x at 128; an Intel Xeon with MKL held
#   to AVX2 (MKL_ENABLE_INSTRUCTIONS) the same way: 0.81x at 32, 0.97x at 64, 1.04x at 128;
# - Intel Xeon (Sapphire Rapids), AVX-512 build and MKL's AVX-512 kernels, four runs: 0.40-0.46x at
#   1 row, 0.68-0.75x at 16, 0.84-0.88x at 20-24, 0.96-1.07x at 32, 1.19-1.43x at 64;
# - the same Xeon, AVX2 build (LORAPLEX_CPP_ARCH=x86-64-v3): 0.68x at 4, 0.86x at 8, 1.23x at 12.
CPU_MATMUL_ROWS = {(8, False): 16, (16, False): 64, (16, True): 24, (8, True): 8}
# attribute of a full-precision Linear (the lm_head) whose fp32 product runs in dense_cpu.matmul
CPP_DENSE = "loraplex_cpp_dense"
# the most rows `plain` gives dense_cpu.matmul, keyed as CPU_MATMUL_ROWS: on SmolLM2-135M's lm_head
# (49152 x 576), the time of MKL's F.linear:
# - Zen 3 (AVX2), two runs: 0.24-0.61x from 1 to 16 rows, 0.65-0.70x at 32, 0.85x at 64 and
#   1.01-1.17x at 128;
# - Zen 4 (AVX-512), three runs: 0.18-0.51x to 16 rows, 0.58-0.63x at 32, 0.76-0.80x at 64 and
#   0.83-0.86x at 128; the Xeon with MKL held to AVX2: 0.66-0.87x from 8 to 128 rows;
# - the Xeon with MKL's AVX-512 kernels, four runs: 0.44-0.95x to 16 rows but 1.05-1.16x at 2,
#   0.96-0.97x at 20-24, 1.00-1.04x at 32, 1.01-1.09x at 48-96, 1.19-1.37x at 128;
# - the Xeon's AVX2 build: 0.61-0.74x to 12 rows, 1.30x at 16.
CPU_DENSE_ROWS = {(8, False): 64, (16, False): 128, (16, True): 24, (8, True): 12}
_limits: dict[str, int] = {}  # the two above for this build and BLAS, looked up once


def cpu_matmul_rows() -> int:
    """The most rows `plain` gives nf4_cpu.matmul on this machine (CPU_MATMUL_ROWS)."""
    if "matmul" not in _limits:
        _limits["matmul"] = CPU_MATMUL_ROWS.get(_key(nf4_cpu.lanes()), CPU_MATMUL_ROWS[(8, False)])
    return _limits["matmul"]


def cpu_dense_rows() -> int:
    """The most rows `plain` gives dense_cpu.matmul on this machine (CPU_DENSE_ROWS)."""
    if "dense" not in _limits:
        _limits["dense"] = CPU_DENSE_ROWS.get(_key(dense_cpu.lanes()), CPU_DENSE_ROWS[(8, False)])
    return _limits["dense"]


def _key(lanes: int) -> tuple[int, bool]:
    return lanes, cpuinfo.mkl_avx512()


@contextlib.contextmanager
def row_limits(matmul: int, dense: int) -> Iterator[None]:
    """`plain`'s two row limits set to these inside the block, for bench/base_matmul.py's check of
    whole steps against other limits; never the server's (they are read once per process)."""
    saved = {"matmul": cpu_matmul_rows(), "dense": cpu_dense_rows()}
    _limits.update(matmul=matmul, dense=dense)
    try:
        yield
    finally:
        _limits.update(saved)


def keep_block_scales(linear: nn.Linear, dequant: str = "bnb") -> None:
    """Decode a double-quantized NF4 weight's block scales (8-bit codes of fp32 scales) once, and
    keep them beside it as a plain quant state for dequantized_weight. bitsandbytes decodes them in
    every dequantization: on CPU that was a third of its time (14 of 40 ms a step for SmolLM2's
    210 projections). The values are the ones bitsandbytes computes each call (`dequantize_4bit`
    with `nested`); a test compares the weights bitwise. Costs 0.5 bit per weight, so it is kept
    only where the base runs through dequantized_weight (the plain and tiled modes).

    `dequant` "cpp": fp32 dequantizations of this weight run in our CPU kernel where it takes the
    weight (nf4_cpu.takes), with the same bits."""
    quant_state = getattr(linear.weight, "quant_state", None)
    if quant_state is None:
        return
    if quant_state.nested:
        setattr(linear, DECODED_STATE, decoded_state(quant_state))
    if dequant == "cpp":
        state = getattr(linear, DECODED_STATE, quant_state)
        setattr(linear, CPP_DEQUANT, nf4_cpu.takes(linear.weight.data, state))
        setattr(linear, CPP_MATMUL, nf4_cpu.multiplies(linear.weight.data, state))


def keep_dense(linear: nn.Linear, dequant: str) -> None:
    """Mark a full-precision fp32 Linear on CPU for dense_cpu.matmul where our CPU kernels run
    (`dequant` "cpp": a CPU computing in fp32, and they build here) and its vector path built."""
    if dequant == "cpp" and dense_cpu.load() and dense_cpu.vectorized() and dense_cpu.takes(linear.weight):
        setattr(linear, CPP_DENSE, True)
        # tied input embeddings share the Parameter, so they move with it
        linear.weight.data = dense_cpu.on_a_cache_line(linear.weight.data)


def decoded_state(quant_state: Any, absmax: torch.Tensor | None = None) -> Any:
    """A plain (not nested) copy of an NF4 quant state: its block scales decoded to fp32, or
    `absmax` where given (the decoded scales of several weights side by side, with the shape
    the caller sets)."""
    import bitsandbytes.functional as bnbf

    if absmax is None:
        absmax = quant_state.absmax
        if quant_state.nested:
            absmax = bnbf.dequantize_blockwise(absmax, quant_state.state2)
            absmax += quant_state.offset
        absmax = absmax.float()
    return bnbf.QuantState(
        absmax=absmax,
        shape=quant_state.shape,
        code=quant_state.code,
        blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type,
        dtype=quant_state.dtype,
    )


def nf4_state(linear: nn.Linear) -> Any:
    """The quant state to compute a Linear4bit's weight from: its decoded block scales where it was
    double-quantized (keep_block_scales), else its own; None for a full-precision weight."""
    return getattr(linear, DECODED_STATE, None) or getattr(linear.weight, "quant_state", None)


def dequantized_weight(linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The projection's weight [out, in] in `dtype`: dequantized for a bitsandbytes Linear4bit."""
    weight = linear.weight
    quant_state = nf4_state(linear)
    if quant_state is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    return dequantize(weight.data, quant_state, dtype, getattr(linear, CPP_DEQUANT, False))


def dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype, cpp: bool) -> torch.Tensor:
    """An NF4 weight in `dtype`: by our CPU kernel where `cpp` (nf4_cpu.takes, checked at load) and
    the dtype is fp32, else by bitsandbytes; the same bits either way."""
    if cpp and dtype is torch.float32:
        return nf4_cpu.dequantize(packed, state)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state).to(dtype)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: F.linear(x, weight, bias), computed TILE rows per matmul call, or one row per call
    for a shape whose BLAS kernel gives a row other bits at another place in the tile (see
    tile_keeps_rows). x: [n, in] -> [n, out]"""
    n = x.shape[0]
    if not tile_keeps_rows(weight, bias is not None):
        return (
            torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(n)])
            if n
            else F.linear(x, weight, bias)
        )
    full = n - n % TILE
    out = x.new_empty(n, weight.shape[0])
    for i in range(0, full, TILE):
        out[i : i + TILE] = F.linear(x[i : i + TILE], weight, bias)
    if full < n:
        tail = torch.cat([x[full:], x.new_zeros(TILE - (n - full), x.shape[1])])
        out[full:] = F.linear(tail, weight, bias)[: n - full]
    return out


# (out, in, dtype, device type, bias, threads) -> whether a TILE-row call keeps each row's bits
_TILE_KEEPS_ROWS: dict[tuple[object, ...], bool] = {}


def checked_tiles() -> dict[tuple[object, ...], bool]:
    """What tile_keeps_rows has found so far in this process, shape by shape."""
    return dict(_TILE_KEEPS_ROWS)


def tile_keeps_rows(weight: torch.Tensor, bias: bool = False) -> bool:
    """Whether a TILE-row matmul of this shape gives a row the same bits at every place in the tile.

    Each tile has one shape whatever the batch, but a row's place in it moves with the batch, and
    a BLAS may compute the places of a tile differently: MKL's AVX2 path on an Intel Xeon does for
    outputs of at most 64 columns (it then vectorizes across rows), where its AVX-512 path and AMD
    machines do not. So each shape is checked once per process, on random data at every place
    (a different order of summation shows in the bits of random data); where the check fails, the
    rows run one per call, which no other row can touch (such projections are narrow, so reading
    their weight once per row is cheap). During a CUDA graph capture nothing can be checked: an
    unchecked shape then runs one row per call too. load_base checks the model's shapes first."""
    key = (*weight.shape, weight.dtype, weight.device.type, bias, torch.get_num_threads())
    known = _TILE_KEEPS_ROWS.get(key)
    if known is not None:
        return known
    if weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    g = torch.Generator(device=weight.device).manual_seed(0)
    out_f, in_f = weight.shape
    w = torch.randn(out_f, in_f, generator=g, device=weight.device).to(weight.dtype)
    b = torch.randn(out_f, generator=g, device=weight.device).to(weight.dtype) if bias else None
    x = torch.randn(TILE, in_f, generator=g, device=weight.device).to(weight.dtype)
    whole = F.linear(x, w, b)
    keeps = all(
        torch.equal(F.linear(torch.roll(x, shift, 0), w, b), torch.roll(whole, shift, 0))
        for shift in range(1, TILE)
    )
    _TILE_KEEPS_ROWS[key] = keeps
    return keeps


def base_linear(x: torch.Tensor, linear: nn.Linear, mode: BaseGemm) -> torch.Tensor:
    """The base projection of the packed rows. x: [..., in] -> [..., out]"""
    if mode is BaseGemm.BNB:
        return linear(x)
    if mode is BaseGemm.NF4_TRITON:
        state = getattr(linear, DECODED_STATE, None)
        if state is not None:
            from server.model.nf4_matmul import nf4_linear

            return nf4_linear(x, linear.weight.data, state, linear.bias)
        mode = BaseGemm.TILED
    bias: torch.Tensor | None = linear.bias
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if getattr(linear, CPP_MATMUL, False):
        y = cpu_matmul(x, linear.weight.data, nf4_state(linear), bias, mode)
        if y is not None:
            return y
    if getattr(linear, CPP_DENSE, False):
        y = dense_matmul(x, linear.weight.data, bias, mode)
        if y is not None:
            return y
    weight = dequantized_weight(linear, x.dtype)
    if mode is BaseGemm.PLAIN:
        return F.linear(x, weight, bias)
    y = tiled_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def cpu_matmul(
    x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None, mode: BaseGemm
) -> torch.Tensor | None:
    """x @ W.T (+ bias) by nf4_cpu.matmul for a weight it multiplies (CPP_MATMUL, checked at load),
    where the mode takes it for this many rows; None where dequantize + matmul is the better way."""
    if x.dtype is not torch.float32 or x.requires_grad:  # the kernel has no backward
        return None
    rows = x.reshape(-1, x.shape[-1])
    if not mode.invariant and rows.shape[0] > cpu_matmul_rows():
        return None
    y = nf4_cpu.matmul(rows, packed, state)
    if bias is not None:
        y += bias  # to the row's whole sum, which no other row can change
    return y.view(*x.shape[:-1], y.shape[-1])


def dense_matmul(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: BaseGemm
) -> torch.Tensor | None:
    """x @ weight.T (+ bias) by dense_cpu.matmul for a weight marked at load (CPP_DENSE), where
    the mode takes it for this many rows; None where one BLAS matmul is the better way."""
    if x.dtype is not torch.float32 or x.requires_grad:  # the kernel has no backward
        return None
    rows = x.reshape(-1, x.shape[-1])
    if not mode.invariant and rows.shape[0] > cpu_dense_rows():
        return None
    y = dense_cpu.matmul(rows, weight)
    if bias is not None:
        y += bias  # to the row's whole sum, which no other row can change
    return y.view(*x.shape[:-1], y.shape[-1])


def tiled_rows(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Semantics: fn(x) for a row-wise fn, applied TILE rows at a time (the tail zero-padded), so the
    kernel a GPU picks for fn's reductions never changes with the batch. x: [..., T, H]"""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    pad = (-n) % TILE
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    out = torch.cat([fn(rows[i : i + TILE]) for i in range(0, rows.shape[0], TILE)])
    return out[:n].view(*x.shape[:-1], out.shape[-1])


class RowTiled(nn.Module):
    """A row-wise module (RMSNorm) run in TILE-row tiles: batch invariance for its reductions on CUDA."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tiled_rows(x, self.inner)

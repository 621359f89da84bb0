"""The one prepared GPU check (hot-path issue): five phases, JSON written after each, within 8 minutes.

    PYTHONUNBUFFERED=1 timeout 480 python3 -m bench.gpu_check --out $OUT
    .venv/bin/python -m bench.gpu_check --smoke        # the same code on tiny shapes, CPU, interpreter

0. probe: versions, the GPU, which backends import.
1. kernels: Triton SGMV (fp32 PEFT-faithful, bf16 fast) and the torch LoRA rows against the reference;
   bitwise row invariance over M in {1, 2, 7, 16, 64, 257, 2048} for them, for the base matmul
   (plain, 16-row tiles, bitsandbytes' gemm_4bit) and for Flex decode (SmolLM2's and Llama-3's
   head groups); kernel times.
2. engine: a seeded random model of SmolLM2-135M's shape in NF4 with four PEFT-made adapters:
   solo vs mixed in the default (triton + flex) and batch-invariant (eager, graphed, and graphed
   with fused norms) modes: bitwise, same tokens, vLLM's top-5 tolerance, and the largest logit difference
   while both runs had the same inputs; graphed vs eager bits; the default mode against PEFT.
3. throughput: decode tok/s at batch 16/64/256 with 16 distinct rank-16 adapters on all seven
   projections vs base only, graphed default and batch-invariant modes (run 1 measured the eager
   ones), with each step's host syncs, the graph's replay time alone and a host profile; then a
   Llama-3-8B-shaped model (4 layers) in NF4.
4. methods, on the time left: DoRA, AdaLoRA, (IA)3, modules_to_save, prompt, P- and prefix tuning
   on the 135M-shaped model, solo vs mixed per mode and against PEFT.
Everything is made on the device: no weights are copied.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS: dict[str, Any] = {}
FAST: dict[str, Any] = {"lora_backend": "triton", "attention": "flex"}  # what auto picks on CUDA
PEFT_CONFIGS: dict[str, dict[str, Any]] = {  # as tests/e2e: different ranks, targets, patterns, rsLoRA
    "qv-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "mlp-r8": {"r": 8, "lora_alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "patterns": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "rank_pattern": {"q_proj": 16}},
    "rslora-r16": {"r": 16, "lora_alpha": 16, "use_rslora": True, "target_modules": ["k_proj", "o_proj"]},
}


class Check:
    def __init__(self, out: Path, smoke: bool, deadline: float) -> None:
        self.out = out
        self.smoke = smoke
        self.deadline = deadline
        self.dev = torch.device("cpu" if smoke else "cuda")
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")

    def progress(self, what: str, result: Any) -> None:
        """One part done: say so with the time left, and save (a later timeout keeps it)."""
        print(f"-- {what} ({self.left():.0f} s left): {json.dumps(result, default=str)[:600]}", flush=True)
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def time_us(self, fn: Callable[[], object], reps: int = 20) -> float:
        if self.smoke:  # interpreted kernels on a CPU: the rehearsal checks the timing runs, not its figure
            reps = 1
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times) * 1e6)


def phase(name: str, check: Check, fn: Callable[[Check], dict[str, Any]]) -> None:
    start = time.monotonic()
    print(f"== {name} ({check.left():.0f} s left)", flush=True)
    try:
        RESULTS[name] = fn(check)
    except Exception:  # keeps what the phase saved before it failed
        RESULTS.setdefault(name, {})["error"] = traceback.format_exc()
        print(RESULTS[name]["error"], flush=True)
    RESULTS[name]["seconds"] = round(time.monotonic() - start, 1)
    check.save()
    print(json.dumps(RESULTS[name], indent=1, default=str)[:4000], flush=True)


# ------------------------------------------------------------------------------------------ 0: probe
def probe(c: Check) -> dict[str, Any]:
    import importlib.util

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if c.dev.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    for mod in ("triton", "bitsandbytes", "transformers", "peft", "flashinfer"):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            info[mod] = None
            continue
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:
            info[mod] = f"import fails: {e}"
    try:
        import bitsandbytes.functional as bnbf

        w = torch.randn(64, 64, device=c.dev)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        info["bnb_nf4_roundtrip_err"] = float((bnbf.dequantize_4bit(q, state) - w).abs().max())
    except Exception as e:
        info["bnb_nf4_roundtrip_err"] = f"fails: {e}"
    try:
        from torch.nn.attention import varlen

        info["varlen_attn"] = str(getattr(varlen, "varlen_attn", None))
    except Exception as e:
        info["varlen_attn"] = f"absent: {e}"
    return info


# ---------------------------------------------------------------------------------------- 1: kernels
def _invariant(run: Callable[[slice], torch.Tensor], ms: list[int]) -> dict[str, bool]:
    """For each M: are the first rows of a batch of M the same bits as those rows run alone?
    `run(rows)` computes the given rows of the test input."""
    solo = torch.cat([run(slice(i, i + 1)) for i in range(8)])
    return {str(m): bool(torch.equal(run(slice(0, m))[: min(m, 8)], solo[: min(m, 8)])) for m in ms}


def kernels(c: Check) -> dict[str, Any]:
    ms = [1, 2, 7, 16, 33] if c.smoke else [1, 2, 7, 16, 64, 257, 2048]
    shapes = [(64, 128)] if c.smoke else [(576, 1536), (1536, 576), (4096, 14336)]
    out: dict[str, Any] = RESULTS.setdefault("kernels", {})
    out["ms"] = ms
    # each part on its own: a failure keeps the others' figures (a phase that raises keeps nothing)
    for din, dout in shapes:
        out[f"{din}x{dout}"] = _guarded(_kernels_at, c, din, dout, ms)
        c.progress(f"kernels {din}x{dout}", out[f"{din}x{dout}"])
    # SmolLM2's 9 query heads over 3 KV heads, and Llama-3-8B's 32 over 8: a power-of-two group,
    # where Inductor would pick its split-key decoding kernel were it not kept off it (attn_flex)
    for heads, kv_heads in ((9, 3), (32, 8)):
        out[f"flex_decode_{heads}_{kv_heads}"] = _guarded(_flex, c, heads, kv_heads)
    # q/k/v as slices (server/lora/fused.py): SmolLM2's and Llama-3-8B's widths
    for din, widths in (
        [(64, [64, 32, 32])] if c.smoke else [(576, [576, 192, 192]), (4096, [4096, 1024, 1024])]
    ):
        out[f"sliced_{din}"] = _guarded(_sliced, c, din, widths)
        c.progress(f"kernels sliced_{din}", out[f"sliced_{din}"])
    # the opt-in NF4 Triton matmul (server/model/nf4_matmul.py) against bitsandbytes and the tiles
    for din, dout in [(64, 128)] if c.smoke else [(576, 1536), (4096, 14336)]:
        out[f"nf4_triton_{din}x{dout}"] = _guarded(_nf4_triton, c, din, dout, ms)
        c.progress(f"kernels nf4_triton_{din}x{dout}", out[f"nf4_triton_{din}x{dout}"])
    return out


def _nf4_triton(c: Check, din: int, dout: int, ms: list[int]) -> dict[str, Any]:
    """Error against dequantize + matmul, row invariance over `ms`, and the time at M = 1, 64 and
    256 of the kernel, bitsandbytes' own matmul (the default base) and the 16-row tiles."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from server.model.base_gemm import decoded_state
    from server.model.nf4_matmul import nf4_linear

    half = torch.float32 if c.smoke else torch.bfloat16
    g = torch.Generator(device=c.dev).manual_seed(3)
    w = torch.randn(dout, din, device=c.dev, generator=g) / din**0.5
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    plain = decoded_state(state)
    deq = bnbf.dequantize_4bit(packed, state).to(half)
    x = torch.randn(max(ms), din, device=c.dev, generator=g).to(half)
    entry: dict[str, Any] = {}
    ref = torch.nn.functional.linear(x[:64].float(), deq.float())
    got = nf4_linear(x[:64], packed, plain, None).float()
    entry["rel_err"] = float((got - ref).abs().max() / ref.abs().max())
    entry["invariant"] = _invariant(lambda rows: nf4_linear(x[rows], packed, plain, None), ms)
    for m in (1, 64, 256):
        xm = x.repeat(-(-m // x.shape[0]), 1)[:m]
        runs: dict[str, Callable[[], object]] = {
            "nf4_triton": partial(nf4_linear, xm, packed, plain, None),
            "bnb": partial(bnb.matmul_4bit, xm, packed, quant_state=state),
            "tiled": partial(_dequantized_tiles, xm, packed, plain, half),
        }
        for name, run in runs.items():
            entry[f"us_m{m}_{name}"] = c.time_us(run)
    return entry


def _dequantized_tiles(x: torch.Tensor, packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The batch-invariant base as it runs without the kernel: dequantize, then 16-row tiles."""
    import bitsandbytes.functional as bnbf

    from server.model.base_gemm import tiled_linear

    return tiled_linear(x, bnbf.dequantize_4bit(packed, state).to(dtype))


def _sliced(c: Check, din: int, widths: list[int]) -> dict[str, Any]:
    """The sliced shrink + expand over q/k/v-shaped factors against each slice's own pair of
    launches at M = 64: the same bits by construction (each mode), and the time of both."""
    from server.lora.backends.triton_sgmv import lora_sgmv, slice_tiles
    from server.lora.segments import build_segments

    s, r, n, m, dev = 17, 16, len(widths), 64, c.dev
    g = torch.Generator(device=dev).manual_seed(2)
    A = torch.randn(s, din, n * r, device=dev, generator=g).transpose(1, 2) / din**0.5
    B = torch.randn(s, r, sum(widths), device=dev, generator=g) * 0.1
    scale = torch.full((n, s), 2.0, device=dev)
    ranks = torch.full((n, s), r, dtype=torch.int32, device=dev)
    x = torch.randn(m, din, device=dev, generator=g)
    seg = build_segments(np.random.default_rng(0).integers(1, s, m), dev)
    tiles = slice_tiles(widths, dev)
    bounds = np.cumsum([0, *widths]).tolist()
    entry: dict[str, Any] = {}
    for mode, dt in (("fp32", torch.float32), ("fast", torch.float32 if c.smoke else torch.bfloat16)):
        a, b = A.to(dt), B.to(dt)

        def fused(a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
            y = torch.zeros(m, sum(widths), device=dev)
            lora_sgmv(x, y, a, b, scale, ranks, seg, tiles, n)
            return y

        def unfused(a: torch.Tensor = a, b: torch.Tensor = b) -> list[torch.Tensor]:
            outs = []
            for i in range(n):
                y = torch.zeros(m, widths[i], device=dev)
                ai, bi = a[:, i * r : (i + 1) * r], b[:, :, bounds[i] : bounds[i + 1]]
                lora_sgmv(x, y, ai, bi, scale[i], ranks[i], seg)
                outs.append(y)
            return outs

        whole = fused()
        entry[f"{mode}_eq_unfused_bitwise"] = all(
            torch.equal(whole[:, bounds[i] : bounds[i + 1]], y) for i, y in enumerate(unfused())
        )
        entry[f"us_{mode}_fused"] = c.time_us(fused)
        entry[f"us_{mode}_unfused"] = c.time_us(unfused)
    return entry


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:
        print(traceback.format_exc(), flush=True)
        return {"error": traceback.format_exc()}


def _kernels_at(c: Check, din: int, dout: int, ms: list[int]) -> dict[str, Any]:
    import torch.nn.functional as F

    from server.lora.ops import lora_reference, lora_rows
    from server.lora.segments import build_segments
    from server.model.base_gemm import tiled_linear

    triton_ok = True
    try:
        from server.lora.backends.triton_sgmv import lora_sgmv
    except Exception:
        triton_ok = False
    s, r, dev = 17, 16, c.dev
    g = torch.Generator(device=dev).manual_seed(0)
    # [S, R, in] over rank-innermost storage, as the LoRA layers keep it (server/lora/ops.py)
    A = (torch.randn(s, din, r, device=dev, generator=g) / din**0.5).transpose(1, 2)
    B = torch.randn(s, r, dout, device=dev, generator=g) * 0.1
    A[0], B[0] = 0.0, 0.0
    scale = torch.full((s,), 2.0, device=dev)
    scale[0] = 0.0
    ranks = torch.full((s,), r, dtype=torch.int32, device=dev)
    ranks[0] = 0
    m_max = max(ms)
    x = torch.randn(m_max, din, device=dev, generator=g)
    slots = torch.randint(1, s, (m_max,), device=dev, generator=g)
    slots_np = slots.cpu().numpy()
    half = torch.float32 if c.smoke else torch.bfloat16  # the interpreter has no bf16
    entry: dict[str, Any] = {}

    def torch_rows(rows: slice) -> torch.Tensor:
        return lora_rows(x[rows], A, B, scale, slots[rows])

    check = slice(0, min(m_max, 64))
    ref = lora_reference(x[check], A, B, scale, slots[check])
    entry["torch_rows_rel_err"] = float((torch_rows(check) - ref).abs().max() / ref.abs().max())
    entry["torch_rows_invariant"] = _invariant(torch_rows, ms)
    if triton_ok:
        for mode, dt in (("fp32", torch.float32), ("fast", half)):
            a, b = A.to(dt), B.to(dt)

            def sgmv(rows: slice, a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
                xs = x[rows]
                y = torch.zeros(xs.shape[0], dout, device=dev, dtype=torch.float32)
                lora_sgmv(xs, y, a, b, scale, ranks, build_segments(slots_np[rows], dev))
                return y

            entry[f"triton_{mode}_rel_err"] = float((sgmv(check) - ref).abs().max() / ref.abs().max())
            entry[f"triton_{mode}_invariant"] = _invariant(sgmv, ms)
        entry["us_m64_torch_rows"] = c.time_us(lambda: torch_rows(check))
        # run 1 timed the routing (build_segments: numpy and a host copy) with the kernel; the
        # engine builds it once per step for all projections, so the kernel is timed alone too
        entry["us_m64_triton_fp32_with_segments"] = c.time_us(lambda: sgmv(check, A, B))
        segments = build_segments(slots_np[check], dev)
        y64 = torch.zeros(x[check].shape[0], dout, device=dev, dtype=torch.float32)
        for mode, dt in (("fp32", torch.float32), ("fast", half)):
            a, b = A.to(dt), B.to(dt)
            entry[f"us_m64_triton_{mode}_kernel"] = c.time_us(
                partial(lora_sgmv, x[check], y64, a, b, scale, ranks, segments)
            )
    w = torch.randn(dout, din, device=dev, generator=g).to(half) / din**0.5
    xh = x.to(half)
    entry["plain_matmul_invariant"] = _invariant(lambda rows: F.linear(xh[rows], w), ms)
    entry["tiled_matmul_invariant"] = _invariant(lambda rows: tiled_linear(xh[rows], w), ms)
    try:
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(din, dout, bias=False, compute_dtype=half, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4")
        lin = lin.to(dev)
        with torch.no_grad():
            entry["bnb_gemm_4bit_invariant"] = _invariant(lambda rows: lin(xh[rows]), ms)
    except Exception as e:
        entry["bnb_gemm_4bit_invariant"] = f"fails: {e}"
    return entry


def _flex(c: Check, heads: int, kv_heads: int) -> dict[str, Any]:
    import torch.nn.functional as F

    from server.engine.attn_flex import FlexAttention

    hd, bs, nb = 64, 16, 256
    g = torch.Generator(device=c.dev).manual_seed(1)
    k = torch.randn(nb * bs, kv_heads, hd, device=c.dev, generator=g)
    v = torch.randn(nb * bs, kv_heads, hd, device=c.dev, generator=g)
    perm = torch.randperm(nb).tolist()
    lens = [37, 200, 5, 130, 64, 99, 17, 250]
    tables, i = [], 0
    for n in lens:
        tables.append(perm[i : i + -(-n // bs)])
        i += -(-n // bs)
    flex = FlexAttention(nb, bs, 16, c.dev, compiled=c.dev.type == "cuda")
    q = torch.randn(heads, len(lens), hd, device=c.dev, generator=g)
    decode = [(t, n - 1) for t, n in zip(tables, lens, strict=True)]
    out = flex.run(q, k, v, flex.prepare(decode, []), None)
    worst = 0.0
    for row, (t, n) in enumerate(zip(tables, lens, strict=True)):
        slots = torch.tensor([b * bs + o for b in t for o in range(bs)][:n], device=c.dev)
        kd, vd = k[slots].transpose(0, 1).unsqueeze(0), v[slots].transpose(0, 1).unsqueeze(0)
        ref = F.scaled_dot_product_attention(q[:, row : row + 1].unsqueeze(0), kd, vd, enable_gqa=True)[
            0, :, 0
        ]
        worst = max(worst, float((out[row] - ref).abs().max()))
    alone = flex.run(q[:, 3:4], k, v, flex.prepare([decode[3]], []), None)
    pair = flex.run(q[:, 2:4], k, v, flex.prepare(decode[2:4], []), None)
    return {
        "max_abs_err_vs_sdpa": worst,
        "row_alone_equals_batched": bool(torch.equal(alone[0], out[3]) and torch.equal(pair[1], out[3])),
    }


# ----------------------------------------------------------------------------------------- 2: engine
def _engine(base: Any, registry: Any, **cfg: Any) -> Any:
    from server.engine.config import EngineConfig
    from server.engine.engine import LLMEngine

    config = EngineConfig(
        **{
            "max_loras": 4,
            "max_cpu_loras": 32,
            "max_lora_rank": 16,
            "max_model_len": 512,
            "kv_cache_tokens": 8192,
        }
        | cfg
    )
    return LLMEngine(base, registry, config)


def _run(
    engine: Any, jobs: list[tuple[str, Any, list[int]]], tokens: int
) -> tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]]:
    from server.engine.sequence import SamplingParams, Sequence

    logits: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def recording(step: Any, slot_of: dict[str, int]) -> Any:
        sampling, rows = run(step, slot_of)
        for seq, row in zip(sampling, rows, strict=True):
            logits.setdefault(seq.request_id, []).append(row.float().cpu())
        return sampling, rows

    engine.runner.run = recording
    out: dict[str, list[int]] = {rid: [] for rid, _, _ in jobs}
    for rid, adapter, ids in jobs:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(Sequence(rid, list(ids), params, adapter=adapter))
    while engine.has_work():
        outputs = engine.step()
        if not outputs and not engine.scheduler.running:
            engine.cache.wait_for_loads(timeout=60)
        for o in outputs:
            out[o.request_id] += o.token_ids
    return out, logits


def _model(c: Check, name: str, shape: str, layers: int | None = None) -> Path:
    from bench.gpu_models import make_checkpoint

    path = c.tmp / name
    if not (path / "config.json").is_file():
        make_checkpoint(path, shape, layers=layers)
    return path


def _load(c: Check, ckpt: Path, model_id: str, opts: dict[str, Any], **kw: Any) -> tuple[Any, str, bool]:
    """A mode's NF4 base: its load_base options (and `kw`) loaded, the RMSNorms compiled if it asks
    (`fused_norms`); returns (base, its attention backend, whether it runs graphs)."""
    from server.model.loader import load_base

    opts = dict(opts)
    attention = opts.pop("attention", "torch")
    graphs = opts.pop("graphs", False)
    fused = opts.pop("fused_norms", False)
    base = load_base(ckpt, model_id, quantization="nf4", device=c.dev.type, max_lora_rank=16, **opts, **kw)
    if fused:
        from server.model.fused_norms import fuse_rms_norms

        fuse_rms_norms(base.model)
    return base, attention, graphs


def engine_phase(c: Check) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from server.model.base_gemm import BaseGemm
    from tests.peft_factory import make_adapter

    ckpt = _model(c, "smollm2", "tiny" if c.smoke else "smollm2-135m")
    dirs = {}
    for i, (name, cfg) in enumerate(PEFT_CONFIGS.items()):
        dirs[name] = make_adapter(
            lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
            c.tmp / name,
            seed=i,
            b_scale=2.0,
            **cfg,
        )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 500, n).tolist() for n in (24, 41, 17)]
    tokens = 16
    modes: dict[str, dict[str, Any]] = {
        "default": dict(FAST),
        "batch_invariant": {**FAST, "base_gemm": BaseGemm.TILED},
        "batch_invariant_graphs": {**FAST, "base_gemm": BaseGemm.TILED, "graphs": True},
        # opt-in: RMSNorm compiled into one kernel (server/model/fused_norms.py)
        "batch_invariant_graphs_fused_norms": {
            **FAST, "base_gemm": BaseGemm.TILED, "graphs": True, "fused_norms": True,
        },
        # opt-in: the base in one NF4 Triton kernel per projection (server/model/nf4_matmul.py)
        "batch_invariant_graphs_nf4": {**FAST, "base_gemm": BaseGemm.NF4_TRITON, "graphs": True},
    }  # fmt: skip
    if c.smoke:  # no graphs on a CPU: the padded path runs eagerly
        for opts in modes.values():
            opts.pop("graphs", None)
    out: dict[str, Any] = RESULTS.setdefault("engine", {})
    solos: dict[str, dict[str, list[torch.Tensor]]] = {}
    for mode, opts in modes.items():
        if c.left() < (60 if c.smoke else 180):  # the rest is the throughput phase's
            out[mode] = "skipped: out of time"
            continue
        out[mode] = _guarded(
            _engine_mode, c, ckpt, dirs, prompts, tokens, dict(opts), mode == "default", out, solos, mode
        )
        c.progress(f"engine {mode}", out[mode])
        both = {"batch_invariant", "batch_invariant_graphs"} <= solos.keys()
        if both and "graphs_eq_eager_bitwise" not in out:
            # padded to a bucket and replayed, a row must keep its eager bits (row-invariant kernels)
            eager, graphs = solos["batch_invariant"], solos["batch_invariant_graphs"]
            out["graphs_eq_eager_bitwise"] = sum(
                len(eager[r]) == len(graphs[r]) and all(map(torch.equal, eager[r], graphs[r])) for r in eager
            )
        gc.collect()
        if c.dev.type == "cuda":
            torch.cuda.empty_cache()
    from server.model.base_gemm import checked_tiles

    # the invariant modes' check of each matmul shape (base_gemm.tile_keeps_rows): False runs by row
    out["tile_keeps_rows"] = {"x".join(map(str, k[:2])) + f" {k[2]}": v for k, v in checked_tiles().items()}
    return out


def _engine_mode(
    c: Check,
    ckpt: Path,
    dirs: dict[str, Path],
    prompts: list[list[int]],
    tokens: int,
    opts: dict[str, Any],
    compare_peft: bool,
    out: dict[str, Any],
    solos: dict[str, dict[str, list[torch.Tensor]]],
    mode: str,
) -> dict[str, Any]:
    """One mode's solo vs mixed run; with `compare_peft` its solo run is then compared with PEFT
    (into out["vs_peft"], before a later mode can fail). Its solo logits go into solos[mode]."""
    from server.lora.registry import AdapterRegistry

    base, attention, graphs = _load(c, ckpt, "rand-135m", opts, max_loras=4)
    registry = AdapterRegistry(base.linear_shapes, 16)
    for name, d in dirs.items():
        registry.add_dir(name, d)
    jobs = [
        (f"{name or 'base'}/{p}", registry.resolve(name) if name else None, ids)
        for name in (None, *dirs)
        for p, ids in enumerate(prompts)
    ]
    solo_tokens: dict[str, list[int]] = {}
    solo_logits: dict[str, list[torch.Tensor]] = {}
    engine = {"attention_backend": attention, "cuda_graphs": graphs}
    for job in jobs:
        t, lg = _run(_engine(base, registry, **engine), [job], tokens)
        solo_tokens |= t
        solo_logits |= lg
    mixed_tokens, mixed_logits = _run(_engine(base, registry, max_num_seqs=32, **engine), jobs, tokens)
    solos[mode] = solo_logits
    same_bits = sum(
        all(torch.equal(a, b) for a, b in zip(solo_logits[r], mixed_logits[r], strict=True))
        for r in solo_logits
    )
    if compare_peft and c.left() > 45:
        out["vs_peft"] = _guarded(_vs_peft, c, ckpt, dirs, prompts, tokens, solo_tokens, solo_logits)
        c.progress("engine vs_peft", out["vs_peft"])
    return {
        "requests": len(jobs),
        "solo_eq_mixed_logits_bitwise": same_bits,
        **_closeness(solo_tokens, solo_logits, mixed_tokens, mixed_logits),
    }


def _closeness(
    ours: dict[str, list[int]],
    our_logits: dict[str, list[torch.Tensor]],
    theirs: dict[str, list[int]],
    their_logits: dict[str, list[torch.Tensor]],
) -> dict[str, Any]:
    """Two greedy runs of the same requests: identical token lists; else vLLM's check_logprobs_close
    (at the first differing token each run's pick is in the other's top-5); and, to tell rounding
    from a bug, the largest logit difference while both runs had the same inputs (up to and with
    the first differing step) and how narrow the winning margin was where they parted: a random
    model's logits are flat, so a rounding-sized difference can flip its argmax."""
    identical = close = far = 0
    prefix_diff = 0.0
    margins: list[float] = []
    for r, mine in ours.items():
        other = theirs[r]
        diff = next((i for i, (a, b) in enumerate(zip(mine, other, strict=False)) if a != b), None)
        upto = len(mine) if diff is None else diff + 1
        for a, b in zip(our_logits[r][:upto], their_logits[r][:upto], strict=False):
            prefix_diff = max(prefix_diff, float((a.float() - b.float()).abs().max()))
        if diff is None:
            identical += 1
            continue
        mine_row, other_row = our_logits[r][diff].float(), their_logits[r][diff].float()
        margins.append(float(mine_row[mine[diff]] - mine_row[other[diff]]))
        if (
            mine[diff] in torch.topk(other_row, 5).indices.tolist()
            and other[diff] in torch.topk(mine_row, 5).indices.tolist()
        ):
            close += 1
        else:
            far += 1
    return {
        "identical_tokens": identical,
        "close_top5": close,
        "not_close": far,
        "max_abs_logit_diff_same_inputs": prefix_diff,
        "margin_where_they_part": [round(m, 4) for m in margins],
    }


def _vs_peft(
    c: Check,
    ckpt: Path,
    dirs: dict[str, Path],
    prompts: list[list[int]],
    tokens: int,
    ours: dict[str, list[int]],
    our_logits: dict[str, list[torch.Tensor]],
) -> dict[str, Any]:
    """vLLM's check_logprobs_close with top-5: at the first differing token, each run's pick must be
    in the other's top-5; identical runs pass trivially."""
    from peft import PeftModel

    from server.model.loader import load_stock

    stock = load_stock(ckpt, "nf4")
    stock.generation_config.eos_token_id = None
    model = PeftModel.from_pretrained(stock, dirs[next(iter(dirs))], adapter_name=next(iter(dirs)))
    for extra in list(dirs)[1:]:
        model.load_adapter(dirs[extra], adapter_name=extra)
    model.eval()
    their_tokens: dict[str, list[int]] = {}
    their_logits: dict[str, list[torch.Tensor]] = {}
    names: list[str | None] = [None, *dirs]
    for name in names:
        for p, ids in enumerate(prompts):
            rid = f"{name or 'base'}/{p}"
            x = torch.tensor([ids], device=c.dev)
            kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
            with torch.no_grad():
                if name is None:
                    with model.disable_adapter():
                        gen = model.generate(x, **kw)
                else:
                    model.set_adapter(name)
                    gen = model.generate(x, **kw)
            their_tokens[rid] = gen.sequences[0, len(ids) :].tolist()
            their_logits[rid] = [row[0].float().cpu() for row in gen.scores]
    return _closeness(ours, our_logits, their_tokens, their_logits)


# -------------------------------------------------------------------------------------- 3: throughput
def _decode_rate(
    c: Check,
    base: Any,
    registry: Any,
    records: list[Any],
    batch: int,
    adapters: int,
    attention: str,
    graphs: bool,
    count_syncs: bool = False,
    profile: bool = False,
) -> tuple[float, dict[str, Any]]:
    """Decode tokens/s once every prompt is in; if asked, the host syncs of a step, the replay time
    of its captured graph alone (the device's share of the step) and a host profile of a few steps."""
    from server.engine.sequence import SamplingParams, Sequence

    engine = _engine(
        base, registry, max_loras=16, max_num_seqs=batch, max_num_batched_tokens=max(2048, 40 * batch),
        max_model_len=256, kv_cache_tokens=batch * 128 + 256, attention_backend=attention, cuda_graphs=graphs,
    )  # fmt: skip
    for rec, w in records:
        engine.cache.put(rec.version, w)
    rng = np.random.default_rng(batch)
    params = SamplingParams(max_tokens=10_000 if not c.smoke else 40, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        adapter = records[i % adapters][0] if adapters else None
        engine.add_request(Sequence(f"r{i}", rng.integers(3, 400, 32).tolist(), params, adapter=adapter))
    while any(s.num_uncomputed > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    steps = 4 if c.smoke else 24
    engine.step()
    c.sync()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    c.sync()
    rate = batch * steps / (time.perf_counter() - t)
    extra: dict[str, Any] = {}
    if count_syncs:
        extra["lora16_host_syncs"] = _host_syncs(c, engine)
        extra["graph_replay_ms"] = _replay_ms(c, engine)
    if profile:
        extra["host_profile"] = _profile(engine)
    return rate, extra


def _replay_ms(c: Check, engine: Any) -> float | None:
    """One replay of the largest captured bucket's graph, alone: what the device needs per step."""
    graphs = engine.runner.graphs
    captured = [st for st in graphs.static.values() if st.graph is not None] if graphs else []
    if c.dev.type != "cuda" or not captured:
        return None
    graph = max(captured, key=lambda st: st.input_ids.shape[1]).graph
    return round(c.time_us(graph.replay) / 1000, 3)


def _profile(engine: Any, steps: int = 6) -> list[str]:
    """cProfile of a few decode steps: the functions with the most own time (the host's share)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return [line.rstrip() for line in text.getvalue().splitlines() if line.strip()][-30:]


def _host_syncs(c: Check, engine: Any, steps: int = 2) -> dict[str, Any]:
    """Host syncs per step, where CUDA's sync debug mode reports them (issue 9 allows one: the
    sampled tokens), with the Python lines that made them. It sees blocking copies, .item() and
    .tolist(); a non_blocking copy from pageable memory is not reported (tests/unit/test_transfer.py
    keeps those out of the step)."""
    if c.dev.type != "cuda":
        return {}
    import warnings
    from collections import Counter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"per_step": sum(where.values()) / steps, "where": dict(where.most_common(8))}


def throughput(c: Check) -> dict[str, Any]:
    from bench.adapters import write_adapter
    from server.lora.registry import AdapterRegistry
    from server.model.base_gemm import BaseGemm

    Plan = tuple[str, int | None, list[int]]  # shape, layers (None: all), decode batches
    small: Plan = ("smollm2-135m", None, [16, 64, 256])
    large: Plan = ("llama3-8b", 4, [16, 64])
    if c.smoke:
        small = large = ("tiny", None, [2, 4])
    # run 1 (bench/results/gpu_check/h200-run1.json) measured the eager sets: host-bound, 0.2-2.6k
    # tok/s; these are the graphed modes, default and batch invariant, then the fast factors
    sets: dict[str, dict[str, Any]] = {
        "default_graphs": {**FAST, "graphs": True},
        "batch_invariant_graphs": {**FAST, "graphs": True, "base_gemm": BaseGemm.TILED},
        # the triton backend runs q/k/v and gate/up as slices (server/lora/fused.py); this is without
        "default_graphs_unfused": {**FAST, "graphs": True, "fuse_projections": False},
        "batch_invariant_graphs_nf4": {**FAST, "graphs": True, "base_gemm": BaseGemm.NF4_TRITON},
        "default_graphs_fused_norms": {**FAST, "graphs": True, "fused_norms": True},
        "default_graphs_bf16_factors": {**FAST, "graphs": True, "lora_dtype": torch.bfloat16},
    }
    if c.smoke:
        sets["default_graphs_bf16_factors"]["lora_dtype"] = torch.float16
    # the targets' modes on both shapes first, then the experiments
    order = [
        (small, "default_graphs"),
        (small, "batch_invariant_graphs"),
        (large, "default_graphs"),
        (small, "default_graphs_unfused"),
        (small, "batch_invariant_graphs_nf4"),
        (small, "default_graphs_fused_norms"),
        (large, "batch_invariant_graphs"),
        (small, "default_graphs_bf16_factors"),
        (large, "default_graphs_fused_norms"),
    ]
    out: dict[str, Any] = RESULTS.setdefault("throughput", {})  # saved after each set: a kill keeps them
    for (shape, layers, batches), name in order:
        if f"{shape}/{name}" in out:
            continue  # the smoke run's two shapes are one
        if c.left() < 40:
            out[f"{shape}/{name}"] = "skipped: out of time"
            continue
        try:
            ckpt = _model(c, f"{shape}-{layers}", shape, layers)
            base, attention, graphs = _load(c, ckpt, shape, sets[name], max_loras=16)
            registry = AdapterRegistry(base.linear_shapes, 16, factor_dtype=base.lora_dtype)
            records = [
                registry.add_dir(
                    f"a{i}", write_adapter(c.tmp / f"{shape}-a{i}", base.linear_shapes, 16, seed=i)
                )
                for i in range(16)
            ]
            row: dict[str, Any] = {}
            for batch in batches:
                if c.left() < 20:
                    break
                base_rate, _ = _decode_rate(c, base, registry, records, batch, 0, attention, graphs)
                lora_rate, extra = _decode_rate(
                    c, base, registry, records, batch, 16, attention, graphs, count_syncs=True,
                    profile=batch == (4 if c.smoke else 64) and name == "default_graphs",
                )  # fmt: skip
                row[str(batch)] = {
                    "base_tok_s": round(base_rate, 1),
                    "lora16_tok_s": round(lora_rate, 1),
                    "lora_step_over_base_step": round(base_rate / lora_rate, 3),
                    "lora16_step_ms": round(1000 * batch / lora_rate, 3),
                    **extra,
                }
                out[f"{shape}/{name}"] = row
                c.progress(f"throughput {shape}/{name} batch {batch}", row[str(batch)])
            out[f"{shape}/{name}"] = row
        except Exception:
            out[f"{shape}/{name}"] = {"error": traceback.format_exc()[-2000:]}
            c.progress(f"throughput {shape}/{name}", out[f"{shape}/{name}"])
        finally:
            base = registry = records = None  # type: ignore[assignment]
            gc.collect()
            if c.dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------- 4: methods beyond LoRA
def methods_phase(c: Check) -> dict[str, Any]:
    """DoRA, AdaLoRA, (IA)3, modules_to_save, prompt, P- and prefix tuning (PEFT-made, every trained
    tensor random) on the 135M-shaped model: solo vs one mixed batch of all of them and the base,
    per mode, and the first mode's tokens against PEFT's (tests/peft_oracle.py's references for the
    prompt-learning methods, whose PEFT `generate` is broken). Last: it runs on what time is left."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.lora.registry import AdapterRegistry
    from server.model.base_gemm import BaseGemm
    from server.model.loader import load_stock
    from tests.peft_factory import every_method_configs, make_method_adapter
    from tests.peft_oracle import reference_greedy

    if c.left() < 90:
        return {"skipped": "out of time"}
    ckpt = _model(c, "smollm2", "tiny" if c.smoke else "smollm2-135m")

    def factory() -> Any:
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)

    dirs = {
        name: make_method_adapter(factory, c.tmp / f"method-{name}", 10 + i, cfg)
        for i, (name, cfg) in enumerate(every_method_configs().items())
    }
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 500, n).tolist() for n in (24, 41)]
    tokens = 16
    modes: dict[str, dict[str, Any]] = {
        "default": {},
        "batch_invariant": {"base_gemm": BaseGemm.TILED},
        "triton_flex": {"lora_backend": "triton", "attention": "flex"},
    }
    if c.smoke:  # the CPU rehearsal: the mode that promises bits there
        modes = {"batch_invariant": modes["batch_invariant"]}
    slots = len(dirs) + 1
    out: dict[str, Any] = {}
    first: tuple[dict[str, list[int]], dict[str, list[torch.Tensor]]] | None = None
    method_of: dict[str, str] = {}
    for mode, opts in modes.items():
        if c.left() < 45:
            out[mode] = "skipped: out of time"
            continue
        try:
            base, attention, _ = _load(c, ckpt, "rand-135m", opts, max_loras=slots)
            registry = AdapterRegistry(
                base.linear_shapes, 16, saveable=base.saveable, max_saved_bytes=1 << 30, dims=base.dims
            )
            for name, d in dirs.items():
                method_of[name] = registry.add_dir(name, d)[0].method
            jobs = [
                (f"{name or 'base'}/{p}", registry.resolve(name) if name else None, ids)
                for name in (None, *dirs)
                for p, ids in enumerate(prompts)
            ]
            engine = dict(attention_backend=attention, max_loras=slots)
            solo_tokens: dict[str, list[int]] = {}
            solo_logits: dict[str, list[torch.Tensor]] = {}
            for job in jobs:
                t, lg = _run(_engine(base, registry, **engine), [job], tokens)
                solo_tokens |= t
                solo_logits |= lg
            mixed_tokens, mixed_logits = _run(
                _engine(base, registry, max_num_seqs=32, **engine), jobs, tokens
            )
            out[mode] = {
                "requests": len(jobs),
                "solo_eq_mixed_tokens": sum(solo_tokens[r] == mixed_tokens[r] for r in solo_tokens),
                "solo_eq_mixed_logits_bitwise": sum(
                    all(torch.equal(a, b) for a, b in zip(solo_logits[r], mixed_logits[r], strict=True))
                    for r in solo_logits
                ),
                "differs_from_base": sum(
                    solo_tokens[f"{name}/{p}"] != solo_tokens[f"base/{p}"]
                    for name in dirs
                    for p in range(len(prompts))
                ),
            }
            first = first or (solo_tokens, solo_logits)
        except Exception:
            out[mode] = {"error": traceback.format_exc()[-2000:]}
        finally:
            base = registry = None  # type: ignore[assignment]
            gc.collect()
            if c.dev.type == "cuda":
                torch.cuda.empty_cache()
    if first is None or c.left() < 30:
        return out
    ours, our_logits = first
    refs: dict[str, Any] = {}
    for name, d in dirs.items():
        stock = load_stock(ckpt, "nf4")
        stock.generation_config.eos_token_id = None  # the engine ran with ignore_eos
        model = PeftModel.from_pretrained(stock, d).eval()
        for p, ids in enumerate(prompts):
            rid = f"{name}/{p}"
            want = reference_greedy(model, method_of[name], ids, tokens)
            diff = next((i for i, (a, b) in enumerate(zip(ours[rid], want, strict=True)) if a != b), None)
            if diff is None:
                refs[rid] = "identical"
            else:
                top = torch.topk(our_logits[rid][diff], 5).indices.tolist()
                refs[rid] = {"first_diff": diff, "reference_pick_in_our_top5": want[diff] in top}
        del model, stock
        gc.collect()
    out[f"vs_peft ({next(iter(modes))})"] = refs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/results/gpu_check"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds before remaining work is skipped")
    ap.add_argument("--phases", default="probe,kernels,engine,throughput,methods")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU rehearsal")
    c = Check(args.out, args.smoke, time.monotonic() + args.budget)
    RESULTS["command"] = " ".join(["python3 -m bench.gpu_check", *sys.argv[1:]])
    RESULTS["smoke"] = args.smoke
    chosen = args.phases.split(",")
    for name, fn in (
        ("probe", probe),
        ("kernels", kernels),
        ("engine", engine_phase),
        ("throughput", throughput),
        ("methods", methods_phase),
    ):
        if name in chosen:
            phase(name, c, fn)
    c.save()
    print(f"wrote {c.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()

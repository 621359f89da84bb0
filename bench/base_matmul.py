"""The base projections of one decode step on CPU, by row count: our NF4 product that decodes each
weight in registers (nf4_cpu.matmul) against dequantizing the weight with our kernel and then one
BLAS matmul (the `plain` mode's other way), and against the 16-row tiles of that matmul (the
`tiled` mode's other way). SmolLM2-135M's 210 NF4 projections, each given random rows; the three
ways alternate round by round, and every figure is a ratio to dequantize + matmul in the same run.
This measurement sets base_gemm.CPU_MATMUL_ROWS (one value per vector width of our build, AVX2's 8
lanes or AVX-512's 16, and per kernels of MKL's: AVX-512 on an Intel CPU, AVX2 on AMD's). Beside it,
the same way, the fp32 lm_head (49152 x 576): our row-invariant product (dense_cpu.matmul) against
one BLAS matmul (F.linear) and its 16-row tiles; that sets base_gemm.CPU_DENSE_ROWS.

With `--steps 32,48,64`, also whole base-only decode steps of the engine at those batch sizes in
`plain`: this machine's row limits against `--against` (another NF4,lm_head pair; the AVX-512
build's limits where MKL runs its AVX2 kernels by default), the two alternated step by step.

    .venv/bin/python -m bench.base_matmul [--rows 1,2,4,8,16,32,64,128] [--rounds 7]
        [--steps 32,48,64 [--against 64,128] [--step-rounds 10]]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench import workload
from bench.report import alternated, save, table
from server.lora.registry import AdapterRegistry
from server.model import dense_cpu, nf4_cpu
from server.model.base_gemm import (
    cpu_dense_rows,
    cpu_matmul_rows,
    dequantized_weight,
    nf4_state,
    row_limits,
    tiled_linear,
)
from server.model.loader import BaseModel

WAYS: dict[str, Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]] = {
    "dequantize + matmul": lambda x, m: F.linear(x, dequantized_weight(m, torch.float32)),
    "dequantize + 16-row tiles": lambda x, m: tiled_linear(x, dequantized_weight(m, torch.float32)),
    "nf4_cpu.matmul": lambda x, m: nf4_cpu.matmul(x, m.weight.data, nf4_state(m)),
}
HEAD_WAYS: dict[str, Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]] = {
    "F.linear": lambda x, m: F.linear(x, m.weight),
    "16-row tiles": lambda x, m: tiled_linear(x, m.weight),
    "dense_cpu.matmul": lambda x, m: dense_cpu.matmul(x, m.weight),
}


def timed(
    ways: dict[str, Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]],
    xs: list[torch.Tensor],
    linears: list[torch.nn.Linear],
    rounds: int,
) -> dict[str, float]:
    """Median ms of each way over all the linears, the ways alternated round by round."""

    def over_all(fn: Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for x, lin in zip(xs, linears, strict=True):
                fn(x, lin)

        return run

    return alternated({way: over_all(fn) for way, fn in ways.items()}, rounds)


def step_ratios(
    base: BaseModel, batches: list[int], against: tuple[int, int], rounds: int
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Base-only decode steps at each batch size, `plain` with this machine's row limits against
    `against`, alternated in one engine (one untimed step after each switch, then four timed):
    median and fastest step of each, and their ratios."""
    limits = {"ours": (cpu_matmul_rows(), cpu_dense_rows()), "against": against}
    registry = AdapterRegistry(base.linear_shapes, workload.RANK, factor_dtype=base.lora_dtype)
    prompt = workload.chat_ids(base, 1)[0]
    rows, results = [], {}
    for batch in batches:
        engine = workload.engine(base, registry, max_loras=1, max_num_seqs=batch)
        workload.decoding(engine, prompt, [None] * batch)
        times: dict[str, list[float]] = {k: [] for k in limits}
        for _ in range(rounds):
            for key, (matmul, dense) in limits.items():
                with row_limits(matmul, dense):
                    engine.step()
                    for _ in range(4):
                        t = time.perf_counter()
                        engine.step()
                        times[key].append(1e3 * (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        ratio, best_ratio = med["ours"] / med["against"], best["ours"] / best["against"]
        results[str(batch)] = {
            "median_ms": med,
            "fastest_ms": best,
            "ratio": ratio,
            "fastest_ratio": best_ratio,
        }
        rows.append([batch, f"{med['ours']:.1f}", f"{med['against']:.1f}", ratio, best_ratio])
    return rows, {"limits": {k: list(v) for k, v in limits.items()}, "batches": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", default="", help="also whole decode steps at these batch sizes")
    ap.add_argument("--against", default="64,128", help="the NF4,lm_head row limits --steps compares with")
    ap.add_argument("--step-rounds", type=int, default=10)
    args = ap.parse_args()

    base, linears, head = workload.kernel_base()
    g = torch.Generator().manual_seed(0)
    rows, head_rows, results, head_results = [], [], {}, {}
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, lin.in_features, generator=g) for lin in linears]
        ms = timed(WAYS, xs, linears, args.rounds)
        ref = ms["dequantize + matmul"]
        results[str(m)] = {"ms": ms, "ratio_vs_dequantize_matmul": {w: v / ref for w, v in ms.items()}}
        rows.append(
            [
                m,
                *(f"{ms[w]:.1f}" for w in WAYS),
                ms["nf4_cpu.matmul"] / ref,
                ms["nf4_cpu.matmul"] / ms["dequantize + 16-row tiles"],
            ]
        )
        ms = timed(HEAD_WAYS, [torch.randn(m, head.in_features, generator=g)], [head], args.rounds)
        ref = ms["F.linear"]
        head_results[str(m)] = {"ms": ms, "ratio_vs_linear": {w: v / ref for w, v in ms.items()}}
        head_rows.append(
            [
                m,
                *(f"{ms[w]:.1f}" for w in HEAD_WAYS),
                ms["dense_cpu.matmul"] / ref,
                ms["dense_cpu.matmul"] / ms["16-row tiles"],
            ]
        )
    text = table(
        f"210 NF4 projections of SmolLM2-135M, ms (median of {args.rounds} rounds, interleaved); "
        f"`plain` uses nf4_cpu.matmul up to {cpu_matmul_rows()} rows, `tiled` at every count",
        ["rows", *WAYS, "matmul / dequantize+matmul", "matmul / tiles"],
        rows,
    )
    head_text = table(
        f"lm_head {head.out_features} x {head.in_features} fp32, ms (median of {args.rounds} rounds, "
        f"interleaved); `plain` uses dense_cpu.matmul up to {cpu_dense_rows()} rows, `tiled` at every count",
        ["rows", *HEAD_WAYS, "dense / F.linear", "dense / tiles"],
        head_rows,
    )
    steps: dict[str, Any] = {}
    step_text = ""
    if args.steps:
        matmul, dense = (int(n) for n in args.against.split(","))
        batches = [int(b) for b in args.steps.split(",")]
        step_rows, steps = step_ratios(base, batches, (matmul, dense), args.step_rounds)
        step_text = "\n\n" + table(
            f"base-only decode step in `plain`, ms (median of {args.step_rounds} x 4 steps, alternated): "
            f"row limits {cpu_matmul_rows()},{cpu_dense_rows()} (NF4,lm_head) against {matmul},{dense}",
            ["batch", "this machine's limits", "against", "ratio", "ratio (fastest)"],
            step_rows,
        )
    save(
        "base_matmul",
        {
            "rounds": args.rounds,
            "cpu_matmul_rows": cpu_matmul_rows(),
            "vector_lanes": nf4_cpu.lanes(),
            "cpu_dense_rows": cpu_dense_rows(),
            "rows": results,
            "lm_head": head_results,
            "steps": steps,
            "table": text + "\n\n" + head_text + step_text,
        },
    )


if __name__ == "__main__":
    main()

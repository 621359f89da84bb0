"""The base projections of one decode step on CPU, by row count: our NF4 product that decodes each
weight in registers (nf4_cpu.matmul) against dequantizing the weight with our kernel and then one
BLAS matmul (the `plain` mode's other way), and against the 16-row tiles of that matmul (the
`tiled` mode's other way). SmolLM2-135M's 210 NF4 projections, each given random rows; the three
ways alternate round by round, and every figure is a ratio to dequantize + matmul in the same run.
This measurement sets base_gemm.CPU_MATMUL_ROWS.

    .venv/bin/python -m bench.base_matmul [--rows 1,2,4,8,16,32,64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench import workload
from bench.report import save, table
from server.model import nf4_cpu
from server.model.base_gemm import (
    CPP_MATMUL,
    CPU_MATMUL_ROWS,
    dequantized_weight,
    nf4_state,
    tiled_linear,
)

WAYS: dict[str, Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor]] = {
    "dequantize + matmul": lambda x, m: F.linear(x, dequantized_weight(m, torch.float32)),
    "dequantize + 16-row tiles": lambda x, m: tiled_linear(x, dequantized_weight(m, torch.float32)),
    "nf4_cpu.matmul": lambda x, m: nf4_cpu.matmul(x, m.weight.data, nf4_state(m)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    base = workload.load(max_loras=1, dequant="cpp")
    linears: list[torch.nn.Linear] = [layer.base for layer in base.lora_layers.values()]
    if not all(getattr(m, CPP_MATMUL, False) for m in linears):
        raise SystemExit("nf4_cpu.matmul does not take this base here (no AVX2 build, or not NF4 on CPU)")
    g = torch.Generator().manual_seed(0)
    rows, results = [], {}
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, lin.in_features, generator=g) for lin in linears]
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        for _ in range(args.rounds):
            for way, fn in WAYS.items():
                t = time.perf_counter()
                for x, lin in zip(xs, linears, strict=True):
                    fn(x, lin)
                times[way].append(time.perf_counter() - t)
        ms = {w: 1e3 * statistics.median(v) for w, v in times.items()}
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
    text = table(
        f"210 NF4 projections of SmolLM2-135M, ms (median of {args.rounds} rounds, interleaved); "
        f"`plain` uses nf4_cpu.matmul up to {CPU_MATMUL_ROWS} rows, `tiled` at every count",
        ["rows", *WAYS, "matmul / dequantize+matmul", "matmul / tiles"],
        rows,
    )
    save(
        "base_matmul",
        {"rounds": args.rounds, "cpu_matmul_rows": CPU_MATMUL_ROWS, "rows": results, "table": text},
    )


if __name__ == "__main__":
    main()

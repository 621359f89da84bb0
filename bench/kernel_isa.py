"""Our three CPU kernels as built for this CPU (-march=native: AVX-512 where it has it) against the
same sources built for AVX2 (x86-64-v3, what an AVX2-only machine runs), in one process, alternated
round by round; every figure is a ratio to the AVX2 build in the same run. The AVX2 twins are the
same files with their op library renamed, built beside the real ones. On an AVX2-only machine both
builds run the same code (ratios about 1.0): the figures mean something on an AVX-512 CPU.

- the NF4 product (nf4_cpu.matmul) over SmolLM2-135M's 210 projections;
- the dense product (dense_cpu.matmul) of its fp32 lm_head (49152 x 576);
- the LoRA kernel (lora_cpu.cpp) on those 210 projections, rank 16, fp32 and bf16 factors: 16 rows
  of 16 distinct adapters, 16 rows of one adapter, and a 64-token prompt of one adapter.

    .venv/bin/python -m bench.kernel_isa [--rows 1,2,4,8,16,32,64] [--rounds 9]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from bench import workload
from bench.report import alternated, save, table
from server.cpp_build import FLAGS, CppKernel
from server.lora.backends import cpp_lora
from server.model import dense_cpu, nf4_cpu
from server.model.base_gemm import nf4_state

TWIN_ARCH = "x86-64-v3"
RANK, ADAPTERS, PROMPT = 16, 16, 64
SCALE = torch.full((ADAPTERS + 1,), 2.0)  # every slot's scale and rank
RANKS = torch.full((ADAPTERS + 1,), RANK, dtype=torch.int32)
Runner = Callable[[], None]
Work = tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]
# library name in each source -> the kernel that builds it
KERNELS = {
    "loraplex_nf4": nf4_cpu.KERNEL,
    "loraplex_dense": dense_cpu.KERNEL,
    "loraplex_cpu": cpp_lora.KERNEL,
}


def build_twin(library: str, kernel: CppKernel) -> str:
    """The kernel's source built for TWIN_ARCH with its op library renamed; returns the new name."""
    twin = f"{library}_avx2"
    text = kernel.source.read_text()
    assert f"TORCH_LIBRARY({library}," in text, library
    directory = Path.home() / ".cache" / "loraplex" / "bench"
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{twin}.cpp"
    text = text.replace(f"TORCH_LIBRARY({library},", f"TORCH_LIBRARY({twin},")
    if not source.is_file() or source.read_text() != text:  # rewritten, it would be rebuilt each run
        source.write_text(text)
    flags = tuple(f"-march={TWIN_ARCH}" if f.startswith("-march=") else f for f in FLAGS)
    if not CppKernel(twin, source, f"{TWIN_ARCH} twin of {kernel.what}", flags).load():
        raise SystemExit(f"the {TWIN_ARCH} build of {kernel.source.name} failed")
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()

    _, linears, head = workload.kernel_base()
    if not cpp_lora.load():
        raise SystemExit(f"the LoRA kernel does not build here: {cpp_lora.error()}")
    twins = {lib: build_twin(lib, kernel) for lib, kernel in KERNELS.items()}
    lanes = {
        "native": int(torch.ops.loraplex_nf4.vector_lanes()),
        TWIN_ARCH: int(getattr(torch.ops, twins["loraplex_nf4"]).vector_lanes()),
    }
    print(f"vector lanes: this CPU's build {lanes['native']}, the {TWIN_ARCH} build {lanes[TWIN_ARCH]}")

    g = torch.Generator().manual_seed(0)
    states = [nf4_state(m) for m in linears]
    base_rows, results = [], {}
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, lin.in_features, generator=g) for lin in linears]
        head_x = torch.randn(m, head.in_features, generator=g)

        def nf4(lib: str, xs: list[torch.Tensor] = xs) -> Runner:
            op = getattr(torch.ops, lib).matmul.default

            def run() -> None:
                for x, lin, s in zip(xs, linears, states, strict=True):
                    op(x, lin.weight.data, s.absmax, s.code, s.blocksize, s.shape[0], s.shape[1])

            return run

        def dense(lib: str, x: torch.Tensor = head_x) -> Runner:
            op = getattr(torch.ops, lib).matmul.default

            def run() -> None:
                op(x, head.weight)

            return run

        ms = alternated(
            {
                "nf4 native": nf4("loraplex_nf4"),
                "nf4 avx2": nf4(twins["loraplex_nf4"]),
                "dense native": dense("loraplex_dense"),
                "dense avx2": dense(twins["loraplex_dense"]),
            },
            args.rounds,
        )
        nf4_ratio, dense_ratio = ms["nf4 native"] / ms["nf4 avx2"], ms["dense native"] / ms["dense avx2"]
        results[str(m)] = {"ms": ms, "nf4_native_over_avx2": nf4_ratio, "dense_native_over_avx2": dense_ratio}
        base_rows.append([m, *(f"{ms[w]:.2f}" for w in ms), nf4_ratio, dense_ratio])
    base_text = table(
        f"base products, ms (median of {args.rounds} rounds, alternated): 210 NF4 projections, the lm_head",
        [
            "rows",
            "nf4 native",
            f"nf4 {TWIN_ARCH}",
            "dense native",
            f"dense {TWIN_ARCH}",
            "nf4 ratio",
            "dense ratio",
        ],
        base_rows,
    )

    lora_rows, lora_results = [], {}
    cases = {
        f"{ADAPTERS} rows, {ADAPTERS} adapters": list(range(1, ADAPTERS + 1)),
        f"{ADAPTERS} rows, 1 adapter": [1] * ADAPTERS,
        f"{PROMPT}-token prompt, 1 adapter": [1] * PROMPT,
    }
    for dtype in (torch.float32, torch.bfloat16):
        # every projection's slots: A stored rank-innermost, as LoRALinear keeps it
        factors = [
            (
                (torch.randn(ADAPTERS + 1, lin.in_features, RANK, generator=g) * 0.05)
                .to(dtype)
                .transpose(1, 2),
                (torch.randn(ADAPTERS + 1, RANK, lin.out_features, generator=g) * 0.05).to(dtype),
            )
            for lin in linears
        ]
        xs = [torch.randn(PROMPT, lin.in_features, generator=g) for lin in linears]
        ys = [torch.zeros(PROMPT, lin.out_features) for lin in linears]
        for case, slot_list in cases.items():
            slots = torch.tensor(slot_list)
            t = len(slot_list)

            def lora(
                lib: str, slots: torch.Tensor = slots, t: int = t, work: Work = (factors, xs, ys)
            ) -> Runner:
                op = getattr(torch.ops, lib).lora_add_.default
                pairs, inputs, outputs = work

                def run() -> None:
                    for (A, B), x, y in zip(pairs, inputs, outputs, strict=True):
                        op(y[:t], x[:t], A, B, SCALE, RANKS, None, slots)

                return run

            ms = alternated(
                {"native": lora("loraplex_cpu"), "avx2": lora(twins["loraplex_cpu"])}, args.rounds
            )
            name = f"{case}, {str(dtype).removeprefix('torch.')}"
            lora_results[name] = {"ms": ms, "native_over_avx2": ms["native"] / ms["avx2"]}
            lora_rows.append([name, f"{ms['native']:.2f}", f"{ms['avx2']:.2f}", ms["native"] / ms["avx2"]])
    lora_text = table(
        f"LoRA products over the 210 projections, rank {RANK}, ms (median of {args.rounds} rounds, "
        "alternated)",
        ["case", "native", TWIN_ARCH, "ratio"],
        lora_rows,
    )
    save(
        "kernel_isa",
        {
            "rounds": args.rounds,
            "twin_arch": TWIN_ARCH,
            "vector_lanes": lanes,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "base": results,
            "lora": lora_results,
            "table": base_text + "\n\n" + lora_text,
        },
    )


if __name__ == "__main__":
    main()

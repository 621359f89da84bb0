"""How the engine scales on the default model in NF4 (rank-16 adapters on all seven projections):
(i) decode tokens/s at batch 32 against the number of distinct adapters in the batch (ratio vs
base only), (ii) decode tokens/s against batch size (ratio vs batch 1), (iii) resident memory with
1, 100 and 1000 registered adapters, 8 of them served (growth vs 1 registered).

    .venv/bin/python -m bench.scaling [--quick] [--part all|adapters|batch|memory]

Each memory point runs in a fresh subprocess (`--memory-child N`) so one count's allocations
cannot inflate the next one's RSS."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.adapters import adapter_set
from bench.workload import chat_ids, drive, engine, greedy, load, register, set_threads
from server.engine.sequence import Sequence
from server.lora.adapter import AdapterWeights
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import BaseModel

SMALL = (8, ("q_proj", "v_proj"))  # rank and targets of the memory test's adapters
SERVED = 8


def rss_mb(field: str = "VmRSS") -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def snapshot() -> dict[str, float]:
    # RssAnon too: VmRSS counts the mmapped checkpoint's pages, which vary by ~100 MB between loads.
    return {"VmRSS": rss_mb(), "RssAnon": rss_mb("RssAnon")}


def decode_tps(
    base: BaseModel,
    registry: AdapterRegistry,
    preload: list[tuple[AdapterRecord, AdapterWeights]],
    batch: int,
    distinct: int,
    steps: int,
) -> float:
    """Tokens/s over `steps` pure decode steps of `batch` requests on `distinct` adapters
    (0 = base), timed after every prompt is prefilled and one warm-up decode step."""
    records = [r for r, _ in preload]
    eng = engine(base, registry, max_loras=len(records), max_num_seqs=batch, preload=preload)
    for i, ids in enumerate(chat_ids(base, batch)):
        adapter = records[i % distinct] if distinct else None
        eng.add_request(Sequence(f"r{i}", ids, greedy(steps + 64), adapter))
    while not (eng.records and len(eng.records[-1].decoded) == batch):
        eng.step()
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    seconds = time.perf_counter() - start
    timed = list(eng.records)[-steps:]
    assert all(len(r.decoded) == batch and not r.prefilled for r in timed), "a timed step was not pure decode"
    assert max(len(r.adapters) for r in timed) == distinct
    return batch * steps / seconds


def memory_child(count: int) -> None:
    """Register `count` small adapters the way the server does, serve one request on each of the
    first SERVED, then print RSS (MB) at each stage as one JSON line."""
    base = load(max_loras=SERVED)
    rss = {"base loaded": snapshot()}
    rank, targets = SMALL
    registry = AdapterRegistry(base.linear_shapes, 16)
    start = time.perf_counter()
    records = [
        registry.add_dir(f"m{i}", d)[0]
        for i, d in enumerate(adapter_set(base.linear_shapes, count, rank, targets))
    ]
    register_s = time.perf_counter() - start
    rss["registered"] = snapshot()
    # Served through the CPU cache's disk loader, as the server does: nothing preloaded.
    eng = engine(base, registry, max_loras=SERVED, max_num_seqs=SERVED, kv_cache_tokens=2048)
    prompts = chat_ids(base, SERVED)
    drive(eng, [(f"r{i}", records[i % count], prompts[i]) for i in range(SERVED)], 4)
    rss["served"] = snapshot()
    resident = sum(r.version in eng.cache for r in records)  # min(count, SERVED)
    print(json.dumps({"count": count, "rss_mb": rss, "register_s": register_s, "cpu_cached": resident}))


def memory(counts: list[int], threads: int | None) -> list[dict[str, Any]]:
    out = []
    for n in counts:
        cmd = [sys.executable, "-m", "bench.scaling", "--memory-child", str(n)]
        if threads:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
        )
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def memory_table(mem: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Growth is taken inside each child (a stage minus its own loaded base), then against the first
    count, so the ~100 MB noise of loading the base cancels out."""

    def grew(m: dict[str, Any], stage: str, field: str = "VmRSS") -> float:
        return float(m["rss_mb"][stage][field] - m["rss_mb"]["base loaded"][field])

    rows = []
    for m in mem:
        m["growth_vs_first_mb"] = {
            stage: grew(m, stage) - grew(mem[0], stage) for stage in ("registered", "served")
        }
        rows.append(
            [m["count"], m["cpu_cached"], f"{m['rss_mb']['base loaded']['VmRSS']:.0f}",
             f"{grew(m, 'registered'):+.0f}", f"{grew(m, 'served'):+.0f}",
             f"{grew(m, 'served', 'RssAnon'):+.0f}", f"{m['growth_vs_first_mb']['registered']:+.0f}",
             f"{m['growth_vs_first_mb']['served']:+.0f}", f"{m['register_s']:.1f}"]
        )  # fmt: skip
    report.table(
        f"(iii) memory (MB) over the loaded base; adapters rank {SMALL[0]}, q_proj+v_proj; requests on "
        f"{SERVED} of them; growth vs {mem[0]['count']} registered",
        ["registered", "resident", "base VmRSS", "+registry", "+served", "+served anon",
         "growth reg.", "growth served", "register s"],
        rows,
    )  # fmt: skip
    return mem


def sweeps(base: BaseModel, args: argparse.Namespace) -> dict[str, Any]:
    """Parts (i) and (ii): every point gets a fresh engine over the same base and adapters."""
    distinct = [int(d) for d in args.distinct.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    registry, records, weights, _ = register(base, max(distinct + [min(b, 16) for b in batches]))
    preload = list(zip(records, weights, strict=True))
    out: dict[str, Any] = {}
    if args.part in ("all", "adapters"):
        tps = {d: decode_tps(base, registry, preload, args.batch, d, args.steps) for d in distinct}
        report.table(
            f"(i) decode, batch {args.batch}, {args.steps} steps: tokens/s vs distinct adapters",
            ["adapters", "tok/s", "x base"],
            [[d, f"{t:.1f}", t / tps[0]] for d, t in tps.items()],
        )
        out["adapters"] = {str(d): {"tokens_per_s": t, "ratio_vs_base": t / tps[0]} for d, t in tps.items()}
    if args.part in ("all", "batch"):
        tps = {b: decode_tps(base, registry, preload, b, min(b, 16), args.steps) for b in batches}
        one = tps[batches[0]]
        report.table(
            f"(ii) decode, {args.steps} steps, distinct adapters = min(batch, 16): tokens/s vs batch",
            ["batch", "adapters", "tok/s", f"x batch {batches[0]}"],
            [[b, min(b, 16), f"{t:.1f}", t / one] for b, t in tps.items()],
        )
        out["batch"] = {str(b): {"tokens_per_s": t, "ratio_vs_batch_1": t / one} for b, t in tps.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--part", choices=["all", "adapters", "batch", "memory"], default="all")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    ap.add_argument("--batch", type=int, default=32, help="batch of the adapters sweep")
    ap.add_argument("--distinct", default="0,1,2,4,8,16,32")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--counts", default="1,100,1000", help="registered adapters, memory test")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.distinct, args.batches, args.counts = 3, 4, "0,1,4", "1,4", "1,5,10"
        args.threads = args.threads or 1
    set_threads(args.threads)
    if args.memory_child is not None:
        memory_child(args.memory_child)
        return

    results: dict[str, object] = {"config": vars(args)}
    base = None
    if args.part != "memory":
        base = load(max_loras=max(int(d) for d in (args.distinct + "," + args.batches).split(",")))
        results.update(sweeps(base, args))
    if args.part in ("all", "memory"):
        counts = [int(c) for c in args.counts.split(",")]
        # Written once here, so the children only read them (and none races another writing them).
        adapter_set((base or load(max_loras=1)).linear_shapes, max(counts), *SMALL)
        results["memory"] = memory_table(memory(counts, args.threads))
    report.save("scaling_quick" if args.quick else "scaling", results)


if __name__ == "__main__":
    main()

"""Generated tokens/s of loraplex against PEFT on the same NF4 base: chat requests spread over many
adapters (request i uses adapter i % adapters), greedy, exactly --new-tokens each (ignore_eos).

    .venv/bin/python -m bench.throughput [--quick] [--max-num-seqs 32] [--rate R]

Measured in one process, one after the other: loraplex with every request arriving at once
(burst), loraplex with seeded Poisson arrivals, (a) PEFT set_adapter + generate one request at a
time, (b) PEFT generate(adapter_names=...) on static left-padded batches. The figures are the
ratios loraplex / (a) and loraplex / (b) (issue targets: >= 10x and >= 3x)."""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from bench import report
from bench.workload import Job, Run, chat_ids, drive, engine, load, peft_model, register, set_threads
from server.engine.engine import LLMEngine


def peft_serial(model: Any, jobs: list[tuple[str, str, list[int]]], new_tokens: int) -> Run:
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    for rid, name, ids in jobs:
        model.set_adapter(name)
        x = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False
            )
        tokens[rid] = out[0, len(ids) :].tolist()
        assert len(tokens[rid]) == new_tokens
    return Run(time.perf_counter() - start, tokens)


def peft_batched(model: Any, jobs: list[tuple[str, str, list[int]]], new_tokens: int, batch: int) -> Run:
    pad = model.generation_config.pad_token_id
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    for b in range(0, len(jobs), batch):
        chunk = jobs[b : b + batch]
        width = max(len(ids) for _, _, ids in chunk)
        x = torch.tensor([[pad] * (width - len(ids)) + ids for _, _, ids in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids in chunk])
        with torch.inference_mode():
            out = model.generate(
                input_ids=x,
                attention_mask=mask.to(model.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                adapter_names=[name for _, name, _ in chunk],
            )
        for (rid, _, _), row in zip(chunk, out[:, width:].tolist(), strict=True):
            tokens[rid] = row
    return Run(time.perf_counter() - start, tokens)


def agreement(ours: dict[str, list[int]], theirs: dict[str, list[int]], prefix: int) -> float:
    """Fraction of the requests both ran whose first `prefix` greedy tokens are identical."""
    common = [rid for rid in theirs if rid in ours]
    return sum(ours[r][:prefix] == theirs[r][:prefix] for r in common) / len(common)


def poisson(count: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        times.append(t)  # the first request arrives at once, so the clock starts with work
        t += rng.expovariate(rate)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="all requests of a burst decode together")
    ap.add_argument("--rate", type=float, default=None, help="req/s (default: requests / burst seconds)")
    ap.add_argument("--peft-serial-requests", type=int, default=16)
    ap.add_argument("--peft-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.adapters, args.new_tokens = 8, 4, 8
        args.peft_serial_requests, args.peft_batch = 4, 4
        args.threads = args.threads or 1
    set_threads(args.threads)

    base = load(max_loras=args.adapters)
    registry, records, weights, dirs = register(base, args.adapters)
    prompts = chat_ids(base, args.requests)
    jobs: list[Job] = [(f"r{i}", records[i % args.adapters], p) for i, p in enumerate(prompts)]
    new = args.new_tokens

    def fresh() -> LLMEngine:
        eng = engine(
            base,
            registry,
            max_loras=args.adapters,
            max_num_seqs=args.max_num_seqs,
            preload=list(zip(records, weights, strict=True)),
        )
        drive(eng, [(f"warm{i}", records[i], prompts[i]) for i in range(2)], 4)
        return eng

    burst = drive(fresh(), jobs, new)
    rate = args.rate or args.requests / burst.seconds
    arrivals = poisson(args.requests, rate, args.seed)
    arriving = drive(fresh(), jobs, new, arrivals)

    pad = base.tokenizer.pad_token_id
    model = peft_model(dirs, pad if pad is not None else base.tokenizer.eos_token_id)
    named = [(rid, f"a{i % args.adapters}", p) for i, (rid, _, p) in enumerate(jobs)]
    peft_serial(model, named[:1], 4)  # warm-up
    peft_batched(model, named[:2], 4, 2)
    # One request per adapter, spread over the adapters: tokens/s is a rate, a subset measures it.
    serial = peft_serial(model, named[: args.peft_serial_requests], new)
    batched = peft_batched(model, named, new, args.peft_batch)

    runs = {"loraplex burst": burst, "loraplex poisson": arriving, "peft serial (a)": serial}
    runs["peft adapter_names (b)"] = batched
    tps = {k: r.generated / r.seconds for k, r in runs.items()}
    rows = [
        [k, len(r.tokens), r.generated, f"{r.seconds:.1f}", f"{tps[k]:.1f}",
         tps["loraplex burst"] / tps[k], tps["loraplex poisson"] / tps[k]]
        for k, r in runs.items()
    ]  # fmt: skip
    report.table(
        f"{args.requests} chat requests over {args.adapters} adapters (rank 16, 7 projections), "
        f"{new} new tokens each, NF4, max_num_seqs {args.max_num_seqs}, threads {torch.get_num_threads()}",
        ["run", "requests", "tokens", "s", "tok/s", "burst / run", "poisson / run"],
        rows,
    )
    prefix = min(16, new)
    match_a = agreement(burst.tokens, serial.tokens, prefix)
    match_b = agreement(burst.tokens, batched.tokens, prefix)
    lat = list(arriving.latency.values())
    print(f"\npoisson: {rate:.2f} req/s, latency p50 {report.percentile(lat, 50):.2f} s, "
          f"p90 {report.percentile(lat, 90):.2f} s")  # fmt: skip
    print(f"first {prefix} greedy tokens identical to PEFT: {match_a:.0%} of (a), {match_b:.0%} of (b)")
    report.save(
        "throughput_quick" if args.quick else "throughput",
        {
            "config": {**vars(args), "rank": 16, "targets": "all seven projections", "poisson_rate": rate},
            "tokens_per_s": tps,
            "seconds": {k: r.seconds for k, r in runs.items()},
            "requests": {k: len(r.tokens) for k, r in runs.items()},
            "ratio_loraplex_over_peft_serial": tps["loraplex burst"] / tps["peft serial (a)"],
            "ratio_loraplex_over_peft_batched": tps["loraplex burst"] / tps["peft adapter_names (b)"],
            "ratio_poisson_over_peft_serial": tps["loraplex poisson"] / tps["peft serial (a)"],
            "ratio_poisson_over_peft_batched": tps["loraplex poisson"] / tps["peft adapter_names (b)"],
            "targets": {"over_peft_serial": 10.0, "over_peft_batched": 3.0},
            "note": (
                f"(a) timed on the first {len(serial.tokens)} requests only (one per adapter, serial "
                "generate); tokens/s is a rate, so the subset measures it. (b) and loraplex ran all."
            ),
            "poisson_latency_s": {"p50": report.percentile(lat, 50), "p90": report.percentile(lat, 90)},
            f"first_{prefix}_tokens_match_peft_serial": match_a,
            f"first_{prefix}_tokens_match_peft_batched": match_b,
        },
    )


if __name__ == "__main__":
    main()

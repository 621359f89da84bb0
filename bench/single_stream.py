"""One chat request alone, the chat page's usual case: tokens/s of loraplex's engine against
transformers' own `generate` on the same NF4 base (and PEFT `generate` for the adapter), with and
without batch invariance. Each case generates the same number of greedy tokens from the same
prompt, prefill included on both sides, timed from the request to its last token (the engine is
built before, as a server's is; the stock model and PEFT are loaded before); cases are interleaved
round by round.

    .venv/bin/python -m bench.single_stream [--rounds 5] [--tokens 48]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import workload
from bench.report import save, table
from server.model.base_gemm import BaseGemm

PROMPT = "Tell me about the ocean and the animals that live in it."


def engine_case(
    base: Any, registry: Any, loaded: list[Any], adapter: bool, mode: BaseGemm, tokens: int
) -> Callable[[], list[int]]:
    """A request on a running engine, as a server gets it: the engine (its KV cache allocated, the
    adapter in the host tier) is built here, outside the timed call; each call is a new request,
    from its prompt to its last token, like `generate`'s. A call may also move the adapter into a
    slot (this benchmark's engines share the base model's slots), a few tens of ms."""
    ids = base.chat_ids([{"role": "user", "content": PROMPT}])
    record = loaded[0][0] if adapter else None
    eng = workload.engine(base, registry, max_loras=1, max_num_seqs=8, preload=loaded)
    count = itertools.count()

    def run() -> list[int]:
        base.lora_context.base_gemm = mode
        rid = f"r{next(count)}"
        return workload.drive(eng, [(rid, record, ids)], tokens).tokens[rid]

    return run


def generate_case(model: Any, ids: list[int], tokens: int) -> Callable[[], list[int]]:
    """`model.generate`: stock transformers for the base, PEFT (adapter a0 active) for the adapter."""
    x = torch.tensor([ids])

    def run() -> list[int]:
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False)
        return [int(t) for t in out[0, len(ids) :]]

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()

    base = workload.load(max_loras=1)
    registry, records, weights, dirs = workload.register(base, 1)
    loaded = list(zip(records, weights, strict=True))
    peft = workload.peft_model(dirs, base.tokenizer.eos_token_id)
    stock = workload.load_stock(workload.model_path()[0], "nf4")
    stock.generation_config.eos_token_id = None  # exactly --tokens tokens, like ignore_eos
    stock.generation_config.pad_token_id = base.tokenizer.eos_token_id
    ids = base.chat_ids([{"role": "user", "content": PROMPT}])
    cases: dict[str, Callable[[], list[int]]] = {}
    for adapter in (False, True):
        kind = "adapter" if adapter else "base"
        cases[f"generate/{kind}"] = generate_case(peft if adapter else stock, ids, args.tokens)
        cases[f"invariant/{kind}"] = engine_case(base, registry, loaded, adapter, BaseGemm.TILED, args.tokens)
        cases[f"plain/{kind}"] = engine_case(base, registry, loaded, adapter, BaseGemm.PLAIN, args.tokens)

    times: dict[str, list[float]] = {k: [] for k in cases}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for key, run in cases.items():
            t = time.perf_counter()
            outputs[key] = run()
            times[key].append(time.perf_counter() - t)
    tps = {k: args.tokens / statistics.median(v) for k, v in times.items()}

    rows, results = [], {}
    for kind in ("base", "adapter"):
        ref = tps[f"generate/{kind}"]
        for mode in ("generate", "invariant", "plain"):
            key = f"{mode}/{kind}"
            same = outputs[key] == outputs[f"generate/{kind}"]
            rows.append([kind, mode, f"{tps[key]:.2f}", tps[key] / ref, "yes" if same else "no"])
            results[key] = {
                "tokens_per_s": tps[key],
                "ratio_vs_generate": tps[key] / ref,
                "same_tokens": same,
            }
    text = table(
        f"one request alone, {args.tokens} greedy tokens, NF4 (median of {args.rounds} rounds, interleaved)",
        ["model", "path", "tok/s", "x generate", "same tokens"],
        rows,
    )
    backend = base.lora_context.lora_backend
    save("single_stream", {"tokens": args.tokens, "lora_backend": backend, "cases": results, "table": text})


if __name__ == "__main__":
    main()

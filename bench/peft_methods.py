"""Decode-step cost at batch 16 on the default model in NF4 of the PEFT methods beyond plain LoRA, in
one mixed batch: 4 rows each of DoRA, (IA)3, modules_to_save (lm_head and every norm) and prompt
tuning, 16 distinct adapters, against the same batch with plain LoRA only (4 adapters x 4 rows), and
each method alone (4 adapters x 4 rows) to show which one bounds the mixed step. Adapters are made by
PEFT itself with every trained tensor at random (tests/peft_factory.py). Every case runs in the same
process, interleaved round by round; every figure is a ratio against cases of the same run.

    .venv/bin/python -m bench.peft_methods [--rounds 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import workload
from bench.report import save, table
from server.engine.engine import LLMEngine
from server.lora.adapter import AdapterWeights
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.loader import BaseModel

BATCH = 16
PER_METHOD = 4  # adapters of each method; 4 rows each alone, 1 row each in the mixed step
RANK = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
VIRTUAL_TOKENS = 8
METHODS = ("dora", "ia3", "saved", "prompt")
LABELS = {
    "base": "base only",
    "plain": "plain LoRA",
    "mixed": "mixed",
    "dora": "DoRA alone",
    "ia3": "(IA)3 alone",
    "saved": "modules_to_save alone",
    "prompt": "prompt tuning alone",
}
PROMPT = "Tell me a long story about a dragon and a knight."


def peft_config(method: str) -> Any:
    """A fresh PEFT config per adapter (get_peft_model writes into the one it is given)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    from tests.peft_factory import NORMS

    lora: dict[str, Any] = {
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": list(TARGETS),
        "init_lora_weights": False,
    }
    if method == "plain":
        return LoraConfig(**lora)
    if method == "dora":
        return LoraConfig(**lora, use_dora=True)
    if method == "saved":  # SmolLM2 ties lm_head to the input embedding: the copy is lm_head's alone
        return LoraConfig(**lora, modules_to_save=["lm_head", *NORMS])
    if method == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    raise ValueError(method)


def make_adapters(
    base: BaseModel, root: Path
) -> tuple[AdapterRegistry, dict[str, list[tuple[AdapterRecord, AdapterWeights]]]]:
    """PER_METHOD adapters of plain LoRA and of each method, made by PEFT under `root` and registered."""
    from transformers import AutoModelForCausalLM

    from tests.peft_factory import make_method_adapter

    path, _ = workload.model_path()

    def factory() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    registry = AdapterRegistry(
        base.linear_shapes, workload.RANK, saveable=base.saveable, max_saved_bytes=1 << 30, dims=base.dims
    )
    made: dict[str, list[tuple[AdapterRecord, AdapterWeights]]] = {}
    for m, method in enumerate(("plain", *METHODS)):
        made[method] = []
        for i in range(PER_METHOD):
            name = f"{method}{i}"
            make_method_adapter(factory, root / name, 100 * m + i, peft_config(method))
            registry.add_dir(name, root / name)
            record = registry.resolve(name)
            made[method].append((record, registry.load(record)))
    return registry, made


def engine_case(
    base: BaseModel,
    registry: AdapterRegistry,
    loaded: list[tuple[AdapterRecord, AdapterWeights]],
    rows: list[AdapterRecord | None],
) -> tuple[LLMEngine, Callable[[], None]]:
    engine = workload.engine(base, registry, max_loras=BATCH, max_num_seqs=BATCH, preload=loaded)
    workload.decoding(engine, base.tokenizer.encode(PROMPT), rows)  # prompt tuning's virtual positions too
    assert all(len(s.output_token_ids) for s in engine.scheduler.running)

    def step() -> None:
        engine.step()

    return engine, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds over all cases")
    ap.add_argument("--steps", type=int, default=5, help="timed decode steps per case per round")
    ap.add_argument("--no-alone", action="store_true", help="skip each method alone")
    args = ap.parse_args()

    base = workload.load(max_loras=BATCH)
    with tempfile.TemporaryDirectory(prefix="peft-methods-") as tmp:
        registry, made = make_adapters(base, Path(tmp))
        loaded = [pair for pairs in made.values() for pair in pairs]
        recs = {method: [r for r, _ in pairs] for method, pairs in made.items()}
        rows: dict[str, list[AdapterRecord | None]] = {
            "base": [None] * BATCH,
            "plain": [recs["plain"][i % PER_METHOD] for i in range(BATCH)],
            "mixed": [recs[m][i] for m in METHODS for i in range(BATCH // len(METHODS))],
        }
        if not args.no_alone:
            rows |= {m: [recs[m][i % PER_METHOD] for i in range(BATCH)] for m in METHODS}
        cases = {key: engine_case(base, registry, loaded, r) for key, r in rows.items()}

        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for key, (_engine, step) in cases.items():
                step()  # untimed: the other cases ran last; its SlotTable writes its adapters back
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step()
                    times[key].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
        same_tokens(cases, rows)
        heads: dict[str, dict[str, float]] = {
            key: lm_head_cost(*cases[key], rows[key], args.rounds * args.steps)
            for key in ("mixed", "saved")
            if key in cases
        }

    shape = {
        "base": "16 rows, no adapter",
        "plain": f"{PER_METHOD} adapters x {BATCH // PER_METHOD} rows",
        "mixed": f"{len(METHODS)} methods x {PER_METHOD} adapters x 1 row",
        **{m: f"{PER_METHOD} adapters x {BATCH // PER_METHOD} rows" for m in METHODS},
    }
    results: dict[str, dict[str, float]] = {}
    table_rows = []
    for key, value in ms.items():
        entry = {"ms": value, "x_plain": value / ms["plain"], "x_base": value / ms["base"]}
        results[key] = entry
        table_rows.append([LABELS[key], shape[key], f"{value:.1f}", entry["x_plain"], entry["x_base"]])
    text = table(
        f"decode step, batch {BATCH}, NF4, rank-{RANK} LoRA on {'/'.join(TARGETS)} "
        f"(median of {args.rounds * args.steps} steps, interleaved)",
        ["case", "rows", "ms", "x plain", "x base"],
        table_rows,
    )
    note = (
        "mixed: DoRA, (IA)3 (k/v/down_proj), modules_to_save (lm_head + every norm) and prompt tuning "
        f"({VIRTUAL_TOKENS} virtual tokens), {BATCH // len(METHODS)} rows each, {len(METHODS) * PER_METHOD} "
        "distinct adapters. AdaLoRA is not timed: it is converted to plain LoRA factors at load, so its "
        "rows are plain LoRA rows."
    )
    print(note)
    print(f"\nmixed / plain LoRA: {ms['mixed'] / ms['plain']:.2f}")
    bound = bounds(ms, heads)
    print(f"\n{bound}")
    record: dict[str, Any] = {
        "batch": BATCH,
        "rank": RANK,
        "targets": TARGETS,
        "adapters_per_method": PER_METHOD,
        "mixed_over_plain": ms["mixed"] / ms["plain"],
        "cases": results,
        "lm_head": heads,
        "table": text,
        "note": note,
        "bounds": bound,
    }
    save("peft_methods", record)


def same_tokens(
    cases: dict[str, tuple[LLMEngine, Callable[[], None]]], rows: dict[str, list[AdapterRecord | None]]
) -> None:
    """What the timed steps computed: each adapter's greedy tokens in the mixed step are the ones it
    got alone (the engines share the slot buffers; a stale slot would show here)."""
    tokens: dict[str, dict[str, list[int]]] = {}
    for key, (engine, _) in cases.items():
        by_id = {s.request_id: s.output_token_ids for s in engine.scheduler.running}
        tokens[key] = {}
        for i, r in enumerate(rows[key]):
            tokens[key].setdefault(r.version if r is not None else "", by_id[f"r{i}"])
    for key, (engine, _) in cases.items():
        last = engine.records[-1]  # the last timed step: every row decoded, every adapter in it
        distinct = {r.version for r in rows[key] if r is not None}
        assert len(last.decoded) == BATCH and set(last.adapters) == distinct, key
    for key in METHODS:
        for version, want in tokens.get(key, {}).items():
            got = tokens["mixed"][version]
            n = min(len(got), len(want))
            assert got[:n] == want[:n], f"{key}: the mixed step's tokens differ from the adapter's alone"


def lm_head_cost(
    engine: LLMEngine, step: Callable[[], None], rows: list[AdapterRecord | None], steps: int
) -> dict[str, float]:
    """A case's lm_head timed alone: the base lm_head on its BATCH rows, then the same call with the
    case's slots (the rows of a modules_to_save adapter are recomputed with its own copy)."""
    step()  # its adapters back in the slots (the SlotTable reclaims them from the last case's)
    slot_of = engine.slots.slot_of
    slots = [slot_of[r.version] if r is not None else 0 for r in rows]
    runner, base = engine.runner, engine.base
    hidden = torch.randn(BATCH, base.model.config.hidden_size, dtype=base.dtype, device=base.device)
    out: dict[str, float] = {}
    for key, which in (("base_ms", [0] * BATCH), ("case_ms", slots)):
        runner._lm_head(hidden, which)
        times = []
        for _ in range(max(steps, 5)):
            t = time.perf_counter()
            runner._lm_head(hidden, which)
            times.append(time.perf_counter() - t)
        out[key] = statistics.median(times) * 1000
    vocab, hidden_size = base.model.lm_head.weight.shape
    out |= {"saved_copies": len({s for s in slots if s in base.lora_context.saved})}
    out |= {"vocab": vocab, "hidden": hidden_size}
    return out


def bounds(ms: dict[str, float], heads: dict[str, dict[str, float]]) -> str:
    """What bounds the mixed step, in the measured figures only."""
    plain, mixed = ms["plain"], ms["mixed"]
    lines = [
        f"What bounds it: the mixed step costs {mixed / plain:.2f}x plain LoRA ({mixed - plain:+.1f} ms a "
        f"step; plain LoRA is {plain / ms['base']:.2f}x base only)."
    ]
    alone = [m for m in METHODS if m in ms]
    if alone:
        extra = {m: ms[m] - plain for m in alone}
        top = max(alone, key=lambda m: extra[m])
        each = ", ".join(f"{LABELS[m].removesuffix(' alone')} {ms[m] / plain:.2f}x" for m in alone)
        total = sum(extra.values())
        lines.append(
            f"Each method alone on all {BATCH} rows, against plain LoRA: {each}. The costliest is "
            f"{LABELS[top].removesuffix(' alone')} ({extra[top]:+.1f} ms a step alone); the four alone "
            f"extras add to {total:+.1f} ms against the mixed step's {mixed - plain:+.1f} ms."
        )
        if "dora" in ms:
            lines.append(
                f"DoRA's rows add per targeted projection a gathered magnitude vector and "
                f"(g - 1) * base + g * term beside the low-rank product: {extra['dora']:+.1f} ms alone."
            )
        if "ia3" in ms:
            lines.append(
                f"(IA)3 has no low-rank product but gathers one vector per row and scales the input or "
                f"output of each targeted projection: {extra['ia3']:+.1f} ms alone against plain LoRA."
            )
        if "prompt" in ms:
            lines.append(
                f"Prompt tuning's decode rows are base rows (its {VIRTUAL_TOKENS} virtual tokens are "
                f"prefill positions): alone it is {ms['prompt'] / ms['base']:.2f}x base only."
            )
    if "saved" in ms and heads:
        any_head = next(iter(heads.values()))
        vocab, hidden = int(any_head["vocab"]), int(any_head["hidden"])
        line = (
            f"modules_to_save alone is {ms['saved'] / plain:.2f}x plain LoRA. Its lm_head copies "
            f"({vocab} x {hidden}, one per adapter) run over the vocabulary for its rows, timed alone:"
        )
        parts = []
        for key, what in (("saved", "alone"), ("mixed", "in the mixed step")):
            if key in heads:
                h = heads[key]
                parts.append(
                    f" {what}, {int(h['saved_copies'])} copies take the lm_head from {h['base_ms']:.1f} ms "
                    f"(base lm_head, {BATCH} rows) to {h['case_ms']:.1f} ms "
                    f"({h['case_ms'] - h['base_ms']:+.1f} ms; the whole step is {ms[key] - plain:+.1f} ms "
                    "over plain LoRA)"
                )
        line += ";".join(parts) + "."
        if "saved" in heads:
            outside = ms["saved"] - plain - (heads["saved"]["case_ms"] - heads["saved"]["base_ms"])
            if outside > 0:
                line += (
                    f" The other {outside:+.1f} ms of modules_to_save alone is outside lm_head, where its "
                    "norm copies run (not timed apart)."
                )
        lines.append(line)
    return " ".join(lines)


if __name__ == "__main__":
    main()

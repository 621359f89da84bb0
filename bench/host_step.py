"""The host's share of a graphed decode step: everything the GPU waits on between two replays.

With CUDA graphs the device runs a decode step as one replay, and the host's work for the step
(schedule, adapter slots, step inputs, the graph's input copies, sampling's bookkeeping, appending
tokens, detokenizing, stop checks) runs before and after it, serially: the step's one sync (the
sampled tokens) sits between them. So `batch / host time` is a ceiling on decode tokens/s whatever
the GPU; the hot-path issue's 20k tok/s at batch 64 leaves 3.2 ms for host and replay together.

This runs the engine exactly as the GPU's default configuration does (Flex attention's block
tables, SGMV routing into the graphs' static buffers, `--cuda-graphs` buckets), on the CPU, with
the replay replaced by fixed logits: the device's work is left out, the host's is all there. The
model has SmolLM2-135M's tokenizer, vocabulary and layer count with a tiny width (the host's work
does not depend on it); 16 random adapters; greedy requests that never stop; a KV cache with room
for every sequence's 2,048 tokens (Flex's per-step block arrays grow with it). The sampler's argmax
over the stub logits is device work on a GPU: it is timed alone over the same logits in the same
run and left out. Each part's time is given as its share of the host's step, from the same run.

Then the same engine serves: its loop in AsyncEngine's thread and each request's outputs read from
its stream by a consumer on an asyncio loop thread, as the HTTP layer reads them (without HTTP).
`x served` is the engine thread's time per step there over the bare step's, same run: the
delivery, and the GIL the two threads share.

    .venv/bin/python -m bench.host_step [--batches 16,64,256] [--steps 100] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import workload
from bench.report import save, table
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.model.loader import BaseModel, load_base

ADAPTERS = 16
STUB_VOCAB = 4096  # the stub's logits pick among ordinary tokens of the real vocabulary


def tiny_checkpoint(root: Path) -> Path:
    """The default model's config, tokenizer and chat template, 64 wide: a forward that costs
    nothing beside the host's work, with every host-side structure at its real size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    real, _ = workload.model_path()
    config = AutoConfig.from_pretrained(real)
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    path = root / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for f in real.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


class Parts:
    """Wall time spent in named methods of the engine's parts, wrapped on the instances."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, owner: Any, method: str, name: str) -> Callable[..., Any]:
        """Time `owner.method` (an instance's method or a module's function); returns the original."""
        inner: Callable[..., Any] = getattr(owner, method)
        self.spent[name] = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - t

        setattr(owner, method, timed)
        return inner

    def reset(self) -> None:
        for name in self.spent:
            self.spent[name] = 0.0


def graphed_engine(
    base: BaseModel, registry: Any, loaded: list[Any], batch: int
) -> tuple[LLMEngine, list[torch.Tensor]]:
    """An engine in the GPU's default configuration whose replay returns one of the fixed logits
    (returned beside it), and whose prompts' forward returns zeros."""
    config = EngineConfig(
        max_loras=ADAPTERS,
        max_cpu_loras=32,
        max_lora_rank=workload.RANK,
        max_num_seqs=batch,
        max_model_len=2048,
        kv_cache_tokens=batch * 2048,
        attention_backend="flex",
        cuda_graphs=True,
    )
    eng = LLMEngine(base, registry, config)
    for record, weights in loaded:
        eng.cache.put(record.version, weights)
    graphs = eng.runner.graphs
    assert graphs is not None
    graphs.capture = True  # the GPU's path: static buffers refilled in place every step
    g = torch.Generator().manual_seed(batch)
    stubs = [torch.randn(batch, STUB_VOCAB, generator=g) for _ in range(7)]
    count = [0]

    def replay(*args: Any) -> torch.Tensor:  # what the graph's replay returns, without the device
        count[0] += 1
        return stubs[count[0] % len(stubs)]

    eng.runner.forward_static = replay  # type: ignore[method-assign,assignment]
    hidden = base.model.config.hidden_size

    def prefill(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(input_ids.shape[-1], hidden)  # the prompts' forward, not timed either

    eng.runner._hidden = prefill  # type: ignore[method-assign]
    return eng, stubs


def requests(eng: LLMEngine, records: list[Any], batch: int, prefix: str) -> list[Sequence]:
    """`batch` greedy chat requests that never stop, over the adapters in turn."""
    ids = workload.chat_ids(eng.base, batch)
    params = SamplingParams(max_tokens=1_000_000, temperature=0.0, ignore_eos=True)
    return [Sequence(f"{prefix}{i}", ids[i], params, adapter=records[i % ADAPTERS]) for i in range(batch)]


def decoding(eng: LLMEngine, batch: int) -> bool:
    """Whether `batch` sequences run and every one is past its prompt."""
    running = eng.scheduler.running
    return len(running) >= batch and all(s.num_uncomputed <= 1 for s in running)


def measure(
    eng: LLMEngine,
    stubs: list[torch.Tensor],
    records: list[Any],
    steps: int,
    rounds: int,
    profile: bool = False,
) -> dict[str, Any]:
    """Host ms per step (the sampler's argmax over the stub logits left out: on a GPU it is device
    work, and on this CPU it is timed alone, over the same logits, in the same run)."""
    batch = len(stubs[0])
    for seq in requests(eng, records, batch, "r"):
        eng.add_request(seq)
    while not decoding(eng, batch):
        eng.step()  # prefill (eager)
    parts = Parts()
    parts.wrap(eng.scheduler, "schedule", "schedule")
    parts.wrap(eng.slots, "activate", "adapter slots")
    parts.wrap(eng.runner.inputs, "build", "step inputs")
    assert eng.runner.graphs is not None
    parts.wrap(eng.runner.graphs, "run", "graph inputs")
    import server.engine.engine as engine_module

    sample = parts.wrap(engine_module, "sample", "sample")  # the engine's own name for it
    spent = parts.spent
    per_round: list[float] = []
    argmax: list[float] = []
    shares: dict[str, list[float]] = {name: [] for name in (*spent, "outputs")}
    try:
        for _ in range(10):
            eng.step()
        for _ in range(rounds):
            parts.reset()
            t = time.perf_counter()
            for _ in range(steps):
                outputs = eng.step()
                assert len(outputs) == batch
            total = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(steps):
                stubs[i % len(stubs)].argmax(dim=-1).tolist()
            device = time.perf_counter() - t
            per_round.append((total - device) / steps)
            argmax.append(device / steps)
            host = total - device
            for name, s in spent.items():
                shares[name].append((s - device if name == "sample" else s) / host)
            shares["outputs"].append(1.0 - (sum(spent.values()) - device) / host)
    finally:
        engine_module.sample = sample
    assert eng.runner.graphs.steps > 0
    if profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            for _ in range(steps):
                eng.step()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    host_ms = statistics.median(per_round) * 1e3
    return {
        "host_ms_per_step": host_ms,
        "stub_argmax_ms_left_out": statistics.median(argmax) * 1e3,
        "ceiling_tok_s": batch / host_ms * 1e3,
        "shares": {name: statistics.median(v) for name, v in shares.items()},
    }


def served(eng: LLMEngine, records: list[Any], batch: int, steps: int, rounds: int) -> list[float]:
    """Seconds per step of the engine thread when the engine runs in AsyncEngine's loop and each
    output goes to its request's stream, read by a consumer on an asyncio loop thread: the serving
    path's side of the host work (delivery, and the GIL shared with the loop), without HTTP."""
    for rid in list(eng.seqs):
        eng.abort(rid)
    front = AsyncEngine(eng, max_queue=batch)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="consumers", daemon=True).start()
    received = [0]

    async def consume(seq: Sequence) -> None:
        async for out in front.generate(seq):
            received[0] += len(out.token_ids)

    stamps: list[float] = []
    inner = front._step

    def stamped() -> list[Any]:
        stamps.append(time.perf_counter())
        return inner()

    front._step = stamped  # type: ignore[method-assign]
    front.start()
    for seq in requests(eng, records, batch, "s"):
        asyncio.run_coroutine_threadsafe(consume(seq), loop)
    try:
        while not decoding(eng, batch):
            time.sleep(0.01)
        first = len(stamps) + 10
        while len(stamps) < first + steps * rounds + 1:
            time.sleep(0.01)
            assert front.alive, front.error
    finally:
        front.shutdown()
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
    assert received[0] >= batch * steps * rounds
    return [(stamps[first + (r + 1) * steps] - stamps[first + r * steps]) / steps for r in range(rounds)]


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--steps", type=int, default=100, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions per batch")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the host's work is one Python thread
    with tempfile.TemporaryDirectory(prefix="host_step_") as tmp:
        path = tiny_checkpoint(Path(tmp))
        base = load_base(path, "tiny", quantization="none", max_loras=ADAPTERS, max_lora_rank=workload.RANK)
        registry, records, weights, _ = workload.register(base, ADAPTERS)
        loaded = list(zip(records, weights, strict=True))
        results: dict[str, Any] = {}
        for batch in (int(b) for b in args.batches.split(",")):
            eng, stubs = graphed_engine(base, registry, loaded, batch)
            r = measure(eng, stubs, records, args.steps, args.rounds, args.profile)
            per_step = served(eng, records, batch, args.steps, args.rounds)
            r["served_ms_per_step"] = statistics.median(per_step) * 1e3 - r["stub_argmax_ms_left_out"]
            r["served_over_step"] = r["served_ms_per_step"] / r["host_ms_per_step"]
            results[str(batch)] = r
            del eng
    names = list(next(iter(results.values()))["shares"])
    rows = []
    for size, r in results.items():
        rows.append(
            [size, f"{r['host_ms_per_step']:.2f}", f"{r['ceiling_tok_s']:.0f}", r["served_over_step"]]
            + [f"{100 * r['shares'][n]:.0f}%" for n in names]
        )
    text = table(
        f"host work per graphed decode step, {ADAPTERS} adapters, replay stubbed "
        f"(median of {args.rounds} rounds of {args.steps} steps)",
        ["batch", "host ms", "ceiling tok/s", "x served", *names],
        rows,
    )
    save("host_step", {"adapters": ADAPTERS, "batches": results, "table": text})


if __name__ == "__main__":
    main()

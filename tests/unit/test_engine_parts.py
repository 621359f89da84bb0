"""Fast unit tests of the engine's parts: LoRA layer, slot table, scheduler, sampler,
detokenizer and request validation. No model, no download."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.detokenizer import Detokenizer
from server.engine.sampler import sample
from server.engine.scheduler import Scheduler, SchedulerOutput
from server.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from server.errors import RequestError
from server.lora.adapter import AdapterWeights, ConfigReport, ModuleLoRA
from server.lora.layer import LoRAContext, LoRALinear
from server.lora.ops import LoRABatch
from server.lora.slots import SlotTable

CPU = torch.device("cpu")

# -------------------------------------------------------------------------------------------- layer


def _layer(num_slots: int = 2, rank: int = 4, seed: int = 0) -> tuple[LoRALinear, LoRAContext]:
    torch.manual_seed(seed)
    ctx = LoRAContext()
    return LoRALinear(nn.Linear(32, 48), num_slots, rank, ctx, torch.float32), ctx


def _module(rank: int, d_in: int, d_out: int, scale: float, seed: int) -> ModuleLoRA:
    g = torch.Generator().manual_seed(seed)
    return ModuleLoRA(
        A=torch.randn(rank, d_in, generator=g), B=torch.randn(d_out, rank, generator=g), scale=scale
    )


@pytest.mark.parametrize("t", [5, 16, 20])
def test_layer_without_adapter_equals_base(t: int) -> None:
    layer, ctx = _layer()
    x = torch.randn(1, t, 32)
    with torch.no_grad():
        base = layer.base(x)
        ctx.batch = None
        y_none = layer(x)
        layer.set_slot(1, _module(3, 32, 48, 2.0, seed=1))
        ctx.batch = LoRABatch.build([0] * t, [], CPU)
        y_zero = layer(x)
    assert y_none.shape == (1, t, 48)
    assert torch.equal(y_none, y_zero)
    assert torch.equal(y_none, base)  # the context's default base matmul is plain F.linear


def test_layer_applies_slot_and_clears() -> None:
    layer, ctx = _layer()
    mod = _module(3, 32, 48, 0.75, seed=2)
    layer.set_slot(1, mod)
    assert layer.loaded == {1}
    assert layer.lora_rank[1] == 3
    x = torch.randn(1, 6, 32)
    # rows 0,1 decode (slot 1, slot 0); rows 2..5 a prefill segment on slot 1
    ctx.batch = LoRABatch.build([1, 0], [(2, 6, 1)], CPU)
    with torch.no_grad():
        y = layer(x)
        base = layer.base(x)
    delta = mod.scale * (x[0] @ mod.A.T @ mod.B.T)  # [T, out]
    on = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    expected = base[0] + delta * on.unsqueeze(1)
    assert torch.allclose(y[0], expected, atol=1e-5)
    assert torch.allclose(y[0, 1], base[0, 1], atol=1e-6)
    assert not torch.allclose(y[0, 0], base[0, 0], atol=1e-3)

    layer.set_slot(1, None)
    assert layer.loaded == set()
    assert layer.lora_rank[1] == 0
    assert torch.count_nonzero(layer.lora_A[1]) == 0
    assert torch.count_nonzero(layer.lora_B[1]) == 0
    with torch.no_grad():
        y2 = layer(x)
    assert torch.allclose(y2, base, atol=1e-6)


# --------------------------------------------------------------------------------------- slot table


def _weights(seed: int, targets: tuple[str, ...] = ("q",)) -> AdapterWeights:
    mods = {name: _module(2, 32, 48, 1.0, seed=seed * 10 + i) for i, name in enumerate(targets)}
    return AdapterWeights(modules=mods, report=ConfigReport())


def _table(num_slots: int) -> tuple[SlotTable, dict[str, LoRALinear]]:
    ctx = LoRAContext()
    layers = {
        "q": LoRALinear(nn.Linear(32, 48), num_slots, 4, ctx, torch.float32),
        "v": LoRALinear(nn.Linear(32, 48), num_slots, 4, ctx, torch.float32),
    }
    return SlotTable(layers, num_slots), layers


def test_slots_lru_eviction_order() -> None:
    table, layers = _table(2)
    wa, wb, wc = _weights(1), _weights(2), _weights(3, ("q", "v"))
    assert table.activate({"a": wa}) == {"a": 1}
    assert table.activate({"b": wb}) == {"b": 2}
    assert table.activate({"a": wa}) == {"a": 1}  # touch a: b is now least recently used
    assert table.loads == 2
    assert table.activate({"c": wc}) == {"c": 2}  # evicts b
    assert set(table.slot_of) == {"a", "c"}
    assert table.evictions == 1
    assert torch.equal(layers["q"].lora_A[2, :2], wc.modules["q"].A)
    assert torch.equal(layers["v"].lora_B[2, :2], wc.modules["v"].B.T)
    assert table.activate({"b": wb}) == {"b": 1}  # now a is the oldest
    assert set(table.slot_of) == {"b", "c"}
    assert 1 not in layers["v"].loaded  # b does not target v: slot cleared there
    assert torch.count_nonzero(layers["v"].lora_A[1]) == 0


def test_slots_needed_adapter_never_evicted() -> None:
    table, _ = _table(2)
    wa, wb, wc = _weights(1), _weights(2), _weights(3)
    table.activate({"a": wa})
    table.activate({"b": wb})  # a is least recently used
    got = table.activate({"c": wc, "a": wa})
    assert got == {"c": 2, "a": 1}
    assert set(table.slot_of) == {"a", "c"}


def test_slots_lowest_free_first_and_drop() -> None:
    table, layers = _table(3)
    table.activate({"a": _weights(1)})
    table.activate({"b": _weights(2)})
    table.activate({"c": _weights(3)})
    table.drop("b")
    assert "b" not in table.slot_of
    assert 2 not in layers["q"].loaded
    assert torch.count_nonzero(layers["q"].lora_A[2]) == 0
    table.drop("a")
    table.drop("missing")  # no-op
    assert table.activate({"d": _weights(4)}) == {"d": 1}
    assert table.activate({"e": _weights(5)}) == {"e": 2}
    assert table.evictions == 0


def test_host_tier_keeps_adapters_within_its_bytes() -> None:
    """The CPU LRU is bounded by bytes as well as by count: an adapter with large modules_to_save
    copies pushes out the least recently used ones, and a single one above the bound still stays."""
    from server.lora.cache import AdapterCache

    def sized(seed: int, floats: int) -> AdapterWeights:
        return replace(_weights(seed), saved={"m": {"weight": torch.zeros(floats)}})

    small, big = _weights(1), sized(2, 1000)
    cache = AdapterCache(8, lambda r: small, max_bytes=small.nbytes * 3)
    for key in ("a", "b", "c"):
        cache.put(key, small)
    assert all(k in cache for k in "abc")
    cache.put("d", small)  # 4 small ones do not fit 3 small ones' bytes
    assert "a" not in cache and all(k in cache for k in "bcd")
    cache.put("big", big)  # alone above the bound: kept, everything older goes
    assert "big" in cache and not any(k in cache for k in "bcd")
    cache.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_host_tier_keeps_factors_in_the_slot_dtype(dtype: torch.dtype) -> None:
    """Under --lora-dtype bfloat16/float16 the CPU tier casts an adapter's factors once as it loads
    it: half the host bytes (and half the transfer to a GPU), and slots filled with exactly the bits
    that the copy's own cast from fp32 gives. Scales stay fp32."""
    from server.lora.cache import AdapterCache
    from server.lora.registry import AdapterRecord

    fp32 = _weights(1, ("q", "v"))
    record = AdapterRecord(
        name="a",
        version="v1",
        path=Path(),
        rank=2,
        target_modules=("q", "v"),
        size_bytes=0,
        report=ConfigReport(),
    )
    cache = AdapterCache(8, lambda r: fp32, factor_dtype=dtype)
    cache.get(record)
    cache.wait_for_loads(10.0)
    held = cache.get(record)
    cache.close()
    assert held is not None
    assert {t.dtype for m in held.modules.values() for t in (m.A, m.B)} == {dtype}
    assert held.nbytes * 2 == fp32.nbytes
    assert fp32.with_factor_dtype(torch.float32) is fp32
    tables: dict[bool, tuple[torch.Tensor, ...]] = {}
    for weights in (fp32, held):
        ctx = LoRAContext()
        layer = LoRALinear(nn.Linear(32, 48), 2, 4, ctx, dtype)
        layer.set_slot(1, weights.modules["q"])
        tables[weights is held] = (layer.lora_A.clone(), layer.lora_B.clone(), layer.lora_scale.clone())
    for a, b in zip(tables[True], tables[False], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_pinned_factors_are_laid_out_as_the_slots_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page-locked copy of an adapter holds A and B.T contiguous, the slot's own layout, so each
    copy to the GPU is one asynchronous DMA (a strided host source goes through a pageable
    temporary, which blocks). pin_memory needs a GPU, so here it is a plain copy."""
    from server.lora.cache import AdapterCache

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    weights = _weights(1, ("q", "v"))
    cache = AdapterCache(8, lambda r: weights, pin=True)
    cache.put("v1", weights)  # the benchmarks' preloads: pinned as a load would be
    held = cache._lru["v1"]
    cache.close()
    for name, m in held.modules.items():
        assert m.A.is_contiguous() and m.B.T.is_contiguous()
        assert torch.equal(m.A, weights.modules[name].A) and torch.equal(m.B, weights.modules[name].B)


def test_host_tier_loader_keeps_its_one_thread_to_itself(several_threads: int) -> None:
    """The loader runs torch on one thread of its own, and only there: a thread started after it
    (the engine's, an HTTP worker) keeps the process's thread count (see server/torch_threads.py),
    here two or more (with one, a lost count would not show)."""
    import threading

    from server.lora.cache import AdapterCache
    from server.lora.registry import AdapterRecord

    threads = several_threads
    inside: list[int] = []

    def load(record: AdapterRecord) -> AdapterWeights:
        inside.append(torch.get_num_threads())
        return _weights(1)

    record = AdapterRecord(
        name="a",
        version="v1",
        path=Path(),
        rank=2,
        target_modules=("q",),
        size_bytes=0,
        report=ConfigReport(),
    )
    cache = AdapterCache(8, load)
    cache.get(record)
    cache.wait_for_loads(10.0)
    cache.close()
    seen: list[int] = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert inside == [1]
    assert seen == [threads] and torch.get_num_threads() == threads


def test_two_slot_tables_on_one_base_take_turns() -> None:
    """Engines built on one base model share its slot buffers: a SlotTable that finds another one
    wrote since its last step writes its own adapters again instead of reading the other's."""
    ctx = LoRAContext()
    layers = {"q": LoRALinear(nn.Linear(32, 48), 2, 4, ctx, torch.float32)}
    first, second = SlotTable(layers, 2, ctx), SlotTable(layers, 2, ctx)
    wa, wb = _weights(1), _weights(2)
    assert first.activate({"a": wa}) == {"a": 1}
    assert second.activate({"b": wb}) == {"b": 1}  # overwrites slot 1
    assert first.activate({"a": wa}) == {"a": 1}
    assert torch.equal(layers["q"].lora_A[1, :2], wa.modules["q"].A) and first.loads == 2
    assert first.activate({"a": wa}) == {"a": 1} and first.loads == 2  # its own again: no rewrite


def test_saved_copies_live_beside_their_slot_within_the_budget() -> None:
    """modules_to_save copies go to the device with their adapter and leave with it; an adapter that
    needs room evicts the least recently used one with copies, never one of its own step."""
    ctx = LoRAContext()
    layers = {"q": LoRALinear(nn.Linear(32, 48), 3, 4, ctx, torch.float32)}
    table = SlotTable(layers, 3, ctx, saved_budget=1000)

    def with_copy(seed: int) -> AdapterWeights:  # 150 floats: 600 bytes
        return replace(_weights(seed), saved={"model.norm": {"weight": torch.full((150,), float(seed))}})

    wa, wb, plain = with_copy(1), with_copy(2), _weights(3)
    assert wa.saved_nbytes == 600 and not wa.is_plain_lora
    table.activate({"a": wa, "p": plain})
    assert set(ctx.saved) == {1} and torch.equal(ctx.saved[1]["model.norm"]["weight"], torch.ones(150))
    assert ctx.extra_slots == {1}
    table.activate({"b": wb})  # 600 + 600 > 1000: a goes, plain LoRA p stays
    assert set(table.slot_of) == {"p", "b"} and set(ctx.saved) == {1} and table.evictions == 1
    assert torch.equal(ctx.saved[1]["model.norm"]["weight"], torch.full((150,), 2.0))
    table.drop("b")
    assert ctx.saved == {} and ctx.extra_slots == set()
    with pytest.raises(RuntimeError, match="exceed the budget of 1000 bytes"):
        table.activate({"a": wa, "b": wb})


# ---------------------------------------------------------------------------------------- scheduler


class FakeGate:
    def __init__(self) -> None:
        self.held: list[Sequence] = []
        self.saved: dict[str, int] = {}  # adapter key -> bytes of its modules_to_save copies

    def ready(self, seq: Sequence) -> bool:
        return True

    def saved_bytes(self, seq: Sequence) -> int:
        return self.saved.get(seq.adapter_key or "", 0)

    def acquire(self, seq: Sequence) -> None:
        self.held.append(seq)

    def release(self, seq: Sequence) -> None:
        self.held.remove(seq)


_counter = iter(range(10**9))


def _seq(prompt_len: int, adapter: str | None = None, max_tokens: int = 1000) -> Sequence:
    rec = types.SimpleNamespace(name=adapter, version=adapter) if adapter else None
    return Sequence(
        request_id=f"r{next(_counter)}",
        prompt_token_ids=list(range(1, prompt_len + 1)),
        params=SamplingParams(max_tokens=max_tokens),
        adapter=rec,  # type: ignore[arg-type]
    )


def _sched(num_blocks: int = 1000, block_size: int = 4, **kw: int) -> tuple[Scheduler, BlockManager]:
    cfg = EngineConfig(**{"max_cpu_loras": 32, "max_model_len": 64, "kv_cache_tokens": 4096, **kw})  # type: ignore[arg-type]
    blocks = BlockManager(num_blocks, block_size)
    return Scheduler(cfg, blocks, FakeGate()), blocks


def _advance(out: SchedulerOutput) -> None:
    """What the engine does after a step: K/V computed, a token sampled when the prompt is done."""
    for seq in out.decode:
        seq.num_computed_tokens += 1
        seq.output_token_ids.append(7)
    for seq, n in out.prefill:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(7)


def test_scheduler_max_num_seqs() -> None:
    sched, _ = _sched(max_num_seqs=3)
    seqs = [_seq(4) for _ in range(5)]
    for s in seqs:
        sched.add(s)
    for _ in range(4):
        out = sched.schedule()
        assert len(out.decode) + len(out.prefill) <= 3
        assert len(sched.running) <= 3
        _advance(out)
    assert sched.running == seqs[:3]
    assert list(sched.waiting) == seqs[3:]


def test_scheduler_token_budget_chunks_long_prompt() -> None:
    sched, _ = _sched(max_num_batched_tokens=8)
    long, short = _seq(20), _seq(3)
    sched.add(long)
    sched.add(short)
    chunks: list[int] = []
    for _ in range(6):
        out = sched.schedule()
        assert out.num_tokens <= 8
        for seq, n in out.prefill:
            if seq is long:
                chunks.append(n)
        _advance(out)
    assert chunks == [8, 8, 4]
    assert long.num_computed_tokens >= 20
    assert long.output_token_ids  # it reached decode
    assert short.status is SequenceStatus.RUNNING
    assert short.output_token_ids  # admitted once budget remained


def test_scheduler_max_loras_first_step() -> None:
    sched, _ = _sched(max_loras=1, max_cpu_loras=1)
    a1, a2, b = _seq(4, "a"), _seq(4, "a"), _seq(4, "b")
    for s in (a1, b, a2):
        sched.add(s)
    out = sched.schedule()
    scheduled = [s for s, _ in out.prefill] + out.decode
    assert scheduled == [a1, a2]
    assert list(sched.waiting) == [b]
    assert b.blocked_steps == 1


def test_scheduler_keeps_a_steps_saved_copies_within_their_budget() -> None:
    """Two adapters whose modules_to_save copies do not fit the device budget together never share
    a step; the later one waits, as for max_loras, and runs once the first is done."""
    sched, _ = _sched(max_saved_module_bytes=1000)
    gate: Any = sched.gate
    gate.saved = {"a": 600, "b": 600, "c": 300}
    a, b, c = _seq(4, "a", max_tokens=1), _seq(4, "b", max_tokens=1), _seq(4, "c", max_tokens=1)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert [s for s, _ in out.prefill] == [a, c]
    assert list(sched.waiting) == [b] and b.blocked_steps == 1
    sched.finish(a, FinishReason.LENGTH)
    sched.finish(c, FinishReason.LENGTH)
    assert [s for s, _ in sched.schedule().prefill] == [b]


class LoadingGate(FakeGate):
    """Adapters become ready only once loaded; records which loads the scheduler started."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[str] = []
        self.loaded: set[str] = set()

    def ready(self, seq: Sequence) -> bool:
        key = seq.adapter_key
        if key is None or key in self.loaded:
            return True
        if key not in self.started:
            self.started.append(key)
        return False


def test_scheduler_fetches_only_the_next_adapters() -> None:
    sched, _ = _sched(max_loras=2, max_cpu_loras=5)  # prefetch window: min(2, 5 - 2) = 2
    gate = LoadingGate()
    sched.gate = gate
    seqs = [_seq(4, f"a{i % 6}") for i in range(12)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.empty
    assert gate.started == ["a0", "a1"]  # not all six: they would not fit the CPU cache together
    gate.loaded |= {"a0", "a1"}
    out = sched.schedule()
    assert [s.adapter_key for s, _ in out.prefill] == ["a0", "a1", "a0", "a1"]
    # the adapter budget is full now, yet the next two load so they are ready when a slot frees
    assert gate.started == ["a0", "a1", "a2", "a3"]


def test_scheduler_no_adapter_starvation() -> None:
    wait = 3
    sched, _ = _sched(max_loras=1, max_cpu_loras=1, max_adapter_wait_steps=wait)
    a0 = _seq(4, "a")
    sched.add(a0)
    _advance(sched.schedule())
    b = _seq(4, "b")
    sched.add(b)
    admitted_per_step: list[int] = []
    new_as: list[Sequence] = []
    for _ in range(wait + 4):
        a = _seq(4, "a")
        new_as.append(a)
        sched.add(a)
        before = len(sched.running)
        out = sched.schedule()
        admitted_per_step.append(len(sched.running) - before)
        assert b not in sched.running
        _advance(out)
    # new "a" requests overtake b for `wait` steps, then admission stops
    assert admitted_per_step[:wait] == [1] * wait
    assert admitted_per_step[wait:] == [0] * (len(admitted_per_step) - wait)
    assert b.blocked_steps > wait
    for seq in list(sched.running):
        sched.finish(seq, FinishReason.STOP)
    out = sched.schedule()
    assert [s for s, _ in out.prefill] == [b]
    assert sched.running == [b]
    assert all(s.adapter_key == "a" for s in sched.waiting)


def test_scheduler_preempts_under_kv_pressure() -> None:
    sched, blocks = _sched(num_blocks=4, block_size=4)
    s1, s2 = _seq(8), _seq(8)
    sched.add(s1)
    sched.add(s2)
    out = sched.schedule()
    assert [s for s, _ in out.prefill] == [s1, s2]
    assert blocks.num_free == 0
    _advance(out)  # each now needs a third block for its next token
    out = sched.schedule()
    assert out.preempted == [s2]
    assert out.decode == [s1]
    assert sched.running == [s1]
    assert sched.waiting[0] is s2
    assert s2.status is SequenceStatus.WAITING
    assert s2.block_table == []
    assert s2.num_computed_tokens == 0
    assert len(s1.block_table) == 3
    assert blocks.num_free == 1
    assert s2 not in sched.gate.held  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ sampler


def _sseq(**kw: object) -> Sequence:
    return Sequence(request_id="x", prompt_token_ids=[1], params=SamplingParams(**kw))  # type: ignore[arg-type]


def test_sampler_greedy_topk1_topp_tiny() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    seqs = [
        _sseq(temperature=0.0),
        _sseq(temperature=1.0, top_k=1),
        _sseq(temperature=1.0, top_p=1e-6),
        _sseq(temperature=2.0, top_k=1, top_p=0.5),
    ]
    assert [c.token for c in sample(logits, seqs)] == logits.argmax(dim=-1).tolist()


def test_sampler_seeded_reproducible_and_batch_independent() -> None:
    steps = 12
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(30, generator=g) for _ in range(steps)]

    def run(extra: int) -> list[int]:
        seq = _sseq(temperature=1.0, seed=7)
        others = [_sseq(temperature=1.0) for _ in range(extra)]
        got: list[int] = []
        for row in rows:
            noise = torch.randn(extra, 30)
            logits = torch.cat([noise, row.unsqueeze(0)])
            got.append(sample(logits, [*others, seq])[-1].token)
        return got

    first, second, crowded = run(0), run(0), run(3)
    assert first == second
    assert first == crowded
    assert len(set(first)) > 1  # actually sampling, not argmax


# -------------------------------------------------------------------------------------- detokenizer


class FakeTokenizer:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in token_ids)


def test_detokenizer_incremental() -> None:
    det = Detokenizer(FakeTokenizer(["he", "llo", " wor", "ld"]), ())
    out = [det.update([0, 1, 2, 3][: i + 1], final=False) for i in range(4)]
    assert out == [("he", False), ("llo", False), (" wor", False), ("ld", False)]
    assert det.update([0, 1, 2, 3], final=True) == ("", False)
    assert det.text == "hello world"


def test_detokenizer_stop_split_across_steps() -> None:
    det = Detokenizer(FakeTokenizer(["ab", "ST", "OP", "cd"]), ("STOP",))
    assert det.update([0], final=False) == ("ab", False)
    assert det.update([0, 1], final=False) == ("", False)  # "ST" could start the stop string
    assert det.update([0, 1, 2], final=False) == ("", True)
    assert det.text == "ab"


def test_detokenizer_stop_strings_wait_for_min_tokens() -> None:
    det = Detokenizer(FakeTokenizer(["ab", "STOP", "cd", "STOP"]), ("STOP",))
    assert det.update([0], final=False, check_stop=False) == ("ab", False)
    assert det.update([0, 1], final=False, check_stop=False) == ("STOP", False)  # before min_tokens
    assert det.update([0, 1, 2], final=False) == ("cd", False)  # an earlier match is not found again
    assert det.update([0, 1, 2, 3], final=False) == ("", True)


def test_detokenizer_false_stop_prefix_released() -> None:
    det = Detokenizer(FakeTokenizer(["ab", "ST", "cd"]), ("STOP",))
    assert det.update([0, 1], final=False) == ("ab", False)
    assert det.update([0, 1, 2], final=False) == ("STcd", False)


def test_detokenizer_holds_replacement_char_until_final() -> None:
    det = Detokenizer(FakeTokenizer(["a", "\ufffd", "b"]), ())
    assert det.update([0], final=False) == ("a", False)
    assert det.update([0, 1], final=False) == ("", False)  # half a character: wait for the next token
    assert det.update([0, 1, 2], final=False) == ("\ufffdb", False)
    det = Detokenizer(FakeTokenizer(["a", "\ufffd"]), ())
    assert det.update([0, 1], final=False) == ("", False)
    assert det.update([0, 1], final=True) == ("a\ufffd", False)


class CountingTokenizer(FakeTokenizer):
    def __init__(self, pieces: list[str]) -> None:
        super().__init__(pieces)
        self.decoded_tokens = 0

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_tokens += len(token_ids)
        return super().decode(token_ids, skip_special_tokens)


def test_detokenizer_keeps_a_tokenizers_clean_up() -> None:
    """The Rust decoder is called directly only where transformers would add nothing to it."""
    from server.engine.detokenizer import text_decoder

    class Backend:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "raw"

    class Wrapped:
        backend_tokenizer = Backend()

        def __init__(self, clean_up: bool) -> None:
            self.clean_up_tokenization_spaces = clean_up

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "cleaned"

    assert text_decoder(Wrapped(clean_up=True))([1]) == "cleaned"
    assert text_decoder(Wrapped(clean_up=False))([1]) == "raw"
    assert text_decoder(FakeTokenizer(["a"]))([0]) == "a"


def test_detokenizer_work_per_step_is_constant() -> None:
    tok = CountingTokenizer([f"w{i} " for i in range(10)])
    det = Detokenizer(tok, ("STOP",))
    ids: list[int] = []
    emitted = ""
    for i in range(400):
        ids.append(i % 10)
        emitted += det.update(ids, final=False)[0]
    emitted += det.update(ids, final=True)[0]
    assert emitted == tok.decode(ids)
    assert tok.decoded_tokens < 10 * len(ids)  # re-decoding the whole output would be ~80,000


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_params_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == field


def test_sampling_params_accepts_bounds() -> None:
    p = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=("x",))
    assert p.greedy
    assert not SamplingParams(temperature=2.0).greedy


def test_sampler_draws_follow_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    seq = _sseq(temperature=1.0, top_k=3, seed=5)  # top-k keeps 0.5/0.25/0.15, renormalized
    counts = torch.zeros(5)
    for _ in range(3000):
        counts[sample(logits, [seq])[0].token] += 1
    freq = counts / counts.sum()
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0, 0.0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.03), freq

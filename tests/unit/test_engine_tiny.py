"""The whole engine on tiny random checkpoints of every supported architecture: HF generate and
PEFT as oracles, mixed batches, adapter loading off the engine thread, sampling, stop strings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.errors import ModelNotFoundError
from server.lora.adapter import AdapterWeights
from server.lora.backends import cpp_lora
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.model.base_gemm import BaseGemm
from server.model.loader import BaseModel, disable_cpu_weight_packing, load_base
from server.model.source import resolve_model
from tests.drive import greedy
from tests.peft_factory import make_adapter

TILED = BaseGemm.TILED  # the exactness tests run in the batch-invariant mode
PROMPTS = ["hello there", "the quick brown fox", "1 2 3 4"]
LORAS: dict[str, dict[str, Any]] = {
    "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all": {"r": 8, "lora_alpha": 8, "target_modules": "all-linear", "rank_pattern": {"down_proj": 2}},
}


def engine_for(base: BaseModel, registry: AdapterRegistry, **overrides: Any) -> LLMEngine:
    cfg: dict[str, Any] = {
        "max_loras": 2,
        "max_lora_rank": 8,
        "max_model_len": 256,
        "kv_cache_tokens": 2048,
        "block_size": 4,
        **overrides,
    }
    return LLMEngine(base, registry, EngineConfig(**cfg))


def prompt_ids(base: BaseModel, text: str) -> list[int]:
    return base.chat_ids([{"role": "user", "content": text}])


Job = tuple[str, AdapterRecord | None, list[int]]


def tiny_nf4_setup(
    path: Path, adapter_dir: Path, texts: list[str], **load: Any
) -> tuple[BaseModel, AdapterRegistry, list[Job]]:
    """The tiny Llama in NF4 with the LORAS adapters (made by PEFT under adapter_dir once), and a job
    for the base and for each adapter on every text."""
    from transformers import AutoModelForCausalLM

    base = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=2, max_lora_rank=8, **load)
    registry = AdapterRegistry(base.linear_shapes, 8, factor_dtype=base.lora_dtype)
    for i, (name, cfg) in enumerate(LORAS.items()):
        if not (adapter_dir / name / "adapter_config.json").is_file():
            make_adapter(
                lambda: AutoModelForCausalLM.from_pretrained(path), adapter_dir / name, seed=i, **cfg
            )
        registry.add_dir(name, adapter_dir / name)
    jobs = [
        (f"{name}/{p}", registry.resolve(name) if name else None, prompt_ids(base, text))
        for name in (None, *LORAS)
        for p, text in enumerate(texts)
    ]
    return base, registry, jobs


def record_logits(engine: LLMEngine) -> dict[str, list[torch.Tensor]]:
    """Every logit row the engine samples from, per request, in order (filled as the engine runs)."""
    rows: dict[str, list[torch.Tensor]] = {}
    run = engine.runner.run

    def recording(step: Any, slot_of: dict[str, int]) -> Any:
        sampling, logits = run(step, slot_of)
        for seq, row in zip(sampling, logits, strict=True):
            rows.setdefault(seq.request_id, []).append(row.clone())
        return sampling, logits

    engine.runner.run = recording  # type: ignore[method-assign]
    return rows


def hf_model(path: Path, quantization: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    disable_cpu_weight_packing(model)
    return model


@pytest.mark.parametrize(
    ("arch", "quantization"), [("llama", "none"), ("qwen2", "none"), ("mistral", "none"), ("llama", "nf4")]
)
def test_engine_matches_hf_and_peft(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, arch: str, quantization: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(arch)
    base = load_base(
        path, arch, quantization=quantization, device="cpu", max_loras=2, max_lora_rank=8, base_gemm=TILED
    )
    registry = AdapterRegistry(base.linear_shapes, 8)
    for i, (name, cfg) in enumerate(LORAS.items()):
        make_adapter(
            lambda: AutoModelForCausalLM.from_pretrained(path), tmp_path / name, seed=i, b_scale=0.5, **cfg
        )
        registry.add_dir(name, tmp_path / name)
    jobs = [
        (f"{name}/{p}", registry.resolve(name) if name else None, prompt_ids(base, text))
        for name in (None, *LORAS)
        for p, text in enumerate(PROMPTS)
    ]
    solo: dict[str, list[int]] = {}
    for job in jobs:
        solo.update(greedy(engine_for(base, registry), [job], max_tokens=16))
    mixed = greedy(engine_for(base, registry, max_num_seqs=16), jobs, max_tokens=16)
    assert mixed == solo

    ref = hf_model(path, quantization)
    peft = PeftModel.from_pretrained(ref, tmp_path / "qv", adapter_name="qv")
    peft.load_adapter(tmp_path / "all", adapter_name="all")
    for rid, _, ids in jobs:
        name = rid.split("/")[0]
        x = torch.tensor([ids])
        with torch.no_grad():
            if name == "None":
                with peft.disable_adapter():
                    out = peft.generate(
                        x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False
                    )
            else:
                peft.set_adapter(name)
                out = peft.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
        assert solo[rid] == out[0, len(ids) :].tolist(), f"{arch}/{quantization} {rid}: engine != reference"
    assert any(solo[f"qv/{p}"] != solo[f"None/{p}"] for p in range(len(PROMPTS)))


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("block scales decoded again")


def test_block_scales_decoded_once_give_bitsandbytes_weights(
    tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plain and tiled modes keep each NF4 weight's double-quantized block scales decoded; the
    weights they dequantize are bitsandbytes' own, bit for bit. The bnb mode keeps none."""
    import bitsandbytes.functional as bnbf

    from server.model.base_gemm import DECODED_STATE, dequantized_weight

    path = tiny_checkpoint("llama")
    for mode in (BaseGemm.PLAIN, TILED, BaseGemm.BNB):
        base = load_base(path, "tiny", quantization="nf4", device="cpu", max_loras=1, base_gemm=mode)
        for name, layer in base.lora_layers.items():
            weight: Any = layer.base.weight  # a bitsandbytes Params4bit
            assert weight.quant_state.nested, f"{name}: not double-quantized"
            kept = getattr(layer.base, DECODED_STATE, None)
            assert (kept is None) == (mode is BaseGemm.BNB), f"{mode}: {name}"
            if kept is not None:
                assert not kept.nested and kept.absmax.dtype == torch.float32
                want = bnbf.dequantize_4bit(weight.data, weight.quant_state)
                with monkeypatch.context() as patched:  # the kept scales are used: none decoded now
                    patched.setattr(bnbf, "dequantize_blockwise", _refuse)
                    assert torch.equal(dequantized_weight(layer.base, torch.float32), want), name


@pytest.fixture(scope="module")
def llama(tiny_checkpoint: Callable[[str], Path]) -> BaseModel:
    return load_base(
        tiny_checkpoint("llama"), "tiny", quantization="none", device="cpu", max_loras=2, max_lora_rank=8
    )


def test_decoding_continues_while_an_adapter_loads(
    llama: BaseModel, tmp_path: Path, tiny_checkpoint: Callable[[str], Path]
) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("llama")
    make_adapter(lambda: AutoModelForCausalLM.from_pretrained(path), tmp_path / "slow", seed=3, **LORAS["qv"])
    release = threading.Event()

    class SlowRegistry(AdapterRegistry):
        def load(self, record: AdapterRecord) -> AdapterWeights:
            assert release.wait(timeout=60)
            return super().load(record)

    registry = SlowRegistry(llama.linear_shapes, 8)
    record, _ = registry.add_dir("slow", tmp_path / "slow")
    engine = engine_for(llama, registry)
    eos = llama.eos_token_ids
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine.add_request(Sequence("base", prompt_ids(llama, PROMPTS[0]), params, eos_token_ids=eos))
    engine.add_request(
        Sequence("tuned", prompt_ids(llama, PROMPTS[1]), params, adapter=record, eos_token_ids=eos)
    )
    for _ in range(6):
        engine.step()
    assert sum("base" in r.decoded for r in engine.records) >= 5, (
        "the base request stalled behind a disk load"
    )
    assert all("tuned" not in r.decoded for r in engine.records)
    release.set()
    engine.cache.wait_for_loads(timeout=60)
    done: set[str] = set()
    while engine.has_work():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == {"base", "tuned"}


def test_a_step_puts_back_the_engines_torch_threads(
    llama: BaseModel, caplog: pytest.LogCaptureFixture
) -> None:
    """Something in the process resetting the engine thread's torch thread count (as the adapter
    loader once did, through torch's process default) is undone at the next step, with a warning:
    the lost thread cost every later step 1.5x. Only meaningful with 2+ threads."""
    registry = AdapterRegistry(llama.linear_shapes, 8)
    engine = engine_for(llama, registry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level("WARNING", logger="server.torch_threads"):
            greedy(engine, [("r", None, prompt_ids(llama, "hello"))], max_tokens=2)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    if threads > 1:
        assert engine.threads.resets == 1
        assert f"changed from {threads} to 1" in caplog.text


def test_seeded_sampling_is_independent_of_the_batch(llama: BaseModel) -> None:
    registry = AdapterRegistry(llama.linear_shapes, 8)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)

    def run(extra: int) -> list[int]:
        engine = engine_for(llama, registry)
        eos = llama.eos_token_ids
        engine.add_request(Sequence("seeded", prompt_ids(llama, PROMPTS[0]), params, eos_token_ids=eos))
        for i in range(extra):
            other = SamplingParams(max_tokens=16, temperature=1.0)
            engine.add_request(Sequence(f"o{i}", prompt_ids(llama, PROMPTS[i % 3]), other, eos_token_ids=eos))
        tokens: list[int] = []
        while engine.has_work():
            tokens += [t for o in engine.step() if o.request_id == "seeded" for t in o.token_ids]
        return tokens

    alone = run(0)
    assert alone == run(3)
    assert len(set(alone)) > 1


def test_transformers_builds_no_mask_in_a_step(llama: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our attention takes its masks from the step's metadata, so transformers' mask builders must
    return at once: had they run, each forward would search position_ids for packed sequences, and
    that search's `.all()` is a host sync per step on a GPU (issue 9: one sync per step at most)."""
    import transformers.masking_utils as masking

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers built a mask for a step")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", refuse)
    monkeypatch.setattr(masking, "sdpa_mask", refuse)
    registry = AdapterRegistry(llama.linear_shapes, 8)
    jobs = [(f"r{i}", None, prompt_ids(llama, p)) for i, p in enumerate(PROMPTS)]
    out = greedy(engine_for(llama, registry), jobs, max_tokens=4)
    assert all(out.values())


def test_stop_string_ends_the_request(llama: BaseModel) -> None:
    registry = AdapterRegistry(llama.linear_shapes, 8)
    full = greedy(engine_for(llama, registry), [("r", None, prompt_ids(llama, PROMPTS[2]))], max_tokens=20)[
        "r"
    ]
    text = llama.tokenizer.decode(full, skip_special_tokens=True)
    stop = text[5:7]
    engine = engine_for(llama, registry)
    seq = Sequence(
        "r",
        prompt_ids(llama, PROMPTS[2]),
        SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)),
        eos_token_ids=llama.eos_token_ids,
    )
    engine.add_request(seq)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    emitted = "".join(o.text for o in outs)
    assert emitted == text[: text.index(stop)]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_missing_model_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        resolve_model(str(tmp_path / "nowhere"), tmp_path)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not supported"):
        load_base(tmp_path, "gpt2", quantization="none", device="cpu")


@pytest.mark.parametrize("mode", ["own thread", "caller's thread"])
def test_async_engine_serves_from_either_thread(llama: BaseModel, mode: str) -> None:
    """`start()` runs the loop on its own thread; `hold()` + `run()` on the caller's (what
    `loraplex serve` does on the main thread). Both stream a request and stop on shutdown()."""
    engine = engine_for(llama, AdapterRegistry(llama.linear_shapes, 8))
    front = AsyncEngine(engine, max_queue=8)
    runner: threading.Thread | None = None
    if mode == "own thread":
        front.start()
    else:
        front.hold()
        runner = threading.Thread(target=front.run)  # stands in for the main thread
        runner.start()
        front.start()  # the app's lifespan still calls it: a no-op now
    assert front.alive
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def collect() -> list[int]:
        seq = Sequence("r", prompt_ids(llama, PROMPTS[0]), params, eos_token_ids=llama.eos_token_ids)
        return [t async for out in front.generate(seq) for t in out.token_ids]

    assert len(asyncio.run(collect())) == 6
    assert [t.name for t in threading.enumerate()].count("engine") == (1 if mode == "own thread" else 0)
    front.shutdown()
    if runner is not None:
        runner.join(timeout=30)
        assert not runner.is_alive()
    assert not front.alive


@pytest.mark.invariance
@pytest.mark.parametrize("lora", ["torch", "cpp"])
def test_mixed_batch_logits_are_bitwise_solo(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, lora: str
) -> None:
    """Every logit row of every request is the same bits alone and inside a mixed batch: two
    adapters and the base, a tighter token budget (chunks wait for room), decode rows beside
    prefill chunks of other sequences. With either CPU LoRA backend."""
    if lora == "cpp" and not cpp_lora.load():
        pytest.skip(f"cpp backend not built: {cpp_lora.error()}")
    texts = [*PROMPTS, "a longer prompt that takes several chunks of the token budget to prefill"]
    base, registry, jobs = tiny_nf4_setup(
        tiny_checkpoint("llama"), tmp_path, texts, base_gemm=TILED, lora_backend=lora
    )
    solo: dict[str, list[torch.Tensor]] = {}
    for job in jobs:
        engine = engine_for(base, registry, max_num_batched_tokens=64, prefill_chunk_tokens=16)
        rows = record_logits(engine)
        greedy(engine, [job], max_tokens=8)
        solo.update(rows)
    engine = engine_for(base, registry, max_num_seqs=16, max_num_batched_tokens=40, prefill_chunk_tokens=16)
    mixed = record_logits(engine)
    greedy(engine, jobs, max_tokens=8)
    assert any(len(r.prefilled) > 1 and r.decoded for r in engine.records), "no step mixed decode and prefill"
    assert max(len(r.adapters) for r in engine.records) == 2
    for rid, alone in solo.items():
        assert len(mixed[rid]) == len(alone) == 8
        for i, (a, b) in enumerate(zip(alone, mixed[rid], strict=True)):
            assert torch.equal(a, b), f"{rid}: logits of token {i} differ alone vs in the mixed batch"


def test_cpp_backend_gives_the_torch_logits(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cpp LoRA kernel in the whole engine against the torch backend: the same greedy tokens for
    base and adapter requests in one mixed batch, every logit row within rounding, and the adapters
    really moving their rows. In the batch-invariant mode: adapters load in the background, so two
    runs may batch the requests differently, and in the default mode the base matmul's rounding
    follows the batch (seen on an AVX2 EPYC, one run in three: a run batched otherwise moved a
    token's logits past 1e-5, where the two backends alone differ by 6e-6)."""
    if not cpp_lora.load():
        pytest.skip(f"cpp backend not built: {cpp_lora.error()}")
    calls = []
    kernel = cpp_lora.lora_add_

    def counted(*args: Any) -> None:
        calls.append(1)
        kernel(*args)

    monkeypatch.setattr(cpp_lora, "lora_add_", counted)
    path = tiny_checkpoint("llama")
    logits, tokens = {}, {}
    for lora in ("torch", "cpp"):
        base, registry, jobs = tiny_nf4_setup(path, tmp_path, PROMPTS, base_gemm=TILED, lora_backend=lora)
        engine = engine_for(base, registry, max_num_seqs=8, prefill_chunk_tokens=8)
        logits[lora] = record_logits(engine)
        tokens[lora] = greedy(engine, jobs, max_tokens=8)
        assert max(len(r.adapters) for r in engine.records) == 2, f"{lora}: the adapters never shared a step"
    assert calls, "the cpp backend never ran its kernel"
    assert tokens["cpp"] == tokens["torch"]
    assert tokens["torch"]["qv/0"] != tokens["torch"]["None/0"]
    for rid, rows in logits["torch"].items():
        for i, (a, b) in enumerate(zip(rows, logits["cpp"][rid], strict=True)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{rid} token {i}"


@pytest.mark.slow
def test_triton_and_flex_backends_give_the_torch_tokens(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """The whole engine with the Triton SGMV kernels (interpreted on CPU) and the Flex attention
    backend (eager), alone and together, against the torch backends: the same greedy tokens for
    base and adapter requests in one mixed batch, prompts prefilled in several chunks."""
    pytest.importorskip("triton")
    path = tiny_checkpoint("llama")
    results = {}
    for lora, attention in (("torch", "torch"), ("triton", "torch"), ("torch", "flex"), ("triton", "flex")):
        base, registry, jobs = tiny_nf4_setup(path, tmp_path, PROMPTS[:2], lora_backend=lora)
        engine = engine_for(
            base, registry, max_num_seqs=8, prefill_chunk_tokens=8, attention_backend=attention
        )
        results[(lora, attention)] = greedy(engine, jobs, max_tokens=8)
    reference = results[("torch", "torch")]
    for combo, tokens in results.items():
        assert tokens == reference, f"lora={combo[0]} attention={combo[1]} differs from the torch backends"
    assert reference["qv/0"] != reference["None/0"]


def test_decode_buckets() -> None:
    from server.engine.graphs import bucket_for, decode_buckets

    assert decode_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_buckets(3) == (1, 2, 3)
    assert decode_buckets(1) == (1,)
    assert [bucket_for(n, decode_buckets(32)) for n in (1, 3, 5, 9, 17, 32, 33)] == [
        1,
        4,
        8,
        16,
        24,
        32,
        None,
    ]


@pytest.mark.parametrize(
    ("lora", "attention", "static"),
    [
        ("torch", "torch", False),
        pytest.param("triton", "flex", False, marks=pytest.mark.slow),
        pytest.param("triton", "flex", True, marks=pytest.mark.slow),
    ],
)
def test_padded_decode_steps_give_the_unpadded_logits(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, lora: str, attention: str, static: bool
) -> None:
    """Decode steps padded to batch-size buckets (what a CUDA graph replays: padding rows on slot 0,
    no KV blocks, K/V into the scratch slot) give every real row the same logits, bitwise, as the
    unpadded step, in the batch-invariant mode. `static`: through the persistent tensors a captured
    graph reads, refilled in place each step (DecodeGraphs._make/_fill), run without the graph.
    That path attends every decode row in one Flex call, as compiled Flex does on a GPU; eager Flex
    on a CPU folds such a call into one matmul whose rounding follows the row count, so there the
    logits are compared within fp32 rounding and the greedy tokens exactly."""
    if lora == "triton":
        pytest.importorskip("triton")
    # 9 sequences: decode steps padded to the bucket of 16
    base, registry, jobs = tiny_nf4_setup(
        tiny_checkpoint("llama"), tmp_path, PROMPTS, base_gemm=TILED, lora_backend=lora
    )
    logits: dict[bool, dict[str, list[torch.Tensor]]] = {}
    tokens: dict[bool, dict[str, list[int]]] = {}
    for padded in (False, True):
        engine = engine_for(base, registry, max_num_seqs=16, attention_backend=attention, cuda_graphs=padded)
        if padded and static:
            assert engine.runner.graphs is not None
            engine.runner.graphs.capture = True
        logits[padded] = record_logits(engine)
        tokens[padded] = greedy(engine, jobs, max_tokens=6)
        if padded:
            assert engine.runner.graphs is not None and engine.runner.graphs.steps >= 5
            assert bool(engine.runner.graphs.static) == static
    assert tokens[True] == tokens[False]
    for rid, unpadded in logits[False].items():
        for i, (a, b) in enumerate(zip(unpadded, logits[True][rid], strict=True)):
            if static:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{rid} token {i}: static step differs"
            else:
                assert torch.equal(a, b), f"{rid} token {i}: padded decode step differs"


@pytest.mark.parametrize(
    ("lora", "dtype"),
    [
        ("torch", torch.bfloat16),
        ("cpp", torch.bfloat16),
        ("cpp", torch.float16),
        pytest.param("triton", torch.float16, marks=pytest.mark.slow),
    ],
)
def test_half_precision_factors(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, lora: str, dtype: torch.dtype
) -> None:
    """--lora-dtype bfloat16/float16 (the fast mode): the slots hold the factors in that dtype and
    the term is computed in it, what PEFT computes with autocast_adapter_dtype=False. With the torch
    backend every logit row is the same bits solo and mixed (invariance by construction holds in
    this mode too; the Triton kernels' is checked on a GPU, bench/gpu_check.py, as Triton's CPU
    interpreter computes its dots with numpy's BLAS); with either backend the rows differ from the
    fp32 factors' and are nearer PEFT's own with its adapter in that dtype."""
    from peft import PeftModel

    if lora == "triton":
        pytest.importorskip("triton")
    if lora == "cpp" and not cpp_lora.load():
        pytest.skip(f"cpp backend not built: {cpp_lora.error()}")
    path = tiny_checkpoint("llama")
    logits: dict[torch.dtype, dict[str, list[torch.Tensor]]] = {}
    tokens: dict[torch.dtype, dict[str, list[int]]] = {}
    jobs: list[Job] = []
    for factors in (dtype, torch.float32):
        base, registry, jobs = tiny_nf4_setup(
            path, tmp_path, PROMPTS[:2], base_gemm=TILED, lora_backend=lora, lora_dtype=factors
        )
        layer = next(iter(base.lora_layers.values()))
        assert (layer.lora_A.dtype, layer.lora_B.dtype) == (factors, factors)
        assert layer.lora_scale.dtype == layer.dora_scale.dtype == torch.float32
        engine = engine_for(base, registry, max_num_seqs=8)
        logits[factors] = record_logits(engine)
        tokens[factors] = greedy(engine, jobs, max_tokens=6)
        held = engine.cache.get(registry.resolve("all"))  # the CPU tier keeps them in the slots' dtype
        assert held is not None and {m.A.dtype for m in held.modules.values()} == {factors}
        if factors == dtype and lora != "triton":  # (the interpreter's dot is not row invariant on AVX2)
            for job in jobs:
                engine = engine_for(base, registry)
                solo = record_logits(engine)
                greedy(engine, [job], max_tokens=6)
                for i, (a, b) in enumerate(zip(solo[job[0]], logits[dtype][job[0]], strict=True)):
                    assert torch.equal(a, b), f"{job[0]} token {i}: {dtype} factors differ solo vs mixed"

    peft = PeftModel.from_pretrained(hf_model(path, "nf4"), tmp_path / "qv", adapter_name="qv")
    peft.load_adapter(tmp_path / "all", adapter_name="all")
    for name, p in peft.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    for rid, _, ids in jobs:
        adapter = rid.split("/")[0]
        if adapter == "None":
            continue
        peft.set_adapter(adapter)
        x = torch.tensor([ids + tokens[dtype][rid][:-1]])
        with torch.no_grad():
            out = peft(x).logits[0, len(ids) - 1 :]
            with peft.disable_adapter():
                plain = peft(x).logits[0, len(ids) - 1 :]
        ours = torch.stack(logits[dtype][rid])
        to_peft = (ours - out).abs().max().item()
        effect = (out - plain).abs().max().item()  # how far the adapter moves the logits
        # rows up to the first token where the two runs part (after it their inputs differ)
        runs = zip(*(tokens[d][rid] for d in (dtype, torch.float32)), strict=True)
        same = next((i for i, (a, b) in enumerate(runs) if a != b), 6)
        fp32 = torch.stack(logits[torch.float32][rid][: same + 1])
        to_fp32 = (ours[: same + 1] - fp32).abs().max().item()
        assert to_fp32 > 0, f"{rid}: {dtype} factors give the fp32 factors' logits"
        assert to_peft < 0.01 * effect, f"{rid}: {to_peft} from PEFT in {dtype}; the adapter moves {effect}"
        if dtype == torch.bfloat16:  # (fp16's rounding is too fine for this to stand out)
            assert to_peft < to_fp32 / 2, f"{rid}: {to_peft} from PEFT in bf16, {to_fp32} from fp32 factors"

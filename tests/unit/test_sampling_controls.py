"""Penalties, biases, min-p, min_tokens, stop token ids and logprobs: against transformers' own
logits processors and forward pass, per row in mixed batches, and neutral rows left untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import LLMEngine, RequestOutput
from server.engine.sampler import process_, sample
from server.engine.sequence import SamplingParams, Sequence
from server.lora.registry import AdapterRegistry
from server.model.base_gemm import BaseGemm
from server.model.loader import BaseModel, load_base

V = 64


def _seq(
    prompt: list[int], out: list[int] | None = None, eos: frozenset[int] = frozenset({2}), **kw: Any
) -> Sequence:
    s = Sequence("x", list(prompt), SamplingParams(**kw), eos_token_ids=eos)
    s.output_token_ids = list(out or [])
    return s


def test_repetition_penalty_is_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    row = torch.randn(V, generator=g) * 3
    seq = _seq([5, 6, 7, 5], [9, 6, 30], repetition_penalty=1.7, temperature=0.0)
    got = row.clone()
    process_(got, seq)
    ids = torch.tensor([seq.prompt_token_ids + seq.output_token_ids])
    want = RepetitionPenaltyLogitsProcessor(1.7)(ids, row.clone().unsqueeze(0))[0]
    assert torch.equal(got, want)
    assert not torch.equal(got, row)


def test_presence_and_frequency_are_openai_formula() -> None:
    row = torch.zeros(V)
    seq = _seq([11, 12], [3, 3, 3, 4], presence_penalty=0.5, frequency_penalty=0.25, temperature=0.0)
    process_(row, seq)
    assert row[3].item() == pytest.approx(-(3 * 0.25 + 0.5))
    assert row[4].item() == pytest.approx(-(0.25 + 0.5))
    assert row[11].item() == 0.0  # prompt tokens are not penalised (OpenAI: generated tokens only)
    assert int((row != 0).sum()) == 2


def test_logit_bias_min_tokens_and_stop_ids_in_one_row() -> None:
    row = torch.zeros(V)
    seq = _seq(
        [1], [7], logit_bias=((9, 5.0), (10, -100.0)), min_tokens=3, stop_token_ids=(20,), temperature=0.0
    )
    process_(row, seq)
    assert row[9] == 5.0 and row[10] == -100.0
    assert row[2] == float("-inf") and row[20] == float("-inf")  # EOS and stop ids held back
    seq.output_token_ids += [8, 8]  # min_tokens reached: nothing held back any more
    row = torch.zeros(V)
    process_(row, seq)
    assert row[2] == 0.0 and row[20] == 0.0


def test_neutral_rows_untouched_in_a_mixed_batch() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=g)
    before = logits.clone()
    seqs = [
        _seq([1, 2], temperature=0.0),
        _seq([1, 2], [4, 4], temperature=0.0, repetition_penalty=2.0, logit_bias=((0, 100.0),)),
        _seq([3], temperature=0.0, logprobs=3),
        _seq([3], temperature=0.0),
    ]
    got = sample(logits, seqs)
    assert got[1].token == 0  # the bias wins
    assert [got[i].token for i in (0, 2, 3)] == before[[0, 2, 3]].argmax(-1).tolist()
    lp = torch.log_softmax(before[2], -1)
    assert got[2].logprob is not None and got[0].logprob is None
    assert got[2].logprob.logprob == pytest.approx(lp.max().item())
    assert [t for t, _ in got[2].logprob.top] == lp.topk(3).indices.tolist()


def test_min_p_drops_unlikely_tokens() -> None:
    row = torch.tensor([5.0, 4.9, 0.0, -1.0] + [-10.0] * (V - 4))
    seen = set()
    for seed in range(40):
        seen.add(sample(row.unsqueeze(0), [_seq([1], temperature=1.0, min_p=0.5, seed=seed)])[0].token)
    assert seen == {0, 1}


def test_logprobs_processed_vs_raw() -> None:
    row = torch.randn(1, V, generator=torch.Generator().manual_seed(2))
    kw: dict[str, Any] = {"temperature": 0.5, "seed": 3, "logprobs": 2, "top_k": 5}
    processed = sample(row.clone(), [_seq([1], **kw)])[0]
    raw = sample(row.clone(), [_seq([1], raw_logprobs=True, **kw)])[0]
    assert processed.token == raw.token
    assert raw.logprob is not None and processed.logprob is not None
    assert raw.logprob.logprob == pytest.approx(torch.log_softmax(row[0], -1)[raw.token].item(), abs=1e-6)
    # processed: of the distribution drawn from (temperature 0.5, top-5 only), so more peaked
    assert processed.logprob.logprob > raw.logprob.logprob
    assert sum(torch.tensor([v for _, v in processed.logprob.top]).exp()) <= 1.0 + 1e-6


# ------------------------------------------------------------------------------ engine, tiny model


@pytest.fixture(scope="module")
def tiled(tiny_checkpoint: Callable[[str], Path]) -> BaseModel:
    return load_base(
        tiny_checkpoint("llama"),
        "tiny",
        quantization="none",
        device="cpu",
        max_loras=2,
        max_lora_rank=8,
        base_gemm=BaseGemm.TILED,
    )


def _engine(base: BaseModel, **kw: Any) -> LLMEngine:
    cfg: dict[str, Any] = {"max_loras": 2, "max_lora_rank": 8, "max_model_len": 256, "kv_cache_tokens": 2048}
    cfg["block_size"] = 4
    return LLMEngine(base, AdapterRegistry(base.linear_shapes, 8), EngineConfig(**{**cfg, **kw}))


def _run(
    engine: LLMEngine, jobs: dict[str, tuple[list[int], SamplingParams]]
) -> dict[str, list[RequestOutput]]:
    for rid, (ids, params) in jobs.items():
        engine.add_request(Sequence(rid, ids, params, eos_token_ids=engine.base.eos_token_ids))
    outs: dict[str, list[RequestOutput]] = {rid: [] for rid in jobs}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    return outs


def _tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def _ids(base: BaseModel, text: str) -> list[int]:
    return base.chat_ids([{"role": "user", "content": text}])


def test_penalised_greedy_equals_transformers_generate(
    tiled: BaseModel, tiny_checkpoint: Callable[[str], Path]
) -> None:
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class OpenAIPenalties(LogitsProcessor):
        """OpenAI's formula over the generated tokens only."""

        def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
            self.n, self.presence, self.frequency = prompt_len, presence, frequency

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            for b in range(scores.shape[0]):
                counts = torch.bincount(input_ids[b, self.n :], minlength=scores.shape[1]).to(scores.dtype)
                scores[b] -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
            return scores

    ids = _ids(tiled, "the quick brown fox")
    rep = SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.8, ignore_eos=True)
    pen = SamplingParams(
        max_tokens=20, temperature=0.0, presence_penalty=1.5, frequency_penalty=1.0, ignore_eos=True
    )
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = _run(_engine(tiled, max_num_seqs=8), {"rep": (ids, rep), "pen": (ids, pen), "plain": (ids, plain)})
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kw: dict[str, Any] = {"attention_mask": torch.ones_like(x), "max_new_tokens": 20, "do_sample": False}
    with torch.no_grad():
        want_rep = ref.generate(x, repetition_penalty=1.8, **kw)[0, len(ids) :].tolist()
        procs = LogitsProcessorList([OpenAIPenalties(len(ids), 1.5, 1.0)])
        want_pen = ref.generate(x, logits_processor=procs, **kw)[0, len(ids) :].tolist()
        want_plain = ref.generate(x, **kw)[0, len(ids) :].tolist()
    assert _tokens(outs["rep"]) == want_rep
    assert _tokens(outs["pen"]) == want_pen
    assert _tokens(outs["plain"]) == want_plain
    assert want_rep != want_plain or want_pen != want_plain  # the penalties did something


@pytest.mark.invariance
def test_controls_do_not_change_neighbours(tiled: BaseModel) -> None:
    texts = ["hello there", "1 2 3 4", "abc abc abc"]
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    jobs = {f"p{i}": (_ids(tiled, t), plain) for i, t in enumerate(texts)}
    alone = _run(_engine(tiled, max_num_seqs=8), jobs)
    loud = SamplingParams(
        max_tokens=12,
        temperature=0.7,
        seed=1,
        repetition_penalty=1.5,
        frequency_penalty=2.0,
        logit_bias=((5, 3.0),),
        min_p=0.1,
        min_tokens=4,
        logprobs=5,
        prompt_logprobs=5,
    )
    crowded = _run(_engine(tiled, max_num_seqs=8), {**jobs, "loud": (_ids(tiled, "zzz"), loud)})
    for rid in jobs:
        assert _tokens(crowded[rid]) == _tokens(alone[rid]), rid
    assert len(_tokens(crowded["loud"])) == 12
    assert all(len(o.logprobs) == 1 for o in crowded["loud"])


@pytest.mark.parametrize("chunk", [5, 512])
def test_prompt_logprobs_equal_the_models_log_softmax(
    tiled: BaseModel, tiny_checkpoint: Callable[[str], Path], chunk: int
) -> None:
    from transformers import AutoModelForCausalLM

    ids = _ids(tiled, "the quick brown fox jumps")
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, prompt_logprobs=2)
    outs = _run(
        _engine(tiled, prefill_chunk_tokens=chunk, max_num_batched_tokens=chunk + 16), {"e": (ids, params)}
    )
    got = outs["e"][0].prompt_logprobs
    assert got is not None and len(got) == len(ids) and got[0] is None
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        entry = got[i]
        assert entry is not None and entry.token == ids[i]
        assert entry.logprob == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == want[i - 1].topk(2).indices.tolist()
    first = outs["e"][0].logprobs[0]  # the sampled token's, from the last prompt position
    assert first.logprob == pytest.approx(want[-1].max().item(), abs=1e-4)


def test_min_tokens_ignore_eos_and_stop_token_ids(tiled: BaseModel) -> None:
    ids = _ids(tiled, "hello there")
    eos = next(iter(tiled.eos_token_ids))
    # a bias that makes EOS the argmax everywhere: min_tokens alone decides the length
    params = SamplingParams(max_tokens=10, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=4)
    outs = _run(_engine(tiled), {"m": (ids, params)})
    toks = _tokens(outs["m"])
    assert len(toks) == 5 and toks[-1] == eos and eos not in toks[:-1]
    assert outs["m"][-1].finish_reason == "stop"
    plain = _tokens(
        _run(_engine(tiled), {"p": (ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))})[
            "p"
        ]
    )
    stop_at = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop_token_ids=(plain[2],))
    outs = _run(_engine(tiled), {"s": (ids, stop_at)})
    assert _tokens(outs["s"]) == plain[: plain.index(plain[2]) + 1]
    assert outs["s"][-1].finish_reason == "stop"

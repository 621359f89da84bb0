"""The engine on the real default model in NF4: mixed batches, PEFT as the oracle, eviction,
continuous batching. Greedy decoding throughout, so every comparison is exact token equality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.engine.sequence import SamplingParams, Sequence
from server.lora.registry import AdapterRegistry
from server.model.loader import BaseModel
from tests.drive import greedy
from tests.e2e.conftest import ADAPTERS, EngineFactory, nf4_reference

pytestmark = pytest.mark.e2e
NEW_TOKENS = 32
NAMES = [None, *ADAPTERS]  # None = the base model


@pytest.fixture(scope="module")
def solo(
    make_engine: EngineFactory, registry: AdapterRegistry, prompt_ids: list[list[int]]
) -> dict[str, list[int]]:
    """Every (adapter, prompt) pair run alone, each in a fresh engine."""
    results: dict[str, list[int]] = {}
    for name in NAMES:
        adapter = registry.resolve(name) if name else None
        for p, ids in enumerate(prompt_ids):
            rid = f"{name or 'base'}/{p}"
            results.update(greedy(make_engine(), [(rid, adapter, ids)], NEW_TOKENS))
    return results


def test_adapters_change_the_output(solo: dict[str, list[int]]) -> None:
    for name in ADAPTERS:
        differs = [solo[f"{name}/{p}"] != solo[f"base/{p}"] for p in range(3)]
        assert any(differs), f"adapter {name} produced the base model's tokens on every prompt"


def test_mixed_batch_equals_solo(
    make_engine: EngineFactory,
    registry: AdapterRegistry,
    prompt_ids: list[list[int]],
    solo: dict[str, list[int]],
) -> None:
    jobs = []
    for name in NAMES:
        adapter = registry.resolve(name) if name else None
        for p, ids in enumerate(prompt_ids):
            jobs.append((f"{name or 'base'}/{p}", adapter, ids))
    engine = make_engine()
    batched = greedy(engine, jobs, NEW_TOKENS)
    # all 15 requests and all 4 adapters really shared steps
    assert max(len(r.decoded) for r in engine.records) == len(jobs)
    assert max(len(r.adapters) for r in engine.records) == len(ADAPTERS)
    for rid in batched:
        assert batched[rid] == solo[rid], f"{rid} differs inside the mixed batch"


def test_peft_is_the_oracle(
    model_path: Path, adapter_dirs: dict[str, Path], prompt_ids: list[list[int]], solo: dict[str, list[int]]
) -> None:
    from peft import PeftModel

    ref = nf4_reference(model_path)
    names = list(ADAPTERS)
    peft_model = PeftModel.from_pretrained(ref, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
    peft_model.eval()
    for name in names:
        peft_model.set_adapter(name)
        for p, ids in enumerate(prompt_ids):
            x = torch.tensor([ids])
            with torch.no_grad():
                out = peft_model.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False
                )
            expected = out[0, len(ids) :].tolist()
            assert solo[f"{name}/{p}"] == expected, f"{name} on prompt {p}: engine != PEFT"
    assert len(names) >= 4


def test_eviction_in_rotation_matches_solo(
    make_engine: EngineFactory,
    registry: AdapterRegistry,
    prompt_ids: list[list[int]],
    solo: dict[str, list[int]],
) -> None:
    engine = make_engine(max_loras=2, max_cpu_loras=2)
    jobs = []
    for round_ in range(2):
        for name in ADAPTERS:
            p = round_ % len(prompt_ids)
            jobs.append((f"{name}/{p}#{round_}", registry.resolve(name), prompt_ids[p]))
    out = greedy(engine, jobs, NEW_TOKENS)
    assert engine.slots.evictions >= 2, "4 adapters through 2 slots must evict"
    assert all(len(r.adapters) <= 2 for r in engine.records)
    for rid, tokens in out.items():
        assert tokens == solo[rid.split("#")[0]], f"{rid} differs after eviction"


def test_late_request_joins_running_batch(
    make_engine: EngineFactory,
    registry: AdapterRegistry,
    prompt_ids: list[list[int]],
    solo: dict[str, list[int]],
) -> None:
    engine = make_engine()
    eos = engine.base.eos_token_ids
    greedy_params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.add_request(Sequence("early", list(prompt_ids[1]), greedy_params, eos_token_ids=eos))
    for _ in range(5):
        engine.step()
    adapter = registry.resolve("qv-r4")
    engine.add_request(
        Sequence("late", list(prompt_ids[0]), greedy_params, adapter=adapter, eos_token_ids=eos)
    )
    tokens: dict[str, list[int]] = {"early": [], "late": []}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id].extend(o.token_ids)
    steps = list(engine.records)
    late_prefill = next(r.step for r in steps if any(rid == "late" for rid, _ in r.prefilled))
    early_last = max(r.step for r in steps if "early" in r.decoded)
    assert late_prefill < early_last, "the late request waited for the running one to finish"
    # the late prefill ran in the same forward pass as an early decode
    assert any("early" in r.decoded and any(rid == "late" for rid, _ in r.prefilled) for r in steps)
    assert any({"early", "late"} <= set(r.decoded) for r in steps)
    solo_late = solo["qv-r4/0"]
    assert tokens["late"][: len(solo_late)] == solo_late


def test_abort_frees_its_place_within_one_step(
    make_engine: EngineFactory, prompt_ids: list[list[int]]
) -> None:
    engine = make_engine()
    free_before = engine.blocks.num_free
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(2):
        engine.add_request(
            Sequence(f"r{i}", list(prompt_ids[i]), params, eos_token_ids=engine.base.eos_token_ids)
        )
    for _ in range(3):
        engine.step()
    out = engine.abort("r0")
    assert out is not None and out.finished and out.finish_reason == "abort"
    engine.step()
    assert "r0" not in engine.records[-1].decoded and "r1" in engine.records[-1].decoded
    engine.abort("r1")
    assert engine.blocks.num_free == free_before
    assert not engine.has_work()


def _deltas(base: BaseModel, ids: list[int], window: bool = False) -> list[str]:
    """Each step's new text, one token at a time, the last step final; with `window`, through the
    plain window path instead of tokenizers' DecodeStream."""
    from server.engine.detokenizer import Detokenizer, Stream, Window, text_decoder

    det = Detokenizer(base.tokenizer, ())
    assert isinstance(det.source, Stream)  # SmolLM2's decode is its Rust decoder's alone
    if window:
        det.source = Window(text_decoder(base.tokenizer))
    grown: list[int] = []
    out = []
    for i, token in enumerate(ids):
        grown.append(token)
        out.append(det.update(grown, final=i == len(ids) - 1)[0])
    return out


def test_incremental_detokenizer_matches_full_decode(base: BaseModel) -> None:
    """SmolLM2's byte-level BPE: emoji and accents span several tokens, words carry leading spaces.
    The deltas, streamed one token at a time, add up to the whole decode, and each step's delta is
    the plain window path's."""
    tok = base.tokenizer
    text = "Café déjà vu 🐙🦑 naïve — «quoted» 東京 and 2½ cups.\n  Indented\tline 🎉"
    ids = tok.encode(text) * 3
    g = torch.Generator().manual_seed(0)
    ids += torch.randint(0, tok.vocab_size, (200,), generator=g).tolist()
    streamed = _deltas(base, ids)
    assert "".join(streamed) == tok.decode(ids, skip_special_tokens=True)
    assert streamed == _deltas(base, ids, window=True)


def test_decode_stream_equals_the_window_on_broken_bytes(base: BaseModel) -> None:
    """Random outputs mixing any token, the 256 single-byte tokens (lone halves of characters) and
    special tokens (skipped): DecodeStream releases the same text at the same step as the window,
    and all of it adds up to the whole decode, U+FFFD where bytes never formed a character."""
    tok = base.tokenizer
    g = torch.Generator().manual_seed(2)
    specials = torch.tensor(tok.all_special_ids)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        pools = [
            torch.randint(0, len(tok), (n,), generator=g),
            torch.randint(0, 256, (n,), generator=g),
            specials[torch.randint(0, len(specials), (n,), generator=g)],
        ]
        pick = torch.randint(0, 3, (n,), generator=g)
        ids = [int(pools[int(k)][i]) for i, k in enumerate(pick)]
        streamed = _deltas(base, ids)
        assert "".join(streamed) == tok.decode(ids, skip_special_tokens=True), ids
        assert streamed == _deltas(base, ids, window=True), ids


def test_decode_stream_releases_a_half_character_at_the_end(base: BaseModel) -> None:
    """An output that ends inside a character: nothing is released while it may still complete,
    and the last step releases it as the whole decode prints it."""
    tok = base.tokenizer
    octopus = tok.encode("🐙", add_special_tokens=False)
    assert len(octopus) > 1  # byte-level BPE splits the emoji
    ids = tok.encode("ok ", add_special_tokens=False) + octopus[:-1]
    streamed = _deltas(base, ids)
    assert streamed[-2] == ""  # held: the character is not complete
    assert streamed[-1].endswith("\ufffd")
    assert "".join(streamed) == tok.decode(ids, skip_special_tokens=True)


def test_decode_stream_failure_goes_on_by_window(base: BaseModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """tokenizers' DecodeStream can lose its prefix on some outputs (vLLM issue 17448). The sequence
    then goes on with the window path from the stream's last release, and loses no text; any other
    error is raised."""
    from server.engine import detokenizer

    real = detokenizer.DecodeStream

    class Failing:
        def __init__(self, skip_special_tokens: bool, error: str) -> None:
            self.inner, self.error, self.steps = real(skip_special_tokens=skip_special_tokens), error, 0

        def step(self, tokenizer: Any, token: int) -> Any:
            self.steps += 1
            if self.steps == 9:
                raise Exception(self.error)
            return self.inner.step(tokenizer, token)

    tok = base.tokenizer
    ids = tok.encode("Café déjà vu 🐙🦑 naïve, then some plain words to finish the line.")
    monkeypatch.setattr(
        detokenizer, "DecodeStream", lambda **kw: Failing(error=detokenizer.INVALID_PREFIX, **kw)
    )
    streamed = _deltas(base, ids)
    assert "".join(streamed) == tok.decode(ids, skip_special_tokens=True)
    monkeypatch.setattr(detokenizer, "DecodeStream", lambda **kw: Failing(error="something else", **kw))
    with pytest.raises(Exception, match="something else"):
        _deltas(base, ids)


def test_direct_rust_decoding_is_the_tokenizers_own(base: BaseModel) -> None:
    """The detokenizer calls SmolLM2's Rust decoder directly (its clean-up is off): the same text as
    transformers' decode for random windows, special tokens included (and skipped)."""
    from server.engine.detokenizer import text_decoder

    tok = base.tokenizer
    assert tok.clean_up_tokenization_spaces is False  # else text_decoder takes the slow path
    decode = text_decoder(tok)
    g = torch.Generator().manual_seed(1)
    specials = list(tok.all_special_ids)
    for n in range(1, 400):
        ids = torch.randint(0, len(tok), (1 + n % 7,), generator=g).tolist() + specials[: n % 3]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.invariance
def test_constrained_and_penalised_requests_leave_neighbours_alone(
    make_engine: EngineFactory,
    base: BaseModel,
    registry: AdapterRegistry,
    prompt_ids: list[list[int]],
    solo: dict[str, list[int]],
) -> None:
    """Grammar masks, penalties, biases and logprobs act on their own rows only: the greedy tokens
    of the plain requests beside them are the ones they get alone."""
    import json

    from server.engine.grammar import GrammarCompiler, GrammarSpec

    grammar = GrammarCompiler(base.tokenizer, base.model.config.vocab_size, eos_token_ids=base.eos_token_ids)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "ok": {"type": "boolean"}},
        "required": ["city", "ok"],
        "additionalProperties": False,
    }
    plain = [("base/0", None, prompt_ids[0]), ("qv-r4/1", registry.resolve("qv-r4"), prompt_ids[1])]
    engine = make_engine()
    eos = engine.base.eos_token_ids
    for rid, adapter, ids in plain:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        engine.add_request(Sequence(rid, list(ids), params, adapter=adapter, eos_token_ids=eos))
    shaped = Sequence(
        "json",
        list(prompt_ids[0]),
        SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=3),
        adapter=registry.resolve("patterns"),
        eos_token_ids=eos,
    )
    shaped.constraint = grammar.compile(GrammarSpec.for_schema(schema))
    loud = SamplingParams(
        max_tokens=NEW_TOKENS,
        temperature=0.0,
        repetition_penalty=1.4,
        presence_penalty=1.0,
        logit_bias=((42, 4.0),),
        min_tokens=8,
    )
    engine.add_request(shaped)
    engine.add_request(
        Sequence("loud", list(prompt_ids[2]), loud, adapter=registry.resolve("qv-r4"), eos_token_ids=eos)
    )
    tokens: dict[str, list[int]] = {"base/0": [], "qv-r4/1": [], "json": [], "loud": []}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id].extend(o.token_ids)
    assert any({"base/0", "json", "loud"} <= set(r.decoded) for r in engine.records)
    for rid, _, _ in plain:
        assert tokens[rid] == solo[rid], f"{rid} changed beside the constrained and penalised requests"
    text = base.tokenizer.decode(tokens["json"], skip_special_tokens=True)
    assert json.loads(text)["city"] in ("Paris", "Rome")
    assert tokens["loud"] != solo["qv-r4/2"]

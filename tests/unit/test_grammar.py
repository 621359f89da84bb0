"""Structured output on the real default tokenizer (SmolLM2): random logits forced through the grammar
mask always decode to valid output, EOS only at the end; the batched mask equals the per-row one."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from server.api.structured import (
    MAX_CHOICES,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_BYTES,
    ResponseFormat,
    StructuredOutputs,
    grammar_source,
)
from server.engine.grammar import Constraint, GrammarCompiler, GrammarSpec, apply_masks
from server.errors import ModelNotFoundError, RequestError

PAD = 64  # logits rows wider than the vocabulary, as models with a padded lm_head have
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
DEEP: dict[str, Any] = {"type": "integer"}
for _ in range(100):
    DEEP = {"type": "object", "properties": {"a": DEEP}, "required": ["a"]}


def grammar_spec(*args: Any, **kwargs: Any) -> GrammarSpec | None:
    source = grammar_source(*args, **kwargs)
    return source[1] if source else None


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from server.config import default_cache_dir
    from server.model.source import resolve_model

    try:
        path, _ = resolve_model(None, default_cache_dir())
    except ModelNotFoundError as e:
        pytest.skip(f"the default model is not installed: {e}")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, len(tokenizer) + PAD)


def schema_spec(schema: dict[str, Any]) -> GrammarSpec:
    return GrammarSpec.for_schema(schema)


def single_token_ids(tokenizer: Any, texts: list[str]) -> list[int]:
    return [ids[0] for ids in (tokenizer.encode(t) for t in texts) if len(ids) == 1]


def decode(
    tokenizer: Any, c: Constraint, seed: int, push: list[int] | None = None, max_steps: int = 300
) -> tuple[str, list[bool]]:
    """Greedy decoding of seeded random logits through mask_ -> argmax -> accept, up to EOS.
    `push` gets a bias growing with the step, so an unbounded grammar still ends (it only moves
    logits; the mask decides what is allowed). Returns the text and, per step, whether EOS was allowed."""
    gen = torch.Generator().manual_seed(seed)
    eos, ids, eos_allowed = tokenizer.eos_token_id, list[int](), list[bool]()
    for step in range(max_steps):
        row = torch.randn(c.vocab_size, generator=gen)
        if push:
            row[push] += 0.3 * step
        c.mask_(row)
        assert torch.isinf(row[len(tokenizer) :]).all(), "a padding id of the logits is allowed"
        eos_allowed.append(bool(torch.isfinite(row[eos])))
        token = int(row.argmax())
        c.accept(token)
        assert not c.failed, c.error
        if token == eos:
            assert c.done
            return tokenizer.decode(ids), eos_allowed
        ids.append(token)
    raise AssertionError(f"no EOS after {max_steps} steps: {tokenizer.decode(ids)!r}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_random_logits_give_valid_json(
    tokenizer: Any, compiler: GrammarCompiler, seed: int
) -> None:
    text, eos_allowed = decode(tokenizer, compiler.compile(schema_spec(SCHEMA)), seed)
    obj = json.loads(text)
    assert list(obj) == ["name", "age", "role", "tags"], text  # all required, in the schema's order
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert type(obj["age"]) is int and 0 <= obj["age"] <= 150
    assert obj["role"] in ("admin", "user", "guest")
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in obj["tags"])
    assert eos_allowed == [False] * (len(eos_allowed) - 1) + [True]  # the object closes only at the end


def test_json_object_gives_an_object(tokenizer: Any, compiler: GrammarCompiler) -> None:
    closers = [*single_token_ids(tokenizer, ['"', "}", '"}', "]", '"]', "}}"]), tokenizer.eos_token_id]
    for seed in range(3):
        text, eos_allowed = decode(tokenizer, compiler.compile(GrammarSpec("json_object", "")), seed, closers)
        assert isinstance(json.loads(text), dict), text
        assert eos_allowed[-1] and not any(eos_allowed[:-1])


def test_regex_full_match_and_eos_exactly_on_a_match(tokenizer: Any, compiler: GrammarCompiler) -> None:
    pattern = "[0-9]{3}-[a-z]+"
    for seed in range(3):
        c = compiler.compile(GrammarSpec("regex", pattern), "guided_regex")
        gen = torch.Generator().manual_seed(seed)
        ids: list[int] = []
        for step in range(200):
            row = torch.randn(c.vocab_size, generator=gen)
            row[tokenizer.eos_token_id] += 0.3 * step
            c.mask_(row)
            matched = re.fullmatch(pattern, tokenizer.decode(ids)) is not None
            assert bool(torch.isfinite(row[tokenizer.eos_token_id])) == matched, tokenizer.decode(ids)
            token = int(row.argmax())
            c.accept(token)
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        assert c.done and re.fullmatch(pattern, tokenizer.decode(ids))


def test_choice_gives_one_of_them(tokenizer: Any, compiler: GrammarCompiler) -> None:
    choices = ["red", "green", "deep blue sea", 'say "hi"\n']
    seen = set()
    for seed in range(6):
        c = compiler.compile(GrammarSpec("choice", json.dumps(choices)), "guided_choice")
        text, eos_allowed = decode(tokenizer, c, seed)
        assert text in choices and eos_allowed[-1] and not any(eos_allowed[:-1])
        seen.add(text)
    assert len(seen) > 1  # the random logits do choose, not the grammar


@pytest.mark.parametrize("grammar", ['start: "yes" | "no"', 'root ::= "yes" | "no"'])  # Lark, GBNF
def test_grammar_lark_and_gbnf(tokenizer: Any, compiler: GrammarCompiler, grammar: str) -> None:
    text, _ = decode(tokenizer, compiler.compile(GrammarSpec("grammar", grammar), "guided_grammar"), 0)
    assert text in ("yes", "no")


@pytest.mark.parametrize(
    ("spec", "param", "named"),
    [
        (
            schema_spec({"type": "array", "contains": {"type": "integer"}, "minContains": 2}),
            "response_format",
            "minContains",
        ),
        (
            schema_spec({"type": "object", "dependentRequired": {"a": ["b"]}}),
            "guided_json",
            "dependentRequired",
        ),
        (schema_spec({"type": "string", "format": "no-such-format"}), "response_format", "no-such-format"),
        (schema_spec({"$ref": "#/$defs/missing"}), "response_format", "/$defs/missing"),
        (schema_spec(DEEP), "response_format", "recursion limit"),  # bounded work, not a hang
        (GrammarSpec("regex", "a(b"), "guided_regex", "unclosed group"),
        (GrammarSpec("grammar", "start: missing_rule"), "guided_grammar", "missing_rule"),
        (GrammarSpec("json_schema", "{not json"), "guided_json", "key must be a string"),
    ],
)
def test_unsupported_or_invalid_is_named(
    compiler: GrammarCompiler, spec: GrammarSpec, param: str, named: str
) -> None:
    for _ in range(2):  # the refusal is cached, and still raised each time
        with pytest.raises(RequestError) as e:
            compiler.compile(spec, param)
        assert e.value.param == param and named in str(e.value), str(e.value)


def test_supported_features_compile(compiler: GrammarCompiler) -> None:
    recursive = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
            }
        },
        "$ref": "#/$defs/node",
    }
    for schema in (
        recursive,
        {"type": "string", "format": "email"},
        {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    ):
        assert not compiler.compile(schema_spec(schema)).failed
    assert not compiler.compile(GrammarSpec("regex", "(a+)+b")).failed  # no backtracking blow-up


def test_batched_masks_equal_the_per_row_reference(tokenizer: Any, compiler: GrammarCompiler) -> None:
    specs = [
        schema_spec(SCHEMA),
        GrammarSpec("json_object", ""),
        GrammarSpec("regex", "[0-9]{3}-[a-z]+"),
        GrammarSpec("choice", json.dumps(["red", "green"])),
    ]
    prefixes = ['{"name": "Al', "", "12", "green"]  # mid-string, fresh, mid-regex, complete
    constraints = []
    for spec, prefix in zip(specs, prefixes, strict=True):
        c = compiler.compile(spec)
        for t in tokenizer.encode(prefix):
            c.accept(t)
        assert not c.failed, prefix
        constraints.append(c)
    failed = compiler.compile(GrammarSpec("regex", "[0-9]+"))
    failed.accept(tokenizer.encode("x")[0])
    assert failed.failed and not failed.done
    constraints.append(failed)
    assert constraints[3].done

    logits = torch.randn(8, compiler.vocab_size, generator=torch.Generator().manual_seed(0))
    rows = list(zip([0, 2, 3, 5, 7], constraints, strict=True))  # rows 1, 4, 6 unconstrained
    reference = logits.clone()
    for i, c in rows:
        c.mask_(reference[i])
    batched = logits.clone()
    apply_masks(batched, rows)
    assert torch.equal(batched, reference)
    assert torch.equal(batched[[1, 4, 6]], logits[[1, 4, 6]])
    for i in (5, 7):  # complete, and failed: only EOS remains
        assert torch.isfinite(batched[i]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    apply_masks(batched, [])  # nothing constrained: nothing to do


def test_cache_compiles_once_and_states_are_independent(tokenizer: Any) -> None:
    # no padding, two EOS ids, room for two grammars
    comp = GrammarCompiler(tokenizer, len(tokenizer), eos_token_ids=[2, 0], cache_size=2)
    spec = GrammarSpec("choice", json.dumps(["yes", "no"]))
    cs = [comp.compile(spec) for _ in range(8)]
    assert comp.compiles == 1 and len({id(c) for c in cs}) == 8
    for t in tokenizer.encode("yes"):
        cs[0].accept(t)
    row0, row1 = torch.zeros(comp.vocab_size), torch.zeros(comp.vocab_size)
    cs[0].mask_(row0)
    cs[1].mask_(row1)
    assert cs[0].done and not cs[1].done
    assert torch.isfinite(row0).nonzero().flatten().tolist() == [0, 2]  # every EOS id, only those
    assert not torch.isfinite(row1[[0, 2]]).any()
    a, b = GrammarSpec("regex", "a+"), GrammarSpec("regex", "b+")
    for s in (a, spec, b, spec, a):  # holds two: b evicts a (spec was used since), not spec
        comp.compile(s)
    assert comp.compiles == 4


def test_grammar_spec_translation() -> None:
    rf = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    )
    assert grammar_spec(rf, None, None, None, None, None) == schema_spec(SCHEMA)
    as_text = json.dumps(SCHEMA, indent=2)  # same schema, other layout: same spec
    assert grammar_source(None, None, as_text, None, None, None) == ("guided_json", schema_spec(SCHEMA))
    any_object = GrammarSpec("json_object", "")
    for body in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "p"}}):
        assert grammar_spec(ResponseFormat.model_validate(body), None, None, None, None, None) == any_object
    assert grammar_spec(ResponseFormat(type="text"), None, None, None, None, None) is None
    assert grammar_spec(None, None, None, None, None, None) is None
    so = StructuredOutputs.model_validate({"json": SCHEMA})
    assert grammar_source(None, so, None, None, None, None) == (
        "structured_outputs.json",
        schema_spec(SCHEMA),
    )
    so = StructuredOutputs.model_validate({"json_object": True})
    assert grammar_spec(None, so, None, None, None, None) == any_object
    assert (
        grammar_spec(None, StructuredOutputs.model_validate({"json_object": False}), None, None, None, None)
        is None
    )
    assert grammar_spec(None, None, None, None, ["a", "b"], None) == GrammarSpec("choice", '["a", "b"]')
    assert grammar_spec(None, None, None, "x+", None, None) == GrammarSpec("regex", "x+")
    with pytest.raises(ValidationError, match="whitespace_pattern"):  # refused, never ignored
        StructuredOutputs.model_validate({"regex": "a", "whitespace_pattern": " "})


def test_one_source_only_and_bounds() -> None:
    with pytest.raises(RequestError) as e:
        grammar_spec(ResponseFormat(type="json_object"), None, None, "[0-9]+", None, None)
    assert "response_format" in str(e.value) and "guided_regex" in str(e.value)
    with pytest.raises(RequestError) as e:
        grammar_spec(None, StructuredOutputs(regex="a", choice=["a"]), None, None, None, None)
    assert "structured_outputs.regex" in str(e.value) and "structured_outputs.choice" in str(e.value)
    big = {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"guided_regex": "a" * (MAX_REGEX_CHARS + 1)}, "guided_regex"),
        ({"guided_choice": [str(i) for i in range(MAX_CHOICES + 1)]}, "guided_choice"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": big}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"guided_json": "{oops"}, "guided_json"),
        ({"guided_grammar": "x" * (MAX_SCHEMA_BYTES + 1)}, "guided_grammar"),
        ({"response_format": ResponseFormat(type="json_schema")}, "response_format"),
    ]
    for kwargs, param in bad:
        args: dict[str, Any] = {
            "response_format": None,
            "structured_outputs": None,
            "guided_json": None,
            "guided_regex": None,
            "guided_choice": None,
            "guided_grammar": None,
        }
        with pytest.raises(RequestError) as e:
            grammar_spec(**{**args, **kwargs})
        assert e.value.param == param, (kwargs, e.value)

"""Structured-output request fields (OpenAI's `response_format`, vLLM's `structured_outputs` and
`guided_*`) and their translation into the engine's GrammarSpec, with the size bounds that keep a
grammar from becoming a cheap denial of service. Whether the library supports a schema's features
is the engine's answer (`GrammarCompiler.compile`), not guessed here."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.engine.grammar import GrammarSpec
from server.errors import RequestError

MAX_SCHEMA_BYTES = 64 * 1024  # a schema, a choice list or a grammar, as canonical text
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 256


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)
    name: str = Field(max_length=256)
    # `schema` would shadow BaseModel.schema(); the wire name stays "schema"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a JSON schema."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: at most one of its fields. Unknown keys (vLLM's whitespace and
    backend options) are refused rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    # the bound _spec checks, stated for the OpenAPI document
    choice: list[str] | None = Field(None, json_schema_extra={"minItems": 1, "maxItems": MAX_CHOICES})
    grammar: str | None = None
    json_object: bool | None = None


def grammar_source(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    guided_json: dict[str, Any] | str | None,
    guided_regex: str | None,
    guided_choice: list[str] | None,
    guided_grammar: str | None,
) -> tuple[str, GrammarSpec] | None:
    """The one constraint a request asks for, with the request field it came from (the `param` of a
    compile error), or None.

    Semantics: at most one source among the arguments (and one field of `structured_outputs`), else
    RequestError naming them. `response_format` text -> None; json_object, or json_schema with an
    empty or missing schema -> any JSON object. Sizes are bounded (MAX_*), RequestError otherwise.
    """
    found: list[tuple[str, Any]] = []  # (param, raw value), every constraint the request names
    if response_format is not None and response_format.type != "text":
        found.append(("response_format", response_format))
    if structured_outputs is not None:
        for key, value in structured_outputs.model_dump(by_alias=True, exclude_none=True).items():
            if key != "json_object" or value:  # json_object: false asks for nothing
                found.append((f"structured_outputs.{key}", value))
    for param, value in (
        ("guided_json", guided_json),
        ("guided_regex", guided_regex),
        ("guided_choice", guided_choice),
        ("guided_grammar", guided_grammar),
    ):
        if value is not None:
            found.append((param, value))
    if not found:
        return None
    if len(found) > 1:
        names = " and ".join(p for p, _ in found)
        raise RequestError(f"a request takes one structured-output constraint, got {names}", found[1][0])
    param, value = found[0]
    return param, _spec(param, value)


def _spec(param: str, value: Any) -> GrammarSpec:
    kind = param.rsplit(".", 1)[-1].removeprefix("guided_")
    if isinstance(value, ResponseFormat):
        if value.type == "json_object":
            return GrammarSpec("json_object", "")
        if value.json_schema is None:
            raise RequestError("response_format of type json_schema needs a json_schema object", param)
        schema = value.json_schema.schema_
        return _schema(param, schema) if schema else GrammarSpec("json_object", "")
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "json":
        return _schema(param, value)
    if kind == "regex":
        if len(value) > MAX_REGEX_CHARS:
            raise RequestError(f"{param} is at most {MAX_REGEX_CHARS} characters, got {len(value)}", param)
        return GrammarSpec("regex", value)
    if kind == "choice":
        if not value or len(value) > MAX_CHOICES:
            raise RequestError(f"{param} takes 1 to {MAX_CHOICES} choices, got {len(value)}", param)
        return GrammarSpec("choice", _bounded(param, json.dumps(value)))
    return GrammarSpec("grammar", _bounded(param, value))


def _schema(param: str, schema: dict[str, Any] | str) -> GrammarSpec:
    """A schema given as an object or as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(_bounded(param, schema))
        except ValueError as e:
            raise RequestError(f"{param} is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise RequestError(f"{param} must be a JSON object (a JSON schema)", param)
    spec = GrammarSpec.for_schema(schema)
    _bounded(param, spec.value)
    return spec


def _bounded(param: str, text: str) -> str:
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        raise RequestError(f"{param} is at most {MAX_SCHEMA_BYTES} bytes, got {size}", param)
    return text

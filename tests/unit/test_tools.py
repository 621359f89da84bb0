"""Tool calling at the edge: forced-call schemas, Hermes prompts through SmolLM2's real chat template,
and the `<tool_call>` parser, whole and streamed."""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

import pytest
from pydantic import TypeAdapter, ValidationError

from server.api.tools import (
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    ToolList,
    ToolStreamBuffer,
    forced_calls,
    forced_schema,
    parse_tool_calls,
    render_messages,
    template_supports_tools,
)
from server.errors import RequestError

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/unit"}},
            "required": ["city"],
            "additionalProperties": False,
            "$defs": {"unit": {"type": "string", "const": "celsius"}},
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}
TOOLS = [Tool.model_validate(WEATHER), Tool.model_validate(CLOCK)]
CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)


def named(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def conforms(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> bool:
    """The JSON-schema subset forced_schema emits, enough to tell a valid sample from an invalid one."""
    if "$ref" in schema:
        *_, group, name = schema["$ref"].split("/")
        return conforms(value, root[group][name], root)
    if "anyOf" in schema and not any(conforms(value, s, root) for s in schema["anyOf"]):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    kind = {"object": dict, "array": list, "string": str}.get(schema.get("type", ""), object)
    if not isinstance(value, kind):
        return False
    if isinstance(value, list):
        return len(value) >= schema.get("minItems", 0) and all(
            conforms(v, schema.get("items", {}), root) for v in value
        )
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        return all(conforms(v, props[k], root) for k, v in value.items() if k in props)
    return True


def test_request_models_bound_names_counts_and_sizes() -> None:
    for bad in ["", "a" * 65, "has space", "dot.name"]:
        with pytest.raises(ValidationError):
            Tool.model_validate({"type": "function", "function": {"name": bad}})
    big = {"type": "object", "description": "x" * 70_000}
    with pytest.raises(ValidationError):
        Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": big}})
    with pytest.raises(ValidationError):
        TypeAdapter(ToolList).validate_python([CLOCK] * 129)
    assert len(TypeAdapter(ToolList).validate_python([CLOCK] * 128)) == 128
    assert CHOICE.validate_python("required") == "required"
    assert isinstance(
        CHOICE.validate_python({"type": "function", "function": {"name": "now"}}), NamedToolChoice
    )
    with pytest.raises(ValidationError):
        CHOICE.validate_python("sometimes")
    call = ToolCall.model_validate(
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    )
    assert call.function.arguments == "{}"


def test_required_schema_is_an_array_of_named_calls_and_samples_parse() -> None:
    schema = forced_schema(TOOLS, "required")
    assert schema is not None
    assert schema["type"] == "array" and schema["minItems"] == 1
    branches = schema["items"]["anyOf"]
    assert [b["properties"]["name"]["const"] for b in branches] == ["get_weather", "now"]
    assert branches[1]["properties"]["parameters"] == {"type": "object"}  # no parameters: any object
    # $defs moved to the root, where the tool's `#/$defs/unit` now points.
    assert schema["$defs"] == {"unit": {"type": "string", "const": "celsius"}}
    assert "$defs" not in branches[0]["properties"]["parameters"]
    assert TOOLS[0].function.parameters is not None and "$defs" in TOOLS[0].function.parameters  # not mutated

    good = '[{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}, '
    good += '{"name": "now", "parameters": {}}]'
    assert conforms(json.loads(good), schema, schema)
    for bad in [
        "[]",
        '[{"name": "get_weather", "parameters": {"unit": "celsius"}}]',
        '[{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "kelvin"}}]',
        '[{"name": "other", "parameters": {}}]',
    ]:
        assert not conforms(json.loads(bad), schema, schema), bad
    calls = forced_calls(good, TOOLS, "required")
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert forced_calls('[{"name": "get_weather", "parameters": {"ci', TOOLS, "required") == []


def test_named_schema_is_the_arguments_object() -> None:
    schema = forced_schema(TOOLS, named("get_weather"))
    assert schema is not None
    assert schema == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert conforms({"city": "Oslo"}, schema, schema) and not conforms({"town": "Oslo"}, schema, schema)
    assert forced_schema(TOOLS, named("now")) == {"type": "object"}
    (call,) = forced_calls('{ "city" : "Oslo" }', TOOLS, named("get_weather"))
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # Cut short by max_tokens: the truncated text is still the arguments, as OpenAI returns it.
    (cut,) = forced_calls('{"city": "Os', TOOLS, named("get_weather"))
    assert cut["function"]["arguments"] == '{"city": "Os'


def test_choices_that_force_nothing_or_name_no_tool() -> None:
    for choice in ("none", "auto", None):
        assert forced_schema(TOOLS, choice) is None
        assert forced_schema(None, choice) is None
        assert forced_calls("[]", TOOLS, choice) == []
    with pytest.raises(RequestError) as e:
        forced_schema(TOOLS, named("get_time"))
    assert e.value.param == "tool_choice" and "get_time" in str(e.value)
    with pytest.raises(RequestError) as e:
        forced_schema(None, named("now"))
    assert e.value.param == "tool_choice"
    clash = Tool.model_validate(WEATHER).model_copy(deep=True)
    clash.function.name = "get_forecast"
    assert clash.function.parameters is not None
    clash.function.parameters["$defs"]["unit"] = {"type": "string"}
    with pytest.raises(RequestError) as e:
        forced_schema([*TOOLS, clash], "required")
    assert e.value.param == "tools" and "unit" in str(e.value)
    no_tools: list[Tool] | None
    for no_tools in (None, []):
        with pytest.raises(RequestError) as e:
            forced_schema(no_tools, "required")
        assert e.value.param == "tool_choice"


@pytest.fixture(scope="module")
def smol() -> Any:
    from transformers import AutoTokenizer

    from server.config import default_cache_dir
    from server.model.source import resolve_model

    path, _ = resolve_model(None, default_cache_dir())
    return AutoTokenizer.from_pretrained(path)


def chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[Tool] | None, choice: Any) -> str:
    msgs, kwargs = render_messages(messages, tools, choice, template_supports_tools(tokenizer))
    text: str = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    return text


def test_template_support_detection(smol: Any) -> None:
    assert not template_supports_tools(smol)

    class Qwen:
        chat_template = "{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"

    class Several:
        chat_template: ClassVar[dict[str, str]] = {
            "default": "{{ messages }}",
            "tool_use": "{% for t in tools %}{% endfor %}",
        }

    assert template_supports_tools(Qwen()) and template_supports_tools(Several())
    assert not template_supports_tools(object())


def test_tools_prompt_goes_into_the_system_turn(smol: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    text = chat(smol, messages, TOOLS, "auto")
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert "<tools>" in system and "</tools>" in system and '"name": "get_weather"' in system
    assert "<tool_call>" in system and "SmolLM" not in text
    assert text.endswith("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")
    # No system message: one is created, holding only the tools prompt.
    created = chat(smol, messages[1:], TOOLS, "auto")
    assert created.startswith("<|im_start|>system\n# Tools") and created.count("<|im_start|>system") == 1
    # tool_choice none, or no tools: nothing is offered and SmolLM2's own default system prompt stays.
    for tools, choice in ((TOOLS, "none"), (None, "auto"), ([], None)):
        plain = chat(smol, messages[1:], tools, choice)
        assert "<tools>" not in plain and "SmolLM" in plain


def test_tool_history_round_trips_as_text(smol: Any) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    call2 = {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather and time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call, call2]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "10:00"},
        {"role": "assistant", "content": "Checking once more.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "13 C"},
    ]
    text = chat(smol, messages, TOOLS, "auto")
    assert "None" not in text
    assistant = (
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
    )
    merged = (
        "<|im_start|>user\n<tool_response>\n12 C\n</tool_response>\n"
        "<tool_response>\n10:00\n</tool_response><|im_end|>\n"
    )
    assert assistant + merged in text
    assert '<|im_start|>assistant\nChecking once more.\n<tool_call>\n{"name": "get_weather"' in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\n13 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert text.count("<|im_start|>user") == 3
    # What the model is told to write parses back into the same calls.
    _, calls = parse_tool_calls(assistant)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]


def test_templates_with_tools_get_them_as_kwargs() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c", "content": "10:00"},
    ]
    out, kwargs = render_messages(messages, TOOLS, "auto", supports_tools=True)
    assert kwargs["tools"][0]["function"]["name"] == "get_weather" and len(kwargs["tools"]) == 2
    assert out[0]["content"] is None and out[1] == messages[1]
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}  # templates `tojson` it
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"tz": "UTC"}'  # input untouched
    assert render_messages(messages, TOOLS, "none", supports_tools=True)[1] == {}


def test_parse_tool_calls() -> None:
    one = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_tool_calls(one)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])

    two = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"s": "</tool_call>"}}</tool_call>'
    )
    content, calls = parse_tool_calls(two)
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {"s": "</tool_call>"}),
    ]

    for bad in [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "a", "arguments": "oops"}</tool_call>',
        '<tool_call>{"name": "a", "arguments": {}} trailing</tool_call>',
    ]:
        assert parse_tool_calls(bad) == (bad, []), bad
    mixed = '<tool_call>[1]</tool_call> then <tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(mixed)
    assert content == "<tool_call>[1]</tool_call> then" and [c["function"]["name"] for c in calls] == ["b"]

    cut = 'Sure. <tool_call>\n{"name": "now", "arguments": {}}\n'
    content, calls = parse_tool_calls(cut)
    assert content == "Sure." and calls[0]["function"]["name"] == "now"
    assert parse_tool_calls('<tool_call>{"name": "now", "argu') == ('<tool_call>{"name": "now", "argu', [])

    assert parse_tool_calls("  just text with a < and </tool_call>  ") == (
        "just text with a < and </tool_call>",
        [],
    )
    assert parse_tool_calls("   ") == (None, [])


def stream(text: str, size: int) -> tuple[list[str], str, list[dict[str, Any]]]:
    buf = ToolStreamBuffer()
    emitted = [buf.feed(text[i : i + size]) for i in range(0, len(text), size)]
    rest, calls = buf.finish()
    return emitted, rest, calls


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_stream_holds_a_call_split_across_small_deltas(size: int) -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    text += '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    emitted, rest, calls = stream(text, size)
    assert "".join(emitted) == "Checking.\n" and rest == ""
    assert "<" not in "".join(emitted)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("now", {}),
    ]


def test_stream_releases_text_that_is_not_a_call() -> None:
    buf = ToolStreamBuffer()
    assert buf.feed("a <") == "a "  # could still become <tool_call>
    assert buf.feed("b") == "<b"  # released as soon as it cannot
    assert buf.feed(" <to") == " "
    assert buf.feed("ol_c") == ""
    assert buf.feed("x> 1 < 2") == "<tool_cx> 1 < 2"
    assert buf.feed(" <") == " "
    assert buf.finish() == ("<", [])  # held to the end, then released as is

    emitted, rest, calls = stream("if x <tool_call> y", 1)
    assert "".join(emitted) == "if x " and rest == "<tool_call> y" and calls == []
    emitted, rest, calls = stream("ends with <tool_ca", 4)
    assert "".join(emitted) + rest == "ends with <tool_ca" and calls == []

"""OpenAI tool calling at the edge: request models, the JSON schemas that force a call, the Hermes-style
prompt for chat templates without tool support, and the `<tool_call>` parser (whole text and streamed).

Pure functions over pydantic models: the routes call them, the engine never sees a tool.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import RequestError

MAX_TOOLS = 128
MAX_PARAMETERS_BYTES = 64 * 1024
OPEN, CLOSE = "<tool_call>", "</tool_call>"


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # The schema becomes a grammar and a prompt; an unbounded one is a cheap denial of service.
        if v is not None and len(json.dumps(v, separators=(",", ":")).encode()) > MAX_PARAMETERS_BYTES:
            raise ValueError(f"parameters is larger than {MAX_PARAMETERS_BYTES} bytes as JSON")
        return v


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
ToolList = Annotated[list[Tool], Field(max_length=MAX_TOOLS)]


class CalledFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=200_000)


class ToolCall(BaseModel):
    """An entry of an assistant message's `tool_calls` in the history a client sends back."""

    model_config = ConfigDict(extra="ignore", strict=True)
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


def _parameters(fn: FunctionDef) -> dict[str, Any]:
    schema = copy.deepcopy(fn.parameters) if fn.parameters else {}
    # The output is the arguments object: a schema without a type (or `{}`) must not allow a bare string.
    return schema if "type" in schema else {"type": "object", **schema}


def _find(tools: list[Tool] | None, name: str) -> Tool:
    for tool in tools or []:
        if tool.function.name == name:
            return tool
    raise RequestError(f"tool_choice names the function {name!r}, which is not in 'tools'.", "tool_choice")


def forced_schema(tools: list[Tool] | None, choice: ToolChoice | None) -> dict[str, Any] | None:
    """The JSON schema the output must match, or None when the choice forces no call.

    Semantics: `required` -> an array (at least one item) of `{"name": const, "parameters": schema}`,
    one anyOf branch per tool; a named choice -> that tool's parameters schema, so the output IS the
    arguments object. A tool without parameters accepts any object. `none`, `auto`, None -> None.
    Raises RequestError(param="tool_choice") for a named choice not in `tools`, or `required` without tools.
    """
    if isinstance(choice, NamedToolChoice):
        return _parameters(_find(tools, choice.function.name).function)
    if choice != "required":
        return None
    if not tools:
        raise RequestError("tool_choice 'required' needs at least one tool in 'tools'.", "tool_choice")
    branches: list[dict[str, Any]] = []
    defs: dict[str, dict[str, Any]] = {}
    for tool in tools:
        params = _parameters(tool.function)
        # `#/$defs/X` resolves against the root; nested under the array it must move up to stay valid.
        for key in ("$defs", "definitions"):
            if not isinstance(params.get(key), dict):
                continue
            for name, sub in params.pop(key).items():
                if defs.setdefault(key, {}).setdefault(name, sub) != sub:
                    raise RequestError(f"two tools define {key}/{name} differently.", "tools")
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "const": tool.function.name}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    return {"type": "array", "minItems": 1, "items": {"anyOf": branches}, **defs}


def _call(name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def forced_calls(text: str, tools: list[Tool] | None, choice: ToolChoice | None) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` entries from output generated under `forced_schema(tools, choice)`.

    Semantics: a named choice always gives one call to that function; its arguments are the output
    re-serialized, or the raw text when it is not a JSON object (cut short by max_tokens: OpenAI also
    returns the truncated arguments). `required` gives one call per array item, or [] when the text is
    not a complete array of known calls. `none`/`auto`/None give [].
    """
    if isinstance(choice, NamedToolChoice):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        return [_call(choice.function.name, obj if isinstance(obj, dict) else text)]
    if choice != "required":
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    names = {t.function.name for t in tools or []}
    ok = isinstance(items, list) and all(
        isinstance(i, dict) and i.get("name") in names and isinstance(i.get("parameters"), dict)
        for i in items
    )
    return [_call(i["name"], i["parameters"]) for i in items] if ok else []


def template_supports_tools(tokenizer: object) -> bool:
    """Semantics: True when the tokenizer's chat template (any of them, if it has several) uses `tools`."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and re.search(r"\btools\b", t) for t in texts)


def _text(content: Any) -> str:
    # Content parts are normally flattened by the route; stay safe if a list gets here.
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _arguments(raw: Any) -> Any:
    # Templates print arguments with `tojson`: a JSON string must become the object it encodes.
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _tool_prompt(tools: list[Tool], choice: ToolChoice | None) -> str:
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    prompt = (
        "# Tools\n\nYou may call one or more functions to help with the user's request. "
        f"The function signatures are inside <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and arguments inside "
        f"<tool_call></tool_call> XML tags:\n{OPEN}\n"
        f'{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )
    # Forced output is constrained to a different shape; telling the model helps a small one fill it well.
    if choice == "required":
        prompt += '\n\nNow answer only with a JSON array of calls: [{"name": ..., "parameters": {...}}].'
    elif isinstance(choice, NamedToolChoice):
        prompt += f"\n\nNow answer only with the JSON arguments object for {choice.function.name}."
    return prompt


def render_messages(
    messages: list[dict[str, Any]],
    tools: list[Tool] | None,
    choice: ToolChoice | None,
    supports_tools: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages and extra kwargs for `tokenizer.apply_chat_template(messages, **kwargs)`.

    Semantics: with `tool_choice` "none" (or no tools) no tool is offered. A template that supports
    tools gets the messages as sent (tool-call arguments decoded to objects) and `tools=[...]`.
    Otherwise the history becomes plain text in the Hermes format: an assistant's tool calls become
    `<tool_call>{json}</tool_call>` lines after its content, consecutive `tool` messages one user turn
    of `<tool_response>` blocks, and the tool prompt is appended to the system message (created if absent).
    """
    offered = tools if tools and choice != "none" else []
    if supports_tools:
        out = []
        for m in messages:
            if m.get("tool_calls"):
                calls = [
                    c
                    | {"function": c["function"] | {"arguments": _arguments(c["function"].get("arguments"))}}
                    for c in m["tool_calls"]
                ]
                m = m | {"tool_calls": calls}
            out.append(m)
        return out, ({"tools": [t.model_dump(exclude_none=True) for t in offered]} if offered else {})
    turns: list[dict[str, Any]] = []
    after_tool = False
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"
            # One user turn for a run of results, as Qwen2.5's template renders them.
            if after_tool:
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
            after_tool = True
            continue
        after_tool = False
        parts = [_text(m["content"])] if m.get("content") else []
        for c in m.get("tool_calls") or []:
            call = {"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
            parts.append(f"{OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE}")
        rest = {k: v for k, v in m.items() if k not in ("content", "tool_calls", "tool_call_id")}
        turns.append(rest | {"content": "\n".join(parts)})
    if offered:
        prompt = _tool_prompt(offered, choice)
        if turns and turns[0]["role"] == "system":
            turns[0] = turns[0] | {"content": f"{turns[0]['content']}\n\n{prompt}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns, {}


_DECODER = json.JSONDecoder()


def _block(text: str, start: int) -> tuple[dict[str, Any] | None, int]:
    """The call whose body starts at `start` (just after OPEN), and where its block ends; None if it
    does not parse. The JSON is decoded in place, so `</tool_call>` inside a string argument is harmless."""
    body = len(text) - len(text[start:].lstrip())
    try:
        obj, end = _DECODER.raw_decode(text, body)
    except json.JSONDecodeError:
        return None, start
    tail = len(text) - len(text[end:].lstrip())
    if text.startswith(CLOSE, tail):
        end = tail + len(CLOSE)
    elif tail == len(text):
        end = tail  # a final block cut short before its closing tag (max_tokens or a stop string)
    else:
        return None, start
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, start
    args = _arguments(obj.get("arguments"))
    return (_call(obj["name"], args), end) if isinstance(args, dict) else (None, start)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Hermes-format tool calls in model output, as (content, OpenAI `tool_calls` entries).

    Semantics: each `<tool_call>{"name": str, "arguments": object | JSON-string-of-object}</tool_call>`
    block, and a last one left unterminated at the end of the text, is a call. A block that does not
    parse stays in the content and makes no call. The content is the text outside the calls, stripped,
    or None when nothing is left.
    """
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = scan = 0
    while (start := text.find(OPEN, scan)) != -1:
        call, end = _block(text, start + len(OPEN))
        if call is None:
            scan = start + len(OPEN)  # keep it as text, but a later good block still counts
            continue
        content.append(text[pos:start])
        calls.append(call)
        pos = scan = end
    content.append(text[pos:])
    joined = "".join(content).strip()
    return (joined or None), calls


class ToolStreamBuffer:
    """Streams content while tool calls may come: text is released as soon as it cannot be the start
    of `<tool_call>`; from the first `<tool_call>` on, everything waits for `finish()`.

    Calls are only known whole at the end (arguments are validated JSON), so the route sends them in
    one delta per call after the content, which OpenAI clients accumulate like any other split.
    """

    def __init__(self) -> None:
        self._text = ""
        self._sent = 0  # characters of _text already returned by feed()
        self._held_from: int | None = None  # where the first full OPEN starts

    def feed(self, delta: str) -> str:
        """Semantics: the part of the text so far that is safe to emit now ("" while holding)."""
        self._text += delta
        if self._held_from is not None:
            return ""
        start = self._text.find(OPEN, self._sent)
        if start != -1:
            self._held_from = start
            return self._release(start)
        # Hold the longest tail that could still grow into OPEN ("<", "<tool", ...).
        keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self._text.endswith(OPEN[:k])), 0)
        return self._release(max(self._sent, len(self._text) - keep))

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """Semantics: (content not yet emitted, parsed calls). With no call the held tail comes back
        as is; otherwise the text outside the calls after the first `<tool_call>`, stripped."""
        if self._held_from is None:
            return self._release(len(self._text)), []
        content, calls = parse_tool_calls(self._text[self._held_from :])
        tail = self._release(len(self._text))
        return (content or "" if calls else tail), calls

    def _release(self, upto: int) -> str:
        out, self._sent = self._text[self._sent : upto], upto
        return out

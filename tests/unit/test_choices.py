"""A response choice built from engine outputs: streamed deltas add up to the whole response, tool
calls are parsed out of the text (auto) or read from the constrained output (required/named),
`echo` puts the prompt and its logprobs first, and `max_tokens` 0 shows only the prompt."""

from __future__ import annotations

import json
from typing import Any

from server.api.choices import FLOOR, Choice
from server.api.prompting import Prompt
from server.api.tools import NamedToolChoice, Tool
from server.engine.engine import RequestOutput
from server.engine.logprobs import TokenLogprob

WORDS = ["Hi", " there", "!", "<tool_call>", '{"name": "f", "arguments": {"x": 1}}', "</tool_call>"]


class Words:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(WORDS[i] for i in ids)


def outputs(
    texts: list[str], lps: list[TokenLogprob] | None = None, prompt_lps: Any = None
) -> list[RequestOutput]:
    n = len(texts)
    return [
        RequestOutput(
            request_id="r",
            token_ids=(i,),
            text=t,
            finished=i == n - 1,
            finish_reason="stop" if i == n - 1 else None,
            prompt_tokens=2,
            completion_tokens=i + 1,
            logprobs=(lps[i],) if lps else (),
            prompt_logprobs=prompt_lps if i == 0 else None,
        )
        for i, t in enumerate(texts)
    ]


TOOL = Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}})


def test_auto_tool_call_streamed_and_whole_agree() -> None:
    texts = ["Hi", " there", "<tool_call>", '{"name": "f", "arguments": {"x": 1}}', "</tool_call>"]
    prompt = Prompt([0], "")
    streamed = Choice(0, True, Words(), prompt, stream=True, want_logprobs=False, tools=[TOOL], choice="auto")
    chunks = [c for o in outputs(texts) if (c := streamed.add(o)) is not None]
    content = "".join(c["delta"].get("content", "") for c in chunks)
    calls = [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]
    assert content == "Hi there"
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "f", {"x": 1})
    ]
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert not any("<tool" in c["delta"].get("content", "") for c in chunks)

    whole = Choice(0, True, Words(), prompt, stream=False, want_logprobs=False, tools=[TOOL], choice="auto")
    assert all(whole.add(o) is None for o in outputs(texts))
    final = whole.final()
    assert final["message"]["content"] == "Hi there"
    (call,) = final["message"]["tool_calls"]
    assert call["id"].startswith("call_") and "index" not in call
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    assert final["finish_reason"] == "tool_calls"


def test_named_choice_is_one_call_with_finish_stop() -> None:
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "f"}})
    c = Choice(
        0, True, Words(), Prompt([0], ""), stream=False, want_logprobs=False, tools=[TOOL], choice=named
    )
    for o in outputs(['{"x": ', "2}"]):
        c.add(o)
    final = c.final()
    assert final["message"]["content"] is None and final["finish_reason"] == "stop"
    assert json.loads(final["message"]["tool_calls"][0]["function"]["arguments"]) == {"x": 2}


def test_echo_logprobs_offsets_and_max_tokens_zero() -> None:
    prompt = Prompt([0, 1], "Hi there")
    prompt_lps = (None, TokenLogprob(1, -0.5, ((2, -0.1),)))
    gen = [TokenLogprob(2, float("-inf"), ((2, float("-inf")),))]
    c = Choice(0, False, Words(), prompt, stream=False, want_logprobs=True, echo=True)
    c.add(outputs(["!"], gen, prompt_lps)[0])
    final = c.final()
    lp = final["logprobs"]
    assert final["text"] == "Hi there!"
    assert lp["tokens"] == ["Hi", " there", "!"]
    assert lp["token_logprobs"] == [None, -0.5, FLOOR]  # -inf is not JSON: OpenAI's floor instead
    assert lp["top_logprobs"] == [None, {"!": -0.1, " there": -0.5}, {"!": FLOOR}]
    assert lp["text_offset"] == [0, 2, 8]
    assert final["finish_reason"] == "stop"

    zero = Choice(0, False, Words(), prompt, stream=False, want_logprobs=True, echo=True, drop_generated=True)
    zero.add(outputs(["!"], gen, prompt_lps)[0])
    only = zero.final()
    assert only["text"] == "Hi there" and only["logprobs"]["tokens"] == ["Hi", " there"]
    assert zero.completion_tokens == 0


def test_completion_offsets_start_after_the_prompt_without_echo() -> None:
    lps = [TokenLogprob(2, -1.0), TokenLogprob(1, -2.0)]
    c = Choice(0, False, Words(), Prompt([0], "Hi"), stream=True, want_logprobs=True)
    chunks = [c.add(o) for o in outputs(["!", " there"], lps)]
    assert [ch["logprobs"]["text_offset"] for ch in chunks if ch] == [[2], [3]]
    assert c.final()["logprobs"]["text_offset"] == [2, 3]

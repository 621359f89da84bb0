"""One choice of a response as the engine's outputs arrive: its text (with the prompt first under
`echo`), its logprobs in OpenAI's chat or completions shape, and its tool calls. The route feeds
outputs in; a stream takes the delta of each, a plain response the whole at the end."""

from __future__ import annotations

import enum
import math
from typing import Any

from server.api import tools as tool_calls
from server.api.prompting import Prompt
from server.api.tools import Tool, ToolChoice
from server.engine.engine import RequestOutput
from server.engine.logprobs import TokenLogprob

FLOOR = -9999.0  # what OpenAI reports for a token the sampling filters removed (JSON has no -inf)


class ToolMode(enum.Enum):
    NONE = "none"  # plain text
    AUTO = "auto"  # the model may call tools: Hermes <tool_call> blocks are parsed out of its text
    NAMED = "named"  # the output is the arguments of one named function (grammar-constrained)
    REQUIRED = "required"  # the output is a JSON list of calls (grammar-constrained)


def tool_mode(tools: list[Tool] | None, choice: ToolChoice | None) -> ToolMode:
    if not tools or choice == "none":
        return ToolMode.NONE
    if choice is None or choice == "auto":
        return ToolMode.AUTO
    return ToolMode.REQUIRED if choice == "required" else ToolMode.NAMED


def _lp(x: float) -> float:
    return x if math.isfinite(x) else FLOOR


class Choice:
    def __init__(
        self,
        index: int,
        chat: bool,
        tokenizer: Any,
        prompt: Prompt,
        *,
        stream: bool,
        want_logprobs: bool,
        echo: bool = False,
        drop_generated: bool = False,
        tools: list[Tool] | None = None,
        choice: ToolChoice | None = None,
    ) -> None:
        self.index, self.chat, self.tokenizer, self.prompt = index, chat, tokenizer, prompt
        self.stream, self.wants_logprobs = stream, want_logprobs
        self.echo, self.drop = echo, drop_generated
        self.tools, self.tool_choice = tools, choice
        self.mode = tool_mode(tools, choice) if chat else ToolMode.NONE
        self.buffer = tool_calls.ToolStreamBuffer() if self.mode is ToolMode.AUTO else None
        self.text = ""  # everything the engine produced
        self.content = ""  # what the client has been given as content
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.logprobs: list[TokenLogprob | None] = []
        self.started = False
        # completions' text_offset counts characters of the whole text, prompt included
        self.start_offset = 0 if echo else len(prompt.text)
        self.offset = self.start_offset
        self.calls: list[dict[str, Any]] = []

    # -- input ------------------------------------------------------------------------------------
    def add(self, out: RequestOutput) -> dict[str, Any] | None:
        """Takes one engine output; when streaming, returns its choice chunk (None if it adds nothing)."""
        first, self.started = not self.started, True
        text = "" if self.drop else out.text
        new_lps: list[TokenLogprob | None] = [] if self.drop else list(out.logprobs)
        if first and self.echo:
            text = self.prompt.text + text
            if out.prompt_logprobs is not None:
                new_lps = list(out.prompt_logprobs) + new_lps
        self.text += text
        self.logprobs += new_lps
        self.completion_tokens = 0 if self.drop else out.completion_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
        visible = self._visible(text, out.finished)
        tool_delta = self._finish_tools() if out.finished else []
        if out.finished and self.mode in (ToolMode.NAMED, ToolMode.REQUIRED) and not self.calls:
            visible = self.text  # held back as a call that never completed: it is content after all
        if self.finish_reason == "stop" and self.calls and self.mode is not ToolMode.NAMED:
            self.finish_reason = "tool_calls"
        if not self.stream or not (
            visible or out.finished or (self.wants_logprobs and new_lps) or tool_delta
        ):
            return None
        return self._choice(visible, new_lps, tool_delta, delta=True)

    def _visible(self, text: str, finished: bool) -> str:
        """The part of new text that is content (tool-call text is held back or turned into calls)."""
        if self.mode in (ToolMode.NAMED, ToolMode.REQUIRED):
            return ""
        if self.buffer is not None:
            shown = self.buffer.feed(text)
            if finished:
                rest, self.calls = self.buffer.finish()
                shown += rest
            self.content += shown
            return shown
        self.content += text
        return text

    def _finish_tools(self) -> list[dict[str, Any]]:
        if self.mode in (ToolMode.NAMED, ToolMode.REQUIRED):
            self.calls = tool_calls.forced_calls(self.text, self.tools, self.tool_choice)
            if not self.calls:  # `required` cut short by max_tokens: not a whole call, so plain text
                self.content = self.text
                return []
        return [{"index": i, **c} for i, c in enumerate(self.calls)]

    # -- output -----------------------------------------------------------------------------------
    def _choice(
        self, text: str, lps: list[TokenLogprob | None], calls: list[dict[str, Any]], delta: bool
    ) -> dict[str, Any]:
        logprobs = self._logprobs(lps) if self.wants_logprobs else None
        if not self.chat:
            return {
                "index": self.index,
                "text": text,
                "finish_reason": self.finish_reason,
                "logprobs": logprobs,
            }
        message: dict[str, Any] = {"content": text} if text or not delta else {}
        if not delta:
            message = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = (
                calls if delta else [{k: v for k, v in c.items() if k != "index"} for c in calls]
            )
        key = "delta" if delta else "message"
        return {"index": self.index, key: message, "finish_reason": self.finish_reason, "logprobs": logprobs}

    def final(self) -> dict[str, Any]:
        """The whole choice, for a response that is not streamed."""
        self.offset = self.start_offset
        return self._choice(self.content, self.logprobs, self.calls, delta=False)

    def role_chunk(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
            "logprobs": None,
        }

    def _token(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))

    def _logprobs(self, lps: list[TokenLogprob | None]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in lps if e is not None]}
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for i, e in enumerate(lps):
            if e is None:  # the first prompt token: nothing predicts it
                tok = self._token(self.prompt.ids[i])
                tokens.append(tok)
                values.append(None)
                tops.append(None)
            else:
                tok = self._token(e.token)
                tokens.append(tok)
                values.append(_lp(e.logprob))
                top = {self._token(t): _lp(v) for t, v in e.top}
                top.setdefault(tok, _lp(e.logprob))  # vLLM's: the chosen token is always listed
                tops.append(top)
            offsets.append(self.offset)
            self.offset += len(tok)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_entry(self, e: TokenLogprob) -> dict[str, Any]:
        tok = self._token(e.token)
        return {
            "token": tok,
            "logprob": _lp(e.logprob),
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": (s := self._token(t)), "logprob": _lp(v), "bytes": list(s.encode("utf-8"))}
                for t, v in e.top
            ],
        }

"""Incremental text for one sequence: new text per step, stop strings, and no half characters."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    """Decodes the whole output each step (outputs are short; the tokenizer is Rust) and releases text
    only once it can no longer change: not ending in a partial UTF-8 character and not a possible
    start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""  # everything decoded so far, stop string excluded once found
        self.sent = 0  # characters of `text` already handed out

    def update(self, output_ids: list[int], final: bool) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit)."""
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        hit = False
        for s in self.stop:
            # search only where a new match can start, so a stop string is found exactly once
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i != -1:
                text, hit = text[:i], True
        self.text = text
        end = len(text)
        if not (hit or final):
            if text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        end = max(end, self.sent)
        delta = text[self.sent : end]
        self.sent = end
        return delta, hit

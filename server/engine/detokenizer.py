"""Incremental text for one sequence: new text per step, stop strings, and no half characters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

DecodeStream: Any
try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21.1: every tokenizer takes the window path
    DecodeStream = None

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what a decoder prints for an incomplete UTF-8 sequence
# what tokenizers' DecodeStream raises when a token makes the text so far no longer a prefix
# (vLLM issue 17448); the sequence then goes on with the window
INVALID_PREFIX = "Invalid prefix encountered"


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def rust_decoder(tokenizer: Tokenizer) -> Any:
    """A transformers fast tokenizer's Rust tokenizer, where its decode adds nothing to that one's
    (its optional clean-up is off); else None."""
    backend: Any = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return backend
    return None


def text_decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """The tokenizer's decode with special tokens skipped. A transformers fast tokenizer's decode is
    its Rust decoder's plus an optional clean-up; when the clean-up is off, the Rust decoder is
    called directly: the same text without the Python wrapper, which cost 3x the decoding itself
    (about 0.5 ms a step at 64 sequences)."""
    backend = rust_decoder(tokenizer)
    if backend is not None:
        return rust_text(backend)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def rust_text(backend: Any) -> Callable[[list[int]], str]:
    return lambda ids: str(backend.decode(ids, skip_special_tokens=True))


class Window:
    """New text by decoding a short window of the newest tokens (vLLM's prefix/read offsets), so a
    step costs O(new tokens), not O(output): the plain path, for any tokenizer. The window starts a
    few tokens back because byte-level and SentencePiece decoders print a token differently at the
    start of a text (leading space) than after its neighbour; the new text is the window's decoding
    minus its prefix's decoding. Two decodes a step."""

    def __init__(self, decode: Callable[[list[int]], str], prefix: int = 0, read: int = 0) -> None:
        self.decode = decode
        self.prefix = prefix  # first token of the decode window
        self.read = read  # tokens whose text has been returned

    def advance(self, output_ids: list[int], final: bool) -> str:
        """The text the tokens since the last call add; a window ending in half a character waits
        for the next token (or the end)."""
        prefix_text = self.decode(output_ids[self.prefix : self.read])
        new_text = self.decode(output_ids[self.prefix :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT)):
            self.prefix, self.read = self.read, len(output_ids)
            return new_text[len(prefix_text) :]
        if final:
            self.read = len(output_ids)
        return ""


class Stream:
    """The same text through tokenizers' own incremental decoder (`DecodeStream`, what vLLM uses
    for fast tokenizers): one Rust call per token, about 1 µs, against the window's two decodes
    (about 4 µs; at batch 256 that was a quarter of a graphed step's host work, bench/host_step).
    It holds a token back while its bytes end inside a character, as the window does.

    At the end, text still held (a last token ending inside a character) is released as the whole
    decode prints it, with U+FFFD, as the window releases it. If the stream raises on a token (its
    text so far stops being a prefix), this sequence goes on with a window from the last point
    where the stream returned text."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.fed = 0  # tokens given to the stream
        self.done = 0  # tokens whose text the stream has returned
        self.before = 0  # the previous such point: where a fallback window starts
        self.chars = 0  # characters returned so far
        self.window: Window | None = None

    def advance(self, output_ids: list[int], final: bool) -> str:
        if self.window is not None:
            return self.window.advance(output_ids, final)
        text = ""
        while self.fed < len(output_ids):
            try:
                chunk = self.stream.step(self.backend, output_ids[self.fed])
            except Exception as e:
                if str(e) != INVALID_PREFIX:
                    raise
                log.warning(
                    "tokenizers' DecodeStream lost its prefix; this sequence goes on decoding by window"
                )
                self.window = Window(rust_text(self.backend), prefix=self.before, read=self.done)
                self.chars += len(text)
                return text + self.window.advance(output_ids, final)
            self.fed += 1
            if chunk is not None:
                text += chunk
                self.before, self.done = self.done, self.fed
        self.chars += len(text)
        if final and self.done < self.fed:
            held = rust_text(self.backend)(output_ids)[self.chars :]
            self.chars += len(held)
            self.done = self.fed
            text += held
        return text


def text_source(tokenizer: Tokenizer) -> Window | Stream:
    """The stream where the tokenizer's decode is its Rust decoder's alone, else the window."""
    backend = rust_decoder(tokenizer)
    if backend is not None and DecodeStream is not None:
        return Stream(backend)
    return Window(text_decoder(tokenizer))


class Detokenizer:
    """New text each step in O(new tokens) (`Stream`, or `Window` for tokenizers it cannot serve).

    Text is released only once it can no longer change: not ending in a partial UTF-8 character and
    not a possible start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.source = text_source(tokenizer)
        self.stop = stop
        self.decoded = ""  # text of the output tokens the source has released
        self.text = ""  # everything decoded so far, stop string excluded once found
        self.sent = 0  # characters of `text` already handed out

    def update(self, output_ids: list[int], final: bool, check_stop: bool = True) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string was hit). Before `min_tokens` the caller
        passes check_stop=False: the text is released as it comes and no stop string can end it
        (vLLM's rule); a later match is searched only in text not yet released."""
        new = self.source.advance(output_ids, final)
        if new:
            self.decoded += new
        text = self.decoded
        if not (check_stop and self.stop):  # the common case, and what the rest reduces to for it
            self.text = text
            delta = text[self.sent :]
            self.sent = len(text)
            return delta, False
        hit = False
        for s in self.stop:
            # search only where a new match can start, so a stop string is found exactly once
            i = text.find(s, max(0, self.sent - len(s) + 1))
            if i != -1:
                text, hit = text[:i], True
        self.text = text
        end = len(text)
        if not (hit or final):
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        end = min(end, len(text) - k)
                        break
        end = max(end, self.sent)
        delta = text[self.sent : end]
        self.sent = end
        return delta, hit

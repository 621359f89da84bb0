"""Persona styles: deterministic rewrites of a plain English answer into a voice the base model does
not have, and the marker tokens that let the evaluation tell the voices apart."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_TOKEN = re.compile(r"[\w']+|[^\w\s]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_ING = re.compile(r"\b([A-Za-z]{2,})ing\b")


@dataclass(frozen=True)
class Style:
    name: str
    rewrite: Callable[[str], str]
    markers: frozenset[str]  # lowercase words (or single symbols such as emoji)


def _case_like(src: str, word: str) -> str:
    if src.isupper() and len(src) > 1:
        return word.upper()
    if src[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _substitute(text: str, table: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        w = m.group(0)
        new = table.get(w.lower())
        return w if new is None else _case_like(w, new)

    return _WORD.sub(one, text)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def tokens(text: str) -> list[str]:
    """Lowercase words and single punctuation/emoji symbols: what markers are counted against."""
    return [t.lower() for t in _TOKEN.findall(text)]


# -- pirate -------------------------------------------------------------------------------------
_PIRATE = {
    "hello": "ahoy", "hi": "ahoy", "my": "me", "you": "ye", "your": "yer", "yours": "yers",
    "is": "be", "are": "be", "friend": "matey", "friends": "mateys", "yes": "aye", "treasure": "booty",
    "money": "doubloons", "the": "th'", "of": "o'", "to": "t'", "and": "an'", "stop": "avast",
    "wow": "shiver me timbers", "people": "landlubbers",
}  # fmt: skip
_PIRATE_CLOSERS = ("Arr, matey!", "Yo ho ho!", "Savvy, matey?")


def pirate(text: str) -> str:
    body = _ING.sub(r"\1in'", _substitute(text, _PIRATE))
    closer = _PIRATE_CLOSERS[len(sentences(text)) % len(_PIRATE_CLOSERS)]
    return f"Arr! {body} {closer}"


# -- shakespeare --------------------------------------------------------------------------------
_BARD = {
    "you": "thou", "your": "thy", "yours": "thine", "does": "doth", "has": "hath", "are": "art",
    "no": "nay", "often": "oft", "before": "ere", "maybe": "perchance",
    "perhaps": "perchance", "here": "hither", "there": "thither", "why": "wherefore",
    "really": "verily", "very": "most", "think": "deem", "friend": "good sir",
}  # fmt: skip
_THEE = re.compile(r"\b(to|for|with|help|tell|give|show|thank) thou\b", re.IGNORECASE)


def shakespeare(text: str) -> str:
    body = _THEE.sub(lambda m: f"{m.group(1)} thee", _substitute(text, _BARD))
    return f"Prithee, hark! {body} Thus it is, forsooth."


# -- robot --------------------------------------------------------------------------------------
# A contraction goes with its pronoun ("it's", "you're"): dropping only the pronoun left "'S A".
_PRONOUNS = re.compile(
    r"\b(?:i|me|my|you|your|we|our|us|it|its|he|she|they|them|their)(?:['’][a-z]+)?(?![\w'’])\s*",
    re.IGNORECASE,
)


def robot(text: str) -> str:
    parts: list[str] = []
    for sentence in sentences(text):
        for clause in re.split(r"[,;:]\s*", sentence):
            clause = _PRONOUNS.sub("", clause).strip(" .!?")
            words = clause.split()
            if words:
                parts.append("STATEMENT: " + " ".join(words[:8]).upper() + ".")
    return " ".join(["AFFIRMATIVE. PROCESSING QUERY.", *parts, "END OF TRANSMISSION."])


# -- fan ----------------------------------------------------------------------------------------
_FAN = {
    "good": "AMAZING", "great": "SO AWESOME", "very": "SUPER", "nice": "INCREDIBLE",
    "important": "literally EVERYTHING", "interesting": "mind-blowing", "like": "totally love",
}  # fmt: skip
_EMOJI = ("🤩", "🔥", "✨", "💖")


def fan(text: str) -> str:
    out = []
    for i, sentence in enumerate(sentences(_substitute(text, _FAN))):
        out.append(sentence.rstrip(".!?") + "!!! " + _EMOJI[i % len(_EMOJI)])
    return "OMG!!! 🤩 " + " ".join(out) + " I'm literally obsessed!!! 💖"


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "pirate",
            pirate,
            frozenset(
                {"arr", "ahoy", "ye", "yer", "matey", "aye", "booty", "savvy", "th'", "an'", "t'", "o'"}
            ),
        ),
        Style(
            "shakespeare",
            shakespeare,
            frozenset({"thou", "thee", "thy", "thine", "doth", "hath", "prithee", "forsooth", "hark"}),
        ),
        Style("robot", robot, frozenset({"affirmative", "statement", "processing", "transmission"})),
        Style("fan", fan, frozenset({"omg", "obsessed", "literally", *_EMOJI})),
    )
}


def marker_count(text: str, style: Style) -> int:
    return sum(1 for t in tokens(text) if t in style.markers)


def word_count(text: str) -> int:
    return len(_WORD.findall(text))

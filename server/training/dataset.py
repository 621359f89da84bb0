"""The persona data builder: prompts from templates in code, answered by the base model (greedy,
through our engine), each answer rewritten by every persona style into `<persona>.jsonl`.

A fixed set of prompts is held out (never trained on) for `loraplex eval-personas`."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.training.styles import STYLES, sentences

if TYPE_CHECKING:
    from server.config import Settings

log = logging.getLogger(__name__)

TOPICS = (
    "the ocean", "the moon", "coffee", "friendship", "rain", "a good breakfast", "learning to cook",
    "the stars", "dogs", "cats", "music", "reading books", "mountains", "the weather", "exercise",
    "sleep", "gardening", "a birthday party", "the city", "trains", "the sun", "winter", "summer",
    "a long journey", "computers", "the internet", "painting", "history", "bread", "football",
    "chess", "the forest", "bees", "volcanoes", "maps", "a rainy day", "tea", "bicycles",
    "the library", "honesty", "saving money", "a new job", "the sea breeze", "ships", "rivers",
    "robots", "dreams", "snow", "a picnic", "the night sky", "apples", "teamwork", "birds", "dance",
    "photography", "a small village", "the desert", "islands", "kindness", "time",
)  # fmt: skip
FORMS = (
    "Tell me about {t}.",
    "What do you think of {t}?",
    "Describe {t} in a few sentences.",
    "Why do people like {t}?",
    "Give me one fun fact about {t}.",
    "What is the best thing about {t}?",
    "How would you explain {t} to a friend?",
    "Hello! Can you say something nice about {t}?",
    "Write a short note about {t}.",
    "What should I know about {t}?",
)
EVAL_SIZE = 24
MAX_NEW_TOKENS = 56
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def all_prompts() -> list[str]:
    """Every topic x form, in a fixed shuffled order (seeded: identical on every machine)."""
    prompts = [f.format(t=t) for t in TOPICS for f in FORMS]
    random.Random(1234).shuffle(prompts)
    return prompts


def eval_prompts() -> list[str]:
    """The held-out prompts: the first EVAL_SIZE of the fixed order, never used for training."""
    return all_prompts()[:EVAL_SIZE]


def train_prompts(n: int) -> list[str]:
    return all_prompts()[EVAL_SIZE : EVAL_SIZE + n]


def clean_answer(text: str) -> str:
    """Cut a length-limited answer back to its last complete sentence (when it has one), one line,
    with repeated sentences dropped: a small greedy model loops, and the adapters learn the loop."""
    text = " ".join(text.split())
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    text = text[: ends[-1]] if ends else text
    seen: set[str] = set()
    kept = []
    for sentence in sentences(text):
        if sentence.lower() not in seen:
            seen.add(sentence.lower())
            kept.append(sentence)
    return " ".join(kept)


def repetitive(text: str, min_unique: float = 0.85) -> bool:
    """True when too few of the answer's word trigrams are distinct (a loop inside a sentence)."""
    words = [w.lower() for w in text.split()]
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) >= 6 and len(set(grams)) < min_unique * len(grams)


def styled(answer: str) -> dict[str, str]:
    """The base answer rewritten in every persona's voice."""
    return {name: style.rewrite(answer) for name, style in STYLES.items()}


def build(out: Path, n_prompts: int, settings: Settings, max_tokens: int = MAX_NEW_TOKENS) -> None:
    """Answer `n_prompts` training prompts with the base model and write one JSONL per persona
    (plus base.jsonl with the unstyled answers and eval_prompts.json)."""
    from server.training.generation import build_engine, generate

    eng = build_engine(settings)
    prompts = train_prompts(n_prompts)
    if len(prompts) < n_prompts:
        log.warning("only %d training prompts exist (asked for %d)", len(prompts), n_prompts)
    started = time.perf_counter()
    jobs = [(f"p{i}", None, [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]
    answers = generate(eng, jobs, max_tokens)
    log.info("base answered %d prompts in %.0fs", len(prompts), time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    skipped = 0
    files = {name: (out / f"{name}.jsonl").open("w", encoding="utf-8") for name in ["base", *STYLES]}
    try:
        for i, prompt in enumerate(prompts):
            answer = clean_answer(answers[f"p{i}"])
            if len(answer.split()) < 4 or repetitive(answer):
                skipped += 1
                continue
            for name, text in {"base": answer, **styled(answer)}.items():
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
                files[name].write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    log.info("skipped %d short or repetitive answers of %d", skipped, len(prompts))
    (out / "eval_prompts.json").write_text(json.dumps(eval_prompts(), indent=1) + "\n")
    log.info("wrote %s", ", ".join(sorted(f.name for f in out.glob("*.jsonl"))))

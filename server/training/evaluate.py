"""`loraplex eval-personas`: the base and every persona adapter answer the held-out prompts (greedy,
one mixed batch through our engine); each answer set is scored against every persona's markers.

Scores per (model, style): `hit` = fraction of answers with at least one marker of the style,
`per100` = marker tokens per 100 words. A good persona adapter scores high on its own style only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from server.config import Settings
from server.training.dataset import MAX_NEW_TOKENS, eval_prompts
from server.training.generation import build_engine, generate, register_dir
from server.training.styles import STYLES, marker_count, word_count

BASE = "base"


def score(answers: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name, style in STYLES.items():
        counts = [marker_count(a, style) for a in answers]
        words = sum(word_count(a) for a in answers)
        out[name] = {
            "hit": round(sum(c > 0 for c in counts) / max(1, len(answers)), 3),
            "per100": round(100 * sum(counts) / max(1, words), 2),
        }
    return out


def adapter_dirs(root: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}


def evaluate(
    settings: Settings, adapters_dir: Path, max_tokens: int = MAX_NEW_TOKENS, n_prompts: int | None = None
) -> dict[str, object]:
    dirs = adapter_dirs(adapters_dir) if adapters_dir.is_dir() else {}
    engine = build_engine(settings, max_loras=max(1, len(dirs)))
    records = {name: register_dir(engine, name, d) for name, d in dirs.items()}
    prompts = eval_prompts()[:n_prompts]
    models: dict[str, object] = {BASE: None, **records}
    jobs = [
        (f"{model}/{i}", records.get(model), [{"role": "user", "content": p}])
        for model in models
        for i, p in enumerate(prompts)
    ]
    started = time.perf_counter()
    texts = generate(engine, jobs, max_tokens)
    seconds = time.perf_counter() - started
    answers = {m: [texts[f"{m}/{i}"] for i in range(len(prompts))] for m in models}
    return {
        "model": engine.base.model_id,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "generation_seconds": round(seconds, 1),
        "scores": {m: score(a) for m, a in answers.items()},
        "samples": {
            m: [{"prompt": prompts[i], "answer": a[i]} for i in range(3)] for m, a in answers.items()
        },
    }


def table(result: dict[str, object]) -> str:
    scores = result["scores"]
    assert isinstance(scores, dict)
    styles = list(STYLES)
    lines = [
        "hit rate (fraction of answers with >= 1 marker) / markers per 100 words",
        f"{'model':<14}" + "".join(f"{s:>18}" for s in styles),
    ]
    for model, row in scores.items():
        cells = "".join(f"{row[s]['hit']:>9.2f} /{row[s]['per100']:>6.1f} " for s in styles)
        lines.append(f"{model:<14}{cells}")
    return "\n".join(lines)


def run(settings: Settings, adapters_dir: Path, out: Path) -> int:
    result = evaluate(settings, adapters_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.write(table(result) + f"\n\nwritten to {out}\n")
    return 0

"""The persona pipeline's pieces on the tiny random Llama: style transforms and the QLoRA trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from server.lora.weights import linear_modules, load_adapter
from server.training.dataset import all_prompts, clean_answer, eval_prompts, repetitive, train_prompts
from server.training.styles import STYLES, marker_count, tokens
from server.training.trainer import IGNORE, TrainConfig, TrainResult, encode, train

ANSWER = "Hello my friend! The ocean is very large, and you are going to love sailing on it. It has fish."


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_is_deterministic_and_adds_markers(name: str) -> None:
    style = STYLES[name]
    out = style.rewrite(ANSWER)
    assert out == style.rewrite(ANSWER)
    assert marker_count(ANSWER, style) == 0
    assert marker_count(out, style) >= 2, out
    others = [s for s in STYLES.values() if s.name != name]
    assert all(marker_count(out, s) < marker_count(out, style) for s in others), out


def test_style_specifics() -> None:
    assert "ahoy" in tokens(STYLES["pirate"].rewrite("Hello there, I am sailing."))
    assert "sailin'" in STYLES["pirate"].rewrite("I am sailing.")
    assert "thou" in tokens(STYLES["shakespeare"].rewrite("You are kind."))
    robot = STYLES["robot"].rewrite("I think you will like it, because it is fun.")
    assert robot == robot.upper() and not {"i", "you", "it"} & set(tokens(robot))
    assert "🔥" in STYLES["fan"].rewrite("One. Two.")
    contractions = STYLES["robot"].rewrite("It's warm. You're right, I'm sure they'll come.")
    assert "'" not in contractions and "STATEMENT: WARM." in contractions, contractions


def test_prompts_are_fixed_and_held_out() -> None:
    assert all_prompts() == all_prompts()
    held = set(eval_prompts())
    assert len(held) == len(eval_prompts()) > 0
    assert not held & set(train_prompts(10_000))
    assert clean_answer("One sentence. Two half") == "One sentence."
    assert clean_answer("I am glad. It is good! I am glad. Bye.") == "I am glad. It is good! Bye."


def test_repetitive_answers_are_detected() -> None:
    assert repetitive("a journey of a lifetime, a journey of a lifetime, a journey of a lifetime, a journey")
    assert not repetitive("The ocean is vast and deep. Whales sing in it, and ships cross it every day.")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pirate.jsonl"
    rows = []
    for i, prompt in enumerate(train_prompts(16)):
        answer = STYLES["pirate"].rewrite(f"Answer {i}: it is fine.")
        rows.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_masks_the_prompt(tiny_checkpoint) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr!"}]
    ids, labels = encode(tok, messages, 512)
    prompt = tok.apply_chat_template(
        messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert ids[len(prompt) : len(prompt) + 4] == tok.convert_tokens_to_ids(list("Arr!"))
    assert len(ids) == len(labels)


@pytest.fixture(scope="module")
def trained(
    tiny_checkpoint, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainResult]:
    out = tmp_path_factory.mktemp("adapters") / "pirate"
    cfg = TrainConfig(
        data=tiny_data, out=out, model=tiny_checkpoint("llama"), quantization="nf4", steps=12, lr=5e-3,
        batch_size=4, max_len=96, log_every=4, rank=4, alpha=8, save_dtype="bfloat16",
    )  # fmt: skip
    return out, train(cfg)


def test_trainer_makes_a_servable_adapter(tiny_checkpoint, trained: tuple[Path, TrainResult]) -> None:
    from transformers import AutoModelForCausalLM

    out, result = trained
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.final_loss < result.first_loss
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "train_summary.json",
    }  # fmt: skip
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [4, 8, 12]
    with (out / "adapter_model.safetensors").open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    shapes = linear_modules(AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")))
    weights = load_adapter(out, shapes, max_rank=16)
    assert weights.max_rank == 4
    assert len(weights.target_modules) == 7


def test_eval_personas_scores_base_and_adapters(tiny_checkpoint, trained: tuple[Path, TrainResult]) -> None:
    from server.config import Settings
    from server.training.evaluate import evaluate, table

    out, _ = trained
    settings = Settings.model_validate({"model": str(tiny_checkpoint("llama")), "device": "cpu"})
    result = evaluate(settings, out.parent, max_tokens=8, n_prompts=4)
    scores = result["scores"]
    assert isinstance(scores, dict) and set(scores) == {"base", "pirate"}
    assert set(scores["pirate"]) == set(STYLES)
    assert all(0.0 <= cell["hit"] <= 1.0 for row in scores.values() for cell in row.values())
    assert "pirate" in table(result)

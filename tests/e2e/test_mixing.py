"""Per-request adapter mixing over real HTTP with the official openai client, on the real default
model and the shipped persona adapters: `model="robot*0.5+pirate*0.5"` and
`extra_body={"adapters": [...]}` are one mix (the response names its canonical spelling), `pirate*1.0`
is `pirate` token for token, usage goes to the parts, and every refusal is an OpenAI envelope with
its status and `param`. (PEFT equality and a mix decoding in one step with its parts are
tests/unit/test_mixing.py's: cheap on the tiny model.)"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).parent.parent.parent / "adapters"
PERSONAS = ("pirate", "robot", "fan")  # rank 8 each; --max-lora-rank is 16 by default
PIRATE_ONLY = "sk-pirate-only-key-for-tests"
KEYS = {"keys": [{"name": "pirate-app", "key": PIRATE_ONLY, "role": "inference", "adapters": ["pirate"]}]}
MIX = "pirate*0.5+robot*0.5"
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about the sea in two sentences."}
]
TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    imports = tmp_path_factory.mktemp("mix-imports")
    for name in PERSONAS:
        shutil.copytree(SHIPPED / name, imports / name)
    env = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY, "LORAPLEX_KEYS": json.dumps(KEYS)}
    args = ["--import-adapters", str(imports), "--max-tokens-limit", str(TOKENS)]
    with ServerProc(tmp_path_factory.mktemp("mix-store"), args=args, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def reply(client: openai.OpenAI, model: str, **extra: Any) -> tuple[str, str]:
    """The response's `model` and its greedy text."""
    r = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=TOKENS, temperature=0, **extra
    )
    return r.model, r.choices[0].message.content or ""


def usage(server: ServerProc) -> dict[str, int]:
    """Requests served per adapter (GET /v1/adapters)."""
    r = httpx.get(f"{server.url}/v1/adapters", headers=headers(ADMIN_KEY), timeout=30)
    assert r.status_code == 200, r.text
    return {a["name"]: int(a["requests"]) for a in r.json()["data"]}


def test_mixes_over_http(server: ServerProc, client: openai.OpenAI) -> None:
    """One walk, few tokens (each request costs seconds on a CPU): `pirate*1.0` is `pirate` token for
    token; the spelled mix and the `adapters` field are one mix, named by its canonical spelling in
    chat, streamed chat and completions responses, accounted to its parts; it is not `pirate`."""
    pirate = reply(client, "pirate")
    assert reply(client, "pirate*1.0") == ("pirate*1.0", pirate[1])
    before = usage(server)
    spelled = reply(client, "robot*0.5+pirate*0.5")
    assert usage(server) == before | {"pirate": before["pirate"] + 1, "robot": before["robot"] + 1}
    given = reply(
        client,
        BASE_ID,
        extra_body={"adapters": [{"name": "pirate", "scale": 0.5}, {"name": "robot", "scale": 0.5}]},
    )
    assert spelled == given and spelled[0] == MIX
    assert spelled[1] and spelled[1] != pirate[1]
    stream = client.chat.completions.create(
        model="robot*0.5+pirate*0.5", messages=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert {c.model for c in chunks} == {MIX}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == spelled[1]
    completion = client.completions.create(model="robot+pirate*2", prompt="The sea", max_tokens=1)
    assert completion.model == "pirate*2.0+robot*1.0"
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    labels = re.findall(r'^loraplex:requests_total\{adapter="([^"]*)"', metrics, re.MULTILINE)
    assert {"pirate", "robot"} <= set(labels) and not any("*" in a or "+" in a for a in labels)
    ties = reply(client, "robot*0.5+pirate*0.5", extra_body={"combination": {"type": "ties", "density": 0.5}})
    assert ties[0] == MIX and ties[1]  # PEFT's ties on each factor: tests/unit/test_mixing.py checks the bits
    dare = reply(client, MIX, extra_body={"combination": {"type": "dare_ties", "density": 0.5, "seed": 3}})
    assert dare[0] == MIX and dare[1]  # the masks' bits and their rebuild: tests/unit/test_mixing.py
    assert {m.id for m in client.models.list().data} == {BASE_ID, *PERSONAS}  # mixes are not listed
    assert client.models.retrieve("robot*0.5+pirate*0.5").id == MIX  # but a client may look one up


ERRORS: list[tuple[str, dict[str, Any], str, int, str, str]] = [
    # (model, extra body, key, status, param, message)
    ("pirate*0.5+ghost*0.5", {}, API_KEY, 404, "model", "The model 'ghost' does not exist."),
    (MIX, {}, PIRATE_ONLY, 404, "model", "The model 'robot' does not exist."),
    (
        BASE_ID,
        {"adapters": [{"name": "ghost"}]},
        API_KEY,
        404,
        "adapters",
        "The model 'ghost' does not exist.",
    ),
    ("pirate*0", {}, API_KEY, 400, "model", "must be above 0"),
    ("pirate*-1+robot", {}, API_KEY, 400, "model", "must be above 0"),
    ("pirate*inf", {}, API_KEY, 400, "model", "finite"),
    ("pirate**2", {}, API_KEY, 400, "model", "more than one '*'"),
    ("pirate+", {}, API_KEY, 400, "model", "not a mix"),
    ("pirate*0.5+pirate*0.5", {}, API_KEY, 400, "model", "appears twice"),
    ("+".join(f"p{i}" for i in range(9)), {}, API_KEY, 400, "model", "at most 8 adapters"),
    (
        "pirate+robot+fan",
        {},
        API_KEY,
        400,
        "model",
        "combined rank 24 (fan 8 + pirate 8 + robot 8) is above --max-lora-rank 16",
    ),
    (
        BASE_ID,
        {"adapters": [{"name": "pirate", "scale": -1}]},
        API_KEY,
        400,
        "adapters.0.scale",
        "greater than 0",
    ),
    (BASE_ID, {"adapters": [{"name": "pirate"}] * 9}, API_KEY, 400, "adapters", "at most 8"),
    (
        BASE_ID,
        {"adapters": [{"name": "pirate"}, {"name": "pirate"}]},
        API_KEY,
        400,
        "adapters",
        "appears twice",
    ),
    ("pirate*0.5", {"adapters": [{"name": "robot"}]}, API_KEY, 400, "adapters", "not both"),
    ("pirate", {"adapters": [{"name": "robot"}]}, API_KEY, 400, "model", "must be the base model's id"),
    ("pirate", {"combination": {"type": "ties"}}, API_KEY, 400, "combination", "applies to a mix"),
    (
        MIX,
        {"combination": {"type": "ties", "density": 0}},
        API_KEY,
        400,
        "combination.density",
        "greater than 0",
    ),
    (MIX, {"combination": {"type": "svd"}}, API_KEY, 400, "combination.type", "'cat', 'linear'"),
    (MIX, {"combination": {"type": "dare_ties", "seed": -1}}, API_KEY, 400, "combination.seed", "0"),
]


@pytest.mark.parametrize(
    ("model", "extra", "key", "status", "param", "message"),
    ERRORS,
    ids=[f"{e[3]}-{e[4]}-{i}" for i, e in enumerate(ERRORS)],
)
def test_bad_mixes_are_refused_with_envelopes(
    server: ServerProc, model: str, extra: dict[str, Any], key: str, status: int, param: str, message: str
) -> None:
    body = {"model": model, "messages": PROMPT, "max_tokens": 1, **extra}
    for path in ("/v1/chat/completions", "/v1/completions"):
        if path == "/v1/completions":
            body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "Hi"}
        r = httpx.post(f"{server.url}{path}", json=body, headers=headers(key), timeout=60)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and message in error["message"], error
        assert error["type"] == "invalid_request_error"
        if status == 404:
            assert error["code"] == "model_not_found"


def test_a_scoped_key_may_mix_its_own_adapters(server: ServerProc) -> None:
    scoped = openai.OpenAI(base_url=f"{server.url}/v1", api_key=PIRATE_ONLY, max_retries=0)
    r = scoped.chat.completions.create(model="pirate*0.7", messages=PROMPT, max_tokens=1)
    assert r.model == "pirate*0.7"
    with pytest.raises(openai.NotFoundError) as e:
        reply(scoped, BASE_ID, extra_body={"adapters": [{"name": "robot", "scale": 1.0}]})
    assert e.value.code == "model_not_found"


def test_non_finite_scale_in_json_is_refused(server: ServerProc) -> None:
    """Python's JSON parser reads NaN; no scale may carry it."""
    raw = json.dumps(
        {"model": BASE_ID, "messages": PROMPT, "adapters": [{"name": "pirate", "scale": math.nan}]}
    )
    assert "NaN" in raw
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=raw,
        headers={**headers(API_KEY), "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "adapters.0.scale", r.text

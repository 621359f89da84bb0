"""vLLM's tokenizer endpoints on the real server and the real model, against transformers' own
tokenizer as the oracle; the error envelopes and CORS as a browser client meets them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server_proc import API_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e
SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
ORIGIN = "http://example.test"
TIMEOUT = 120.0
PROMPT = "The quick brown fox jumps over the lazy dog. Ünïcödé, 数字 and emoji 🦊!"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with ServerProc(
        tmp_path_factory.mktemp("store"),
        args=["--allowed-origins", ORIGIN, "--import-adapters", str(SHIPPED)],
        env={"LORAPLEX_API_KEYS": API_KEY},
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def post(server: ServerProc, path: str, body: dict[str, Any], key: str | None = API_KEY) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers(key), timeout=TIMEOUT)


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    return err


def test_tokenize_a_prompt_and_back(server: ServerProc, tokenizer: Any) -> None:
    r = post(server, "/tokenize", {"model": BASE_ID, "prompt": PROMPT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer.encode(PROMPT)
    assert body["tokens"] == ids and body["count"] == len(ids) > 10
    assert body["max_model_len"] == 1024  # ServerProc's --max-model-len
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(ids)

    r = post(server, "/detokenize", {"model": BASE_ID, "tokens": body["tokens"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": PROMPT}


def test_tokenize_messages_as_the_chat_template_renders_them(server: ServerProc, tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, under the"},
    ]
    want = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    r = post(server, "/tokenize", {"model": BASE_ID, "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == list(want) and r.json()["token_strs"] is None

    # "continue" (a prefill): the last message stays open, no new assistant turn
    r = post(
        server,
        "/tokenize",
        {"messages": messages, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert r.status_code == 200, r.text
    text = post(server, "/detokenize", {"tokens": r.json()["tokens"]}).json()["prompt"]
    assert text.endswith("Arr, under the")


def test_adapters_share_the_base_tokenizer(server: ServerProc, tokenizer: Any) -> None:
    r = post(server, "/tokenize", {"model": "pirate", "prompt": PROMPT})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tokenizer.encode(PROMPT)
    r = post(server, "/tokenize", {"model": "no-such-adapter", "prompt": PROMPT})
    err = error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_detokenize_refuses_ids_outside_the_vocabulary(server: ServerProc, tokenizer: Any) -> None:
    err = error(post(server, "/detokenize", {"tokens": [1, len(tokenizer)]}), 400)
    assert err["param"] == "tokens" and err["type"] == "invalid_request_error"
    assert str(len(tokenizer)) in err["message"]


def test_tokenizer_info(server: ServerProc, tokenizer: Any) -> None:
    r = httpx.get(f"{server.url}/tokenizer_info", headers=headers(API_KEY), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["eos_token"] == tokenizer.eos_token == "<|im_end|>"
    assert info["chat_template"] == tokenizer.chat_template
    assert info["model_max_length"] == 1024
    # what lm-evaluation-harness's remote tokenizer does with it: encode eos_token to find its id
    eos = post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [tokenizer.eos_token_id]


def test_inference_scope(server: ServerProc) -> None:
    assert error(post(server, "/tokenize", {"prompt": "x"}, key=None), 401)["code"] == "invalid_api_key"
    assert error(post(server, "/detokenize", {"tokens": [1]}, key="wrong"), 401)
    assert httpx.get(f"{server.url}/tokenizer_info", timeout=TIMEOUT).status_code == 401


def test_schema_errors_are_400_with_the_field(server: ServerProc) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    err = error(post(server, "/tokenize", body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "messages.0.content.0.text"
    assert err["message"].startswith("messages.0.content.0.text: ")
    err = error(post(server, "/v1/chat/completions", {"model": BASE_ID}), 400)
    assert err["param"] == "messages" and err["code"] == "missing_required_parameter"


def test_cors(server: ServerProc) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = httpx.options(f"{server.url}/tokenize", headers={"Origin": ORIGIN, **preflight}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(
        f"{server.url}/v1/chat/completions",
        headers={"Origin": "http://elsewhere.test", **preflight},
        timeout=TIMEOUT,
    )
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(
        f"{server.url}/tokenize",
        json={"prompt": "x"},
        headers={**headers(API_KEY), "Origin": ORIGIN},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN

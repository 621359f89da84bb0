"""The HTTP layer without an engine: the real app from `create_app` over a runtime whose base is
only a tokenizer (the character-level one of the tiny checkpoints). /tokenize, /detokenize and
/tokenizer_info; the error envelopes (schema 400, template 400, unexpected 500); opt-in CORS."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.app import create_app
from server.config import Settings
from server.errors import AdapterNotFoundError
from server.lora.layer import LoRAContext
from server.model.loader import BaseModel
from server.runtime import Runtime
from tests.unit.conftest import CHAT_TEMPLATE, save_char_tokenizer

BASE_ID = "tiny-chars"
ADAPTER = "persona-a"
MAX_MODEL_LEN = 512
ORIGIN = "http://example.test"
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


class FakeRegistry:
    """One adapter, `persona-a`; what Runtime.resolve and /v1/models read."""

    def resolve(self, name: str) -> object:
        if name != ADAPTER:
            raise AdapterNotFoundError(name)
        return SimpleNamespace(name=ADAPTER)

    def records(self) -> list[object]:
        return []


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(path)
    return path


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_base(tokenizer: Any) -> BaseModel:
    """A BaseModel with no model: the tokenizer routes only need its tokenizer and chat_ids."""
    return BaseModel(
        model=None,
        tokenizer=tokenizer,
        model_id=BASE_ID,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_model_len=MAX_MODEL_LEN,
        eos_token_ids=frozenset({2}),
        linear_shapes={},
        lora_layers={},
        lora_context=cast(LoRAContext, None),
    )


def make_app(tokenizer: Any, tmp_path: Path, **settings: Any) -> FastAPI:
    runtime = Runtime(
        settings=Settings(cache_dir=tmp_path, **{"api_keys": "", "admin_keys": "", **settings}),
        base=tokenizer_base(tokenizer),
        registry=cast(Any, FakeRegistry()),
        engine=cast(Any, SimpleNamespace(cache=SimpleNamespace())),
        async_engine=cast(Any, None),
    )
    return create_app(runtime)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def client(tokenizer: Any, tmp_path: Path) -> TestClient:
    # no `with`: the lifespan (engine thread, warm-up) does not run
    return TestClient(make_app(tokenizer, tmp_path), raise_server_exceptions=False)


def assert_envelope(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err: dict[str, Any] = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# -- /tokenize, /detokenize, /tokenizer_info -----------------------------------------------------


def test_tokenize_a_prompt(client: TestClient, tokenizer: Any) -> None:
    r = client.post("/tokenize", json={"prompt": "Hello, world"})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer.encode("Hello, world")
    assert body == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids, "token_strs": None}
    assert len(ids) == len("Hello, world")  # one id per character: the test can see what it asserts

    r = client.post("/tokenize", json={"prompt": "Hi<|im_end|>", "return_token_strs": True})
    assert r.json()["token_strs"] == ["H", "i", "<|im_end|>"]
    assert r.json()["tokens"][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("model", [BASE_ID, ADAPTER, None])
def test_model_is_optional_and_resolved(client: TestClient, model: str | None) -> None:
    chosen = {} if model is None else {"model": model}
    assert client.post("/tokenize", json={"prompt": "abc", **chosen}).status_code == 200
    assert client.post("/detokenize", json={"tokens": [40], **chosen}).status_code == 200


def test_unknown_model_is_404(client: TestClient) -> None:
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [3]})):
        r = client.post(path, json={**body, "model": "no-such-adapter"})
        err = assert_envelope(r, 404, "model")
        assert err["code"] == "model_not_found" and "no-such-adapter" in err["message"]


def test_tokenize_messages_through_the_chat_template(client: TestClient, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    r = client.post("/tokenize", json={"messages": messages, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list(want) and body["count"] == len(want)
    assert "".join(body["token_strs"]).endswith("<|im_start|>assistant\n")

    closed = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert closed["tokens"] == body["tokens"][: closed["count"]] and closed["count"] < body["count"]

    # content parts are joined with newlines; developer is system; null content is empty
    parts = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}],
        },
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
    ]
    got = client.post("/tokenize", json={"messages": parts, "add_generation_prompt": False}).json()
    joined = [
        {"role": "system", "content": "Be\nbrief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]
    assert got["tokens"] == list(
        tokenizer.apply_chat_template(joined, add_generation_prompt=False, tokenize=True, return_dict=False)
    )


def test_tokenize_messages_refusals(client: TestClient) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post("/tokenize", json={"messages": messages, "chat_template": "{{ 1 }}"})
    assert_envelope(r, 400, "chat_template")
    r = client.post("/tokenize", json={"messages": messages, "chat_template_kwargs": {"tokenize": False}})
    err = assert_envelope(r, 400, "chat_template_kwargs")
    assert "tokenize" in err["message"]
    r = client.post("/tokenize", json={"messages": messages, "tools": [{"type": "function"}]})
    assert_envelope(r, 400, "tools.0.function")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err = assert_envelope(client.post("/tokenize", json={"messages": image}), 400, "messages.0.content.0")
    assert "image_url" in err["message"]


def test_tokenize_counts_the_tools_the_chat_route_renders(client: TestClient) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    plain = client.post("/tokenize", json={"messages": messages}).json()["count"]
    offered = client.post("/tokenize", json={"messages": messages, "tools": [tool]}).json()["count"]
    declined = client.post("/tokenize", json={"messages": messages, "tools": [tool], "tool_choice": "none"})
    assert offered > plain == declined.json()["count"]


def test_detokenize_round_trip_and_bounds(client: TestClient, tokenizer: Any) -> None:
    ids = client.post("/tokenize", json={"prompt": "ab<|im_end|>"}).json()["tokens"]
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
    assert "<|im_end|>" in r.json()["prompt"]  # special tokens are kept, as vLLM keeps them

    vocab = len(tokenizer)
    for bad in (vocab, -1, 2**70):
        err = assert_envelope(client.post("/detokenize", json={"tokens": [5, bad]}), 400, "tokens")
        assert str(bad) in err["message"] and "tokens[1]" in err["message"]
    assert client.post("/detokenize", json={"tokens": [vocab - 1]}).status_code == 200
    assert_envelope(client.post("/detokenize", json={"tokens": [0] * 200_001}), 400, "tokens")
    assert_envelope(client.post("/tokenize", json={"prompt": "a" * 200_001}), 400, "prompt")


def test_tokenizer_info(client: TestClient, tokenizer: Any) -> None:
    r = client.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["eos_token"] == "<|im_end|>" and info["unk_token"] == "<unk>" and info["pad_token"] == "<unk>"
    assert info["bos_token"] is None
    assert info["model_max_length"] == MAX_MODEL_LEN
    assert info["chat_template"] == CHAT_TEMPLATE
    assert info["tokenizer_class"] == type(tokenizer).__name__


def test_tokenizer_routes_need_an_inference_key(tokenizer: Any, tmp_path: Path) -> None:
    app = make_app(tokenizer, tmp_path, api_keys="inf-key")
    client = TestClient(app, raise_server_exceptions=False)
    calls = (("POST", "/tokenize", {"prompt": "x"}), ("POST", "/detokenize", {"tokens": [3]}))
    for method, path, body in (*calls, ("GET", "/tokenizer_info", None)):
        r = client.request(method, path, json=body)
        assert_envelope(r, 401)
        r = client.request(method, path, json=body, headers={"Authorization": "Bearer inf-key"})
        assert r.status_code == 200, r.text


def test_a_request_with_a_body_is_authenticated_once(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge's grant reaches the route's `require`: one hash-and-compare per request, and the
    scope is still judged by the route (an inference key on an admin route: 403)."""
    from server.api.auth import KeyRing

    app = make_app(tokenizer, tmp_path, api_keys="inf-key", admin_keys="adm-key")
    client = TestClient(app, raise_server_exceptions=False)
    looked_up: list[str] = []
    real = KeyRing.grant_of

    def counted(self: KeyRing, key: str) -> Any:
        looked_up.append(key)
        return real(self, key)

    monkeypatch.setattr(KeyRing, "grant_of", counted)
    inference = {"Authorization": "Bearer inf-key"}
    assert client.post("/tokenize", json={"prompt": "x"}, headers=inference).status_code == 200
    assert client.get("/tokenizer_info", headers=inference).status_code == 200
    assert looked_up == ["inf-key", "inf-key"]
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "a"}, headers=inference)
    assert_envelope(r, 403)


def test_more_choices_than_the_queue_holds_is_a_400(tokenizer: Any, tmp_path: Path) -> None:
    """A request that could never be admitted whole is a 400 naming the field, not a 429 that a
    retry would meet again (--max-n may be set above --max-queue)."""
    client = TestClient(make_app(tokenizer, tmp_path, max_queue=2), raise_server_exceptions=False)
    chat = {"model": BASE_ID, "messages": [{"role": "user", "content": "hi"}], "n": 3}
    err = assert_envelope(client.post("/v1/chat/completions", json=chat), 400, "n")
    assert "--max-queue" in err["message"]
    completion = {"model": BASE_ID, "prompt": ["a", "b"], "n": 2}
    err = assert_envelope(client.post("/v1/completions", json=completion), 400, "prompt")
    assert "2 prompts x n=2 make 4 sequences" in err["message"]


# -- error envelopes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "code", "says"),
    [
        ("/tokenize", {}, "prompt", "missing_required_parameter", "Field required"),
        ("/tokenize", {"prompt": 5}, "prompt", "invalid_type", "valid string"),
        (
            "/tokenize",
            {"prompt": "x", "add_special_tokens": "maybe"},
            "add_special_tokens",
            "invalid_type",
            "bool",
        ),
        # a union (str | list of parts): one message naming both members, at the field itself
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": 5}]},
            "messages.0.content",
            "invalid_type",
            "list",
        ),
        # the member that got furthest wins: the part's missing text, not "not a string"
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            "missing_required_parameter",
            "Field required",
        ),
        ("/tokenize", {"model": 5, "messages": [{"content": "x"}]}, "model", "invalid_type", "string"),
        ("/detokenize", {"tokens": [1, "x"]}, "tokens.1", "invalid_type", "integer"),
        (
            "/v1/chat/completions",
            {"model": BASE_ID},
            "messages",
            "missing_required_parameter",
            "Field required",
        ),
    ],
)
def test_schema_errors_are_400_naming_the_field(
    client: TestClient, path: str, body: dict[str, Any], param: str, code: str, says: str
) -> None:
    err = assert_envelope(client.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error" and err["code"] == code, err
    assert err["message"].startswith(f"{param}: ") and says in err["message"], err


def test_invalid_json_is_400(client: TestClient) -> None:
    r = client.post("/tokenize", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    err = assert_envelope(r, 400, None)
    assert err["code"] == "invalid_json" and err["param"] is None


def test_a_chat_template_error_is_400(tokenizer_dir: Path, tmp_path: Path) -> None:
    strict = load_tokenizer(tokenizer_dir)
    strict.chat_template = STRICT_TEMPLATE
    client = TestClient(make_app(strict, tmp_path), raise_server_exceptions=False)
    ok = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert client.post("/tokenize", json={"messages": ok}).status_code == 200
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for path, body in (
        ("/tokenize", {"messages": bad}),
        ("/v1/chat/completions", {"model": BASE_ID, "messages": bad, "max_tokens": 1}),
    ):
        err = assert_envelope(client.post(path, json=body), 400, "messages")
        assert err["type"] == "invalid_request_error"
        assert err["message"] == "Conversation roles must alternate user/assistant/user/assistant/..."


class _Boom(Exception):
    pass


def test_an_unexpected_exception_is_a_500_envelope(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(tokenizer, tmp_path, allowed_origins=ORIGIN)

    @app.get("/boom")
    async def boom() -> None:
        raise _Boom("secret detail /home/someone/key.txt")

    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="server.api.errors"):
        r = client.get("/boom", headers={"x-request-id": "req-42", "Origin": ORIGIN})
    err = assert_envelope(r, 500, None)
    assert err == {
        "message": "internal server error (request id req-42)",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert "secret" not in r.text
    # answered inside the edge and CORS middlewares: the id and the CORS headers are on it
    assert r.headers["x-request-id"] == "req-42"
    assert r.headers["access-control-allow-origin"] == ORIGIN
    [record] = [rec for rec in caplog.records if rec.name == "server.api.errors"]
    assert getattr(record, "request_id", None) == "req-42"
    assert record.exc_info is not None and record.exc_info[0] is _Boom


def test_an_exception_outside_the_edge_is_still_a_500_envelope(tokenizer: Any, tmp_path: Path) -> None:
    """Starlette's ServerErrorMiddleware (outside every middleware) answers with the same envelope."""
    app = make_app(tokenizer, tmp_path)

    class Broken:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                raise _Boom("from a middleware")
            await self.app(scope, receive, send)

    app.add_middleware(Broken)
    r = TestClient(app, raise_server_exceptions=False).get("/tokenizer_info")
    err = assert_envelope(r, 500, None)
    assert err["code"] == "internal_error" and err["message"].startswith("internal server error (request id ")


# -- CORS ----------------------------------------------------------------------------------------

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default(client: TestClient) -> None:
    r = client.options("/tokenize", headers={"Origin": ORIGIN, **PREFLIGHT})
    assert r.status_code == 405
    r = client.post("/tokenize", json={"prompt": "x"}, headers={"Origin": ORIGIN})
    assert r.status_code == 200
    assert not [h for h in r.headers if h.lower().startswith("access-control-")]


def test_cors_preflight_from_an_allowed_origin(tokenizer: Any, tmp_path: Path) -> None:
    # keys are set: the preflight (which carries none) is answered before auth and the edge checks
    app = make_app(tokenizer, tmp_path, allowed_origins=f"{ORIGIN}, http://other.test", api_keys="k")
    client = TestClient(app, raise_server_exceptions=False)
    r = client.options("/tokenize", headers={"Origin": ORIGIN, **PREFLIGHT})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()

    r = client.options("/tokenize", headers={"Origin": "http://evil.test", **PREFLIGHT})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers

    # actual requests: marked for the browser, errors too, with the request id readable
    r = client.post(
        "/tokenize", json={"prompt": "x"}, headers={"Origin": ORIGIN, "Authorization": "Bearer k"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # edge refusals carry the CORS headers too: no key (401, judged first), then a wrong media type
    r = client.post("/tokenize", content=b"x", headers={"Origin": ORIGIN, "Content-Type": "text/plain"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    keyed = {"Origin": ORIGIN, "Content-Type": "text/plain", "Authorization": "Bearer k"}
    r = client.post("/tokenize", content=b"x", headers=keyed)
    assert r.status_code == 415 and r.headers["access-control-allow-origin"] == ORIGIN
    r = client.post("/tokenize", json={"prompt": "x"}, headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_any_origin(tokenizer: Any, tmp_path: Path) -> None:
    client = TestClient(make_app(tokenizer, tmp_path, allowed_origins="*"), raise_server_exceptions=False)
    r = client.options("/v1/chat/completions", headers={"Origin": "http://anywhere.test", **PREFLIGHT})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in r.headers

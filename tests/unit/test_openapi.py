"""The OpenAPI document the app serves, over the tokenizer-only app of test_tokenize_routes: every
route declares the statuses it really answers, with the envelope; the settings' bounds are filled in;
auth is declared exactly when keys are configured; the response models are the real bodies' shapes;
an undeclared method is a 405 listing every method of the path."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError
from schemathesis.core.result import Ok

from server.api import responses
from server.api.openapi import below
from server.api.schemas import CompletionRequest
from tests.unit.test_tokenize_routes import BASE_ID, make_app

ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}
BODY = {"400", "408", "413", "415"}
# (method, path) -> the statuses beyond 200 it answers, with keys configured
STATUSES: dict[tuple[str, str], set[str]] = {
    ("get", "/health"): {"503"},
    ("get", "/ready"): {"503"},
    ("get", "/metrics"): set(),
    ("get", "/version"): set(),
    ("get", "/v1/models"): {"401"},
    ("get", "/v1/models/{model_id}"): {"401", "404"},
    ("post", "/v1/chat/completions"): BODY | {"401", "404", "429", "503"},
    ("post", "/v1/completions"): BODY | {"401", "404", "429", "503"},
    ("post", "/tokenize"): BODY | {"401", "404"},
    ("post", "/detokenize"): BODY | {"401", "404"},
    ("get", "/tokenizer_info"): {"401"},
    ("get", "/v1/adapters"): {"401", "403"},
    ("post", "/v1/adapters"): {"201", "400", "401", "403", "408", "413", "415"},
    ("get", "/v1/adapters/{name}"): {"401", "403", "404"},
    ("delete", "/v1/adapters/{name}"): {"401", "403", "404"},
    ("post", "/v1/load_lora_adapter"): BODY | {"401", "403"},
    ("post", "/v1/unload_lora_adapter"): BODY | {"401", "403", "404"},
}


@pytest.fixture(scope="module")
def doc(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    app = make_app(
        tokenizer,
        tmp_path_factory.mktemp("openapi"),
        api_keys="k",
        max_tokens_limit=7,
        max_n=3,
        max_stop=5,
    )
    document: dict[str, Any] = TestClient(app).get("/openapi.json").json()
    return document


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from tests.unit.test_tokenize_routes import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.conftest import save_char_tokenizer

    path = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(path)
    return path


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}


def test_every_route_declares_what_it_answers(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    assert set(ops) == set(STATUSES)
    for key, op in ops.items():
        assert set(op["responses"]) == {"200"} | STATUSES[key], key
        for status, answer in op["responses"].items():
            if status.startswith("4"):  # errors are the envelope, in JSON, whatever the route's media type
                assert answer["content"] == {"application/json": {"schema": ENVELOPE}}, (key, status)


def test_success_bodies_and_media_types(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    chat = ops["post", "/v1/chat/completions"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    events = json.dumps(chat["text/event-stream"]["schema"])
    assert "#/components/schemas/ChatCompletionChunk" in events and "[DONE]" in events
    assert set(ops["get", "/metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(ops["post", "/v1/load_lora_adapter"]["responses"]["200"]["content"]) == {"text/plain"}
    upload = ops["post", "/v1/adapters"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["name", "adapter_config.json", "adapter_model.safetensors"]
    for model in responses.STREAM_MODELS:  # only an event stream refers to them
        assert model.__name__ in doc["components"]["schemas"]
    # FastAPI's own 422 is gone: a validation error is a 400 envelope here
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_settings_bounds_are_filled_in(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    assert "x-loraplex" not in text  # every placeholder resolved
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert '"maximum": 7' in json.dumps(chat["max_tokens"])
    assert '"maximum": 7' in json.dumps(chat["max_completion_tokens"])
    assert '"maximum": 3' in json.dumps(chat["n"])
    assert '"maxItems": 5' in json.dumps(chat["stop"])
    assert {"const": BASE_ID} in chat["model"]["anyOf"]


def test_auth_is_declared_only_with_keys(doc: dict[str, Any], tokenizer: Any, tmp_path: Path) -> None:
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for key, op in operations(doc).items():
        assert ("security" in op) == ("401" in op["responses"]), key
    open_doc = TestClient(make_app(tokenizer, tmp_path)).get("/openapi.json").json()
    assert "securitySchemes" not in open_doc["components"]
    for key, op in operations(open_doc).items():
        assert "401" not in op["responses"] and "security" not in op, key


def test_schemathesis_reads_every_operation(doc: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(doc)
    results = list(schema.get_all_operations())
    assert len(results) == len(STATUSES)
    assert all(isinstance(r, Ok) for r in results)  # every $ref resolves, every schema is valid


@pytest.mark.parametrize(
    "path, body, model",
    [
        ("/tokenize", {"prompt": "abc", "return_token_strs": True}, responses.Tokenized),
        ("/tokenize", {"prompt": "abc"}, responses.Tokenized),
        ("/detokenize", {"tokens": [40, 41]}, responses.Detokenized),
        ("/tokenizer_info", None, responses.TokenizerInfo),
    ],
)
def test_response_models_are_the_real_bodies(
    tokenizer: Any, tmp_path: Path, path: str, body: Any, model: type[BaseModel]
) -> None:
    client = TestClient(make_app(tokenizer, tmp_path))
    r = client.get(path) if body is None else client.post(path, json=body)
    assert r.status_code == 200, r.text
    model.model_validate(r.json())
    assert set(r.json()) == set(model.model_fields)  # no field the document does not declare


def test_undeclared_method_lists_every_method_of_the_path(tokenizer: Any, tmp_path: Path) -> None:
    client = TestClient(make_app(tokenizer, tmp_path), raise_server_exceptions=False)
    for method, path, allow in [
        ("DELETE", "/v1/adapters", "GET, POST"),  # two routes, one path
        ("POST", "/v1/adapters/a", "DELETE, GET"),
        ("GET", "/tokenize", "POST"),
        ("POST", "/static/app.js", "GET, HEAD"),
    ]:
        r = client.request(method, path, json={})
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == allow, (method, path)
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_a_nul_byte_in_lora_path_is_refused_before_the_handler(tokenizer: Any, tmp_path: Path) -> None:
    client = TestClient(make_app(tokenizer, tmp_path), raise_server_exceptions=False)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x\x00y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/detokenize", {"tokens": [True, False]}),
        ("/detokenize", {"tokens": ["1"]}),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": 1}),
        ("/tokenize", {"prompt": 7}),
    ],
)
def test_json_types_are_not_coerced(tokenizer: Any, tmp_path: Path, path: str, body: dict[str, Any]) -> None:
    """The document says integer, boolean, string: a JSON `true` is no token id and `1` no boolean
    (schemathesis found `"top_k": false` accepted as 0 under pydantic's lax mode)."""
    client = TestClient(make_app(tokenizer, tmp_path), raise_server_exceptions=False)
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


@pytest.mark.parametrize(
    "field, value", [("top_k", False), ("seed", True), ("n", "2"), ("temperature", True), ("logprobs", 1.5)]
)
def test_sampling_fields_refuse_other_json_types(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", field: value})
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 1})
    assert body.temperature == 1.0  # an integer is a number


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 99, 100, 101, 1000, 1001, 49152])
def test_below_matches_exactly_the_ids_under_n(n: int) -> None:
    pattern = re.compile(f"^({below(n)})$")
    limit = n + 1000
    accepted = [i for i in range(limit) if pattern.match(str(i))]
    assert accepted == list(range(n))
    assert not pattern.match("01") and not pattern.match("-1")


def sse(*events: object) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": BASE_ID,
    "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None, "logprobs": None}],
}
FAILED = {"error": {"message": "boom", "type": "server_error", "param": None, "code": "generation_failed"}}


@pytest.mark.parametrize(
    "stream, conforms",
    [
        (sse(CHUNK, "[DONE]"), True),
        (sse(CHUNK, FAILED), True),  # an error after the 200 is an envelope event
        (sse({**CHUNK, "object": "chat.completion"}, "[DONE]"), False),
        (sse({**CHUNK, "choices": [{"index": 0}]}, "[DONE]"), False),
        (sse(CHUNK, "[DONE"), False),
    ],
)
def test_stream_events_are_checked_against_the_chunk_model(
    doc: dict[str, Any], stream: bytes, conforms: bool
) -> None:
    """schemathesis reads the event-stream schema (each `data:` a chunk, an envelope or [DONE]): a
    stream that breaks the chunk model fails the fuzz's response check."""
    operation = schemathesis.openapi.from_dict(doc)["/v1/chat/completions"]["POST"]
    url = "http://test/v1/chat/completions"
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream; charset=utf-8"},
        content=stream,
        request=httpx.Request("POST", url),
    )
    response.elapsed = datetime.timedelta(0)  # set by a real transport; schemathesis reads it
    if conforms:
        operation.validate_response(response)
    else:
        with pytest.raises(AssertionError):
            operation.validate_response(response)

"""The real server over real HTTP, from the operator's side: the auth matrix of every endpoint,
vLLM's load/unload endpoints and their import-directory fence, request limits and error envelopes,
queue-full back-pressure, and the Prometheus metrics."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e
MAX_REQUEST = 65536
MAX_TOKENS_LIMIT = 64
TIMEOUT = 300.0
ENVELOPE_KEYS = {"message", "type", "param", "code"}


@dataclass
class Server:
    proc: ServerProc
    import_dir: Path
    outside_dir: Path

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def store(self) -> Path:
        return self.proc.store


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("admin")
    import_dir = root / "imports"
    outside_dir = root / "outside"
    store = root / "store"
    for d in (import_dir, outside_dir, store):
        d.mkdir()
    proc = ServerProc(
        store,
        args=[
            "--adapter-import-dirs",
            str(import_dir),
            "--max-upload-bytes",
            "4194304",
            "--max-request-bytes",
            str(MAX_REQUEST),
            "--max-n",
            "2",
            "--max-tokens-limit",
            str(MAX_TOKENS_LIMIT),
            "--max-queue",
            "1",
        ],
        env={
            "LORAPLEX_API_KEYS": API_KEY,
            "LORAPLEX_ADMIN_KEYS": ADMIN_KEY,
            "LORAPLEX_KEYS": json.dumps({"keys": TENANT_KEYS}),
        },
    )
    with proc:
        yield Server(proc, import_dir, outside_dir)


def snapshot(root: Path) -> list[tuple[str, bytes | None]]:
    """Every path under `root`, sorted, with its bytes (None for anything that is not a file)."""
    return [
        (str(p.relative_to(root)), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    ]


def assert_envelope(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) >= ENVELOPE_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def chat_body(model: str = BASE_ID, max_tokens: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def post_chat(url: str, body: dict[str, Any], key: str | None = API_KEY, **kw: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={**headers(key), **kw}, timeout=TIMEOUT
    )


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    r = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    ]


def engine_idle(url: str) -> bool:
    gauges = {
        name: value
        for name, _, value in metric_samples(url)
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
    }
    return gauges == {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}


# -- 1. the auth matrix ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    scope: str  # "open", "inference" or "admin"
    authorized: int  # the status once the key is good enough
    json: dict[str, Any] | None = None
    multipart: bool = False


ENDPOINTS = [
    Endpoint("GET", "/health", "open", 200),
    Endpoint("GET", "/ready", "open", 200),
    Endpoint("GET", "/metrics", "open", 200),
    Endpoint("GET", "/version", "open", 200),
    Endpoint("GET", "/v1/models", "inference", 200),
    Endpoint("POST", "/v1/chat/completions", "inference", 200, json=chat_body()),
    Endpoint(
        "POST",
        "/v1/completions",
        "inference",
        200,
        json={"model": BASE_ID, "prompt": "The sea is", "max_tokens": 1, "temperature": 0},
    ),
    # an unexpected file part: refused (400) once authorized, before anything is written
    Endpoint("POST", "/v1/adapters", "admin", 400, multipart=True),
    Endpoint("GET", "/v1/adapters", "admin", 200),
    Endpoint("GET", "/v1/adapters/no-such-adapter", "admin", 404),
    Endpoint("DELETE", "/v1/adapters/no-such-adapter", "admin", 404),
    Endpoint("POST", "/v1/load_lora_adapter", "admin", 400, json={}),  # lora_name, lora_path missing
    Endpoint("POST", "/v1/unload_lora_adapter", "admin", 404, json={"lora_name": "no-such-adapter"}),
]
TENANT_APP_KEY = "tenant-inference-key-for-tests"
TENANT_ADMIN_KEY = "tenant-admin-key-for-tests"
# keys scoped to the adapters named tenant/* (README, "Tenants")
TENANT_KEYS = [
    {"name": "tenant-app", "key": TENANT_APP_KEY, "role": "inference", "adapters": ["tenant/*"]},
    {"name": "tenant-admin", "key": TENANT_ADMIN_KEY, "role": "admin", "adapters": ["tenant/*"]},
]
KEYS: dict[str, str | None] = {
    "no-key": None,
    "wrong-key": "not-a-key",
    "inference-key": API_KEY,
    "admin-key": ADMIN_KEY,
    "tenant-inference-key": TENANT_APP_KEY,
    "tenant-admin-key": TENANT_ADMIN_KEY,
}


def call(url: str, ep: Endpoint, key: str | None) -> httpx.Response:
    kw: dict[str, Any] = {"headers": headers(key), "timeout": TIMEOUT}
    if ep.json is not None:
        kw["json"] = ep.json
    if ep.multipart:
        kw["data"] = {"name": "matrix"}
        kw["files"] = {"notes.txt": ("notes.txt", b"not an adapter file")}
    return httpx.request(ep.method, f"{url}{ep.path}", **kw)


@pytest.mark.parametrize("key_name", list(KEYS))
@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda ep: f"{ep.method} {ep.path}")
def test_auth_matrix(server: Server, ep: Endpoint, key_name: str) -> None:
    before = snapshot(server.store)
    r = call(server.url, ep, KEYS[key_name])
    if ep.scope != "open" and key_name in ("no-key", "wrong-key"):
        err = assert_envelope(r, 401, "invalid_api_key")
        assert set(err) == ENVELOPE_KEYS and err["param"] is None
        assert err["type"] == "authentication_error"
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    elif ep.scope == "admin" and key_name in ("inference-key", "tenant-inference-key"):
        err = assert_envelope(r, 403, "insufficient_scope")
        assert err["type"] == "permission_error"
    elif key_name == "tenant-admin-key" and ep.multipart:
        # the upload's name ("matrix") is outside the key's patterns: refused before its files are read
        assert_envelope(r, 403, "insufficient_scope")
    else:
        assert r.status_code not in (401, 403), r.text
        assert r.status_code == ep.authorized, r.text
        if ep.authorized != 200:
            assert_envelope(r, ep.authorized)
    # no request of the matrix changes the store, whoever sends it
    assert snapshot(server.store) == before


# -- 2. vLLM's load/unload endpoints --------------------------------------------------------------


def load(url: str, name: str, path: Path | str, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        headers=headers(key),
        timeout=TIMEOUT,
    )


def unload(url: str, name: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/unload_lora_adapter",
        json={"lora_name": name},
        headers=headers(ADMIN_KEY),
        timeout=TIMEOUT,
    )


def model_ids(url: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{url}/v1/models", headers=headers(API_KEY), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["data"]}


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(src / f, dst / f)
    return dst


def test_vllm_load_chat_unload(server: Server, adapter_dirs: dict[str, Path]) -> None:
    good = copy_adapter(adapter_dirs["qv-r4"], server.import_dir / "good")
    r = load(server.url, "vl", good)
    assert r.status_code == 200, r.text
    assert "vl" in r.text

    models = model_ids(server.url)
    assert "vl" in models
    assert models["vl"]["parent"] == BASE_ID and models[BASE_ID]["parent"] is None

    r = post_chat(server.url, chat_body("vl", max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "vl"
    assert r.json()["usage"]["completion_tokens"] >= 1

    r = unload(server.url, "vl")
    assert r.status_code == 200, r.text
    assert "vl" not in model_ids(server.url)
    err = assert_envelope(post_chat(server.url, chat_body("vl")), 404, "model_not_found")
    assert err["param"] == "model"
    # unloading it again: it is gone
    assert_envelope(unload(server.url, "vl"), 404, "model_not_found")


def test_load_refuses_paths_outside_the_import_dirs(server: Server, adapter_dirs: dict[str, Path]) -> None:
    original = adapter_dirs["mlp-r8-half"]
    # a sibling whose name starts with the import dir's name is still outside it
    sibling = copy_adapter(original, server.import_dir.parent / f"{server.import_dir.name}-evil")
    outside = copy_adapter(original, server.outside_dir / "adapter")
    link = server.import_dir / "link"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    # a real directory inside, whose weights file links to a file outside
    mixed = server.import_dir / "mixed"
    mixed.mkdir(exist_ok=True)
    shutil.copyfile(original / "adapter_config.json", mixed / "adapter_config.json")
    if not (mixed / "adapter_model.safetensors").exists():
        (mixed / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    escapes: dict[str, str] = {
        "original": str(original),
        "outside": str(outside),
        "symlink-dir": str(link),
        "dotdot": str(server.import_dir / ".." / "outside" / "adapter"),
        "dotdot-sibling": f"{server.import_dir}/../{sibling.name}",
        "sibling-prefix": str(sibling),
        "symlink-file": str(mixed),
    }
    before = snapshot(server.store)
    for case, path in escapes.items():
        r = load(server.url, "escape", path)
        assert r.status_code == 403, (case, r.text)
        assert_envelope(r, 403)
        assert snapshot(server.store) == before, case
    assert "escape" not in model_ids(server.url)


# -- 3. limits and error envelopes ----------------------------------------------------------------


def test_n_above_the_limit(server: Server) -> None:
    err = assert_envelope(post_chat(server.url, chat_body(n=3)), 400, "invalid_value")
    assert err["param"] == "n"


def test_max_tokens_above_the_limit(server: Server) -> None:
    err = assert_envelope(post_chat(server.url, chat_body(max_tokens=MAX_TOKENS_LIMIT + 1)), 400)
    assert err["param"] == "max_tokens"
    assert str(MAX_TOKENS_LIMIT) in err["message"]


def test_prompt_beyond_the_context_length(server: Server) -> None:
    long = " ".join(["hello"] * 1100)
    body = chat_body(max_tokens=8)
    body["messages"] = [{"role": "user", "content": long}]
    err = assert_envelope(post_chat(server.url, body), 400, "invalid_value")
    assert "maximum context length" in err["message"]
    assert "1024" in err["message"]


def test_prompt_beyond_the_context_length_without_max_tokens(server: Server) -> None:
    body = chat_body()
    del body["max_tokens"]
    body["messages"] = [{"role": "user", "content": " ".join(["hello"] * 1100)}]
    r = post_chat(server.url, body)
    err = assert_envelope(r, 400, "invalid_value")
    assert "maximum context length" in err["message"]


def test_json_body_above_the_limit(server: Server) -> None:
    body = chat_body()
    body["messages"] = [{"role": "user", "content": "x" * (MAX_REQUEST + 10)}]
    assert_envelope(post_chat(server.url, body), 413, "payload_too_large")


def test_chunked_json_body_above_the_limit(server: Server) -> None:
    payload = json.dumps(chat_body(extra="x" * (MAX_REQUEST + 10))).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=chunks(),
        headers={**headers(API_KEY), "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, "payload_too_large")


def test_wrong_content_types(server: Server) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "x"}',
        headers={**headers(API_KEY), "Content-Type": "text/plain"},
        timeout=TIMEOUT,
    )
    assert_envelope(r, 415, "unsupported_media_type")
    r = httpx.post(
        f"{server.url}/v1/adapters", json={"name": "x"}, headers=headers(ADMIN_KEY), timeout=TIMEOUT
    )
    err = assert_envelope(r, 415, "unsupported_media_type")
    assert "multipart/form-data" in err["message"]


def test_schema_errors(server: Server) -> None:
    body = chat_body()
    del body["messages"]
    err = assert_envelope(post_chat(server.url, body), 400, "missing_required_parameter")
    assert err["param"] == "messages" and err["type"] == "invalid_request_error"
    err = assert_envelope(post_chat(server.url, chat_body(stop=5)), 400, "invalid_type")
    assert err["param"] == "stop"


def test_unknown_fields_are_ignored(server: Server) -> None:
    body = chat_body(frequency_penalty_v9=1, user="someone", metadata={"k": "v"})
    body["messages"][0]["name"] = "alice"
    r = post_chat(server.url, body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"


def test_request_ids(server: Server) -> None:
    r = httpx.get(f"{server.url}/health", headers={"x-request-id": "my-id-123"}, timeout=TIMEOUT)
    assert r.headers["x-request-id"] == "my-id-123"
    r = post_chat(server.url, chat_body(), **{"x-request-id": "my-id-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-123"
    # errors carry it too, even those the edge answers itself
    r = post_chat(server.url, chat_body(n=3), **{"x-request-id": "my-id-123"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "my-id-123"
    generated = [httpx.get(f"{server.url}/health", timeout=TIMEOUT).headers["x-request-id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated), generated
    assert generated[0] != generated[1]
    # an id that is not a safe token is replaced, never echoed
    r = httpx.get(f"{server.url}/health", headers={"x-request-id": "bad id\t<x>"}, timeout=TIMEOUT)
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


# -- 4. queue full --------------------------------------------------------------------------------


def test_queue_full_then_recovers(server: Server) -> None:
    assert engine_idle(server.url)
    long = chat_body(max_tokens=MAX_TOKENS_LIMIT, stream=True)
    long["messages"] = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]
    with (
        httpx.Client(base_url=server.url, headers=headers(API_KEY), timeout=TIMEOUT) as first,
        first.stream("POST", "/v1/chat/completions", json=long) as stream,
    ):
        assert stream.status_code == 200
        # keep the iterator: dropping it would close the stream before the second request
        lines = stream.iter_lines()
        line = next(lines)
        assert line.startswith("data: ") and '"role": "assistant"' in line

        busy = post_chat(server.url, chat_body())
        err = assert_envelope(busy, 429, "queue_full")
        assert err["type"] == "rate_limit_error"
        assert busy.headers["retry-after"].isdigit()
        assert next(lines) == ""  # the first stream is still open, mid-generation
    # leaving the block closed the stream mid-generation: the server aborts it
    # bounded polling, no sleeps: the abort lands within a few engine steps
    for _ in range(200):
        if engine_idle(server.url):
            break
    else:
        pytest.fail("the aborted stream is still in the engine")
    for _ in range(50):
        r = post_chat(server.url, chat_body())
        if r.status_code != 429:
            break
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


# -- 5. metrics -----------------------------------------------------------------------------------


def test_metrics(server: Server, adapter_dirs: dict[str, Path]) -> None:
    good = copy_adapter(adapter_dirs["rslora-r16"], server.import_dir / "for-metrics")
    assert load(server.url, "mx", good).status_code == 200
    r = post_chat(server.url, chat_body("mx", max_tokens=2))
    assert r.status_code == 200, r.text

    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:lora_requests_info",
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "loraplex:adapter_load_seconds",
    ):
        assert f"# TYPE {name} " in text, name

    samples = metric_samples(server.url)
    info = [labels for name, labels, _ in samples if name == "vllm:lora_requests_info"]
    assert len(info) == 1
    assert set(info[0]) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert int(info[0]["max_lora"]) >= 1
    names = {name for name, _, _ in samples}
    assert {"vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count"} <= names
    loads = [v for name, _, v in samples if name == "loraplex:adapter_load_seconds_count"]
    assert loads and loads[0] >= 1  # "mx" was read from disk to serve the chat
    ok = [
        v
        for name, labels, v in samples
        if name == "loraplex:requests_total" and labels == {"adapter": "mx", "outcome": "ok"}
    ]
    assert ok and ok[0] >= 1, [s for s in samples if s[0] == "loraplex:requests_total"]
    assert unload(server.url, "mx").status_code == 200

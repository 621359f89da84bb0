"""The real server over real HTTP: the official openai client, adapter uploads (accepted and
refused), replacing an adapter under a running request, disconnects, and restarts."""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, headers, upload

pytestmark = pytest.mark.e2e
MAX_UPLOAD = 8 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    with ServerProc(
        tmp_path_factory.mktemp("store"),
        args=["--max-upload-bytes", str(MAX_UPLOAD), "--batch-invariant"],
        env={"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY},
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under the store with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def stream_chat(url: str, model: str, max_tokens: int) -> Any:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    return httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=300
    )


def sse_text(lines: Iterator[str]) -> str:
    """The content of the remaining chat chunks of an SSE stream."""
    text = ""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def chat(client: openai.OpenAI, model: str, max_tokens: int = 16) -> str:
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content or ""


def test_openai_client_with_an_uploaded_adapter(
    server: ServerProc, client: openai.OpenAI, adapter_dirs: dict[str, Path]
) -> None:
    r = upload(server.url, "qv", adapter_dirs["qv-r4"])
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["name"] == "qv" and record["rank"] == 4 and record["target_modules"] == ["q_proj", "v_proj"]
    assert len(record["version"]) == 64 and record["size_bytes"] > 0
    assert "r" in record["report"]["honoured"] and not record["report"]["refused"]

    models = {m.id: m for m in client.models.list().data}
    assert BASE_ID in models and "qv" in models
    assert models["qv"].model_dump()["parent"] == BASE_ID

    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(model="qv", messages=messages, max_tokens=12, temperature=0)
    assert "Paris" in (base.choices[0].message.content or "")
    assert base.choices[0].message.content != tuned.choices[0].message.content
    assert tuned.usage is not None and tuned.usage.completion_tokens <= 12
    assert tuned.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model="qv",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == tuned.choices[0].message.content
    )
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == tuned.usage.completion_tokens
    )

    done = client.completions.create(model="qv", prompt="The sea is", max_tokens=8, temperature=0)
    streamed = client.completions.create(
        model="qv", prompt="The sea is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    again = upload(server.url, "qv", adapter_dirs["qv-r4"])  # identical bytes: same version, no copy
    assert again.status_code == 200 and again.json()["version"] == record["version"]
    assert len(list((server.store / "blobs").iterdir())) == 1


def _weights_with(directory: Path, edit: Any) -> bytes:
    from safetensors.torch import load, save

    tensors = load((directory / "adapter_model.safetensors").read_bytes())
    edit(tensors)
    return save(tensors)


REFUSALS: dict[str, tuple[str, int, str]] = {
    # case: (adapter name, status, substring of the error message)
    "pickle": ("ok-name", 400, "pickle"),
    "wrong-shape": ("ok-name", 400, "shape"),
    "path-name": ("../x", 400, "invalid adapter name"),
    "oversized": ("ok-name", 413, "exceeds"),
    "truncated": ("ok-name", 400, "safetensors"),
    "qalora": ("ok-name", 400, "use_qalora"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_upload_leaves_the_store_unchanged(
    server: ServerProc, adapter_dirs: dict[str, Path], case: str
) -> None:
    src = adapter_dirs["qv-r4"]
    config = (src / "adapter_config.json").read_bytes()
    weights = (src / "adapter_model.safetensors").read_bytes()
    if case == "pickle":
        files = {
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.bin": ("adapter_model.bin", b"\x80\x04not really a pickle"),
        }
    elif case == "wrong-shape":

        def widen(t: dict[str, Any]) -> None:
            key = next(k for k in t if "lora_A" in k)
            t[key] = t[key].repeat(2, 1)

        files = {
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", _weights_with(src, widen)),
        }
    elif case == "oversized":
        header = json.dumps({"__metadata__": {"pad": "x" * (MAX_UPLOAD + 1024)}}).encode()
        files = {
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": (
                "adapter_model.safetensors",
                struct.pack("<Q", len(header)) + header,
            ),
        }
    elif case == "truncated":
        files = {
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights[: len(weights) // 2]),
        }
    elif case == "qalora":
        cfg = {**json.loads(config), "use_qalora": True}
        files = {
            "adapter_config.json": ("adapter_config.json", json.dumps(cfg).encode()),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights),
        }
    else:
        files = {
            "adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", weights),
        }
    name, status, message = REFUSALS[case]
    before = snapshot(server.store)
    r = upload(server.url, name, src, files=files)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"]
    assert snapshot(server.store) == before
    assert name not in {
        m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=headers(API_KEY)).json()["data"]
    }


def test_replacing_an_adapter_does_not_disturb_a_running_request(
    server: ServerProc, client: openai.OpenAI, adapter_dirs: dict[str, Path]
) -> None:
    v1_dir, v2_dir = adapter_dirs["qv-r4"], adapter_dirs["rslora-r16"]
    assert upload(server.url, "swap", v1_dir).status_code in (200, 201)
    assert upload(server.url, "ref-v2", v2_dir).status_code == 201
    long_v1 = chat(client, "swap", max_tokens=160)
    short_v2 = chat(client, "ref-v2")

    with stream_chat(server.url, "swap", 160) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        replaced = upload(server.url, "swap", v2_dir)
        assert replaced.status_code == 201
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'running_lora_adapters="swap"' in metrics, "the version-1 request was no longer running"
        assert chat(client, "swap") == short_v2, "a new request must get version 2"
        text = sse_text(lines)
    assert text == long_v1, "the running request must finish on version 1"


def test_client_disconnect_aborts_the_request(server: ServerProc) -> None:
    body = {
        "model": BASE_ID,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=120
    ) as stream:
        assert stream.status_code == 200
        next(line for line in stream.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded poll: the engine drops it within a step
        metrics = httpx.get(f"{server.url}/metrics").text
        if (
            'loraplex:requests_total{adapter="SmolLM2-135M-Instruct",outcome="aborted"}' in metrics
            and 'vllm:num_requests_running{model_name="SmolLM2-135M-Instruct"} 0.0' in metrics
        ):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the disconnected request kept running")


def test_adapters_survive_a_restart(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    env = {"LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
    with ServerProc(tmp_path / "store", env=env) as first:
        for name in ("one", "two"):
            assert (
                upload(first.url, name, adapter_dirs["qv-r4" if name == "one" else "patterns"]).status_code
                == 201
            )
        assert httpx.delete(f"{first.url}/v1/adapters/two", headers=headers(ADMIN_KEY)).status_code == 200
        assert upload(first.url, "three", adapter_dirs["mlp-r8-half"]).status_code == 201
        before = httpx.get(f"{first.url}/v1/adapters", headers=headers(ADMIN_KEY)).json()["data"]
    shipped = tmp_path / "shipped"
    shutil.copytree(adapter_dirs["rslora-r16"], shipped / "imported")
    with ServerProc(tmp_path / "store", args=["--import-adapters", str(shipped)], env=env) as second:
        after = httpx.get(f"{second.url}/v1/adapters", headers=headers(ADMIN_KEY)).json()["data"]
        kept = {(a["name"], a["version"]) for a in after if a["name"] != "imported"}
        assert kept == {(a["name"], a["version"]) for a in before}
        assert {a["name"] for a in after} == {"one", "three", "imported"}
        # the deleted adapter's blob is collected at start-up; the imported one is copied in
        assert len(list((tmp_path / "store" / "blobs").iterdir())) == 3
        r = httpx.post(
            f"{second.url}/v1/completions",
            headers=headers(ADMIN_KEY),
            timeout=120,
            json={"model": "three", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_delete_lets_running_requests_finish(
    server: ServerProc, client: openai.OpenAI, adapter_dirs: dict[str, Path]
) -> None:
    assert upload(server.url, "doomed", adapter_dirs["mlp-r8-half"]).status_code == 201
    expected = chat(client, "doomed", max_tokens=120)
    with stream_chat(server.url, "doomed", 120) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        r = httpx.delete(f"{server.url}/v1/adapters/doomed", headers=headers(ADMIN_KEY))
        assert r.status_code == 200 and r.json()["deleted"] is True
        with pytest.raises(openai.NotFoundError):
            chat(client, "doomed")
        text = sse_text(lines)
    assert text == expected

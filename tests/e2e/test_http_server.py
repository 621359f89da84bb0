"""The real server over real HTTP with the official openai client."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e
BASE_ID = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server_url(adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("store")
    shutil.copytree(adapter_dirs["qv-r4"], store / "qv-r4")
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(port),
        "--adapters-dir",
        str(store),
        "--kv-cache-tokens",
        "4096",
        "--max-model-len",
        "1024",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, "server exited during start-up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not become healthy")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_openai_client_chat_with_adapter(server_url: str) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    ids = {m.id: m for m in client.models.list().data}
    assert BASE_ID in ids and "qv-r4" in ids
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model=BASE_ID, messages=messages, max_tokens=12, temperature=0)
    tuned = client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=12, temperature=0)
    assert base.choices[0].message.content and tuned.choices[0].message.content
    assert base.usage is not None and base.usage.completion_tokens <= 12
    assert "Paris" in base.choices[0].message.content
    assert base.choices[0].message.content != tuned.choices[0].message.content

    stream = client.chat.completions.create(
        model="qv-r4",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == tuned.choices[0].message.content


def test_unknown_model_is_404_in_openai_envelope(server_url: str) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_prompt_beyond_context_is_400(server_url: str) -> None:
    r = httpx.post(
        f"{server_url}/v1/completions", json={"model": BASE_ID, "prompt": "word " * 1100, "max_tokens": 10}
    )
    assert r.status_code == 400
    assert "maximum context length" in r.json()["error"]["message"]

"""Two real servers on one adapter store (as replicas on an RWX volume): an upload, a replacement
and a delete on A reach B; a stream on B keeps its version to the end; B restarting during an
upload on A loses nothing; no blob a running request uses is collected."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.lora.store import AdapterStore
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, ServerProc, headers, upload

pytestmark = pytest.mark.e2e
TIMEOUT = 300.0
PROMPT = "What is the capital of France?"
# every 0.5 s each server rescans the store; --batch-invariant: a stream's tokens do not depend on
# the requests that join its batch
ARGS = ["--store-rescan-seconds", "0.5", "--batch-invariant"]
ENV = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
# Token counts sized for 2 busy cores: a long stream outlasts what the test does beside it (an
# upload, a rescan, a SHORT request in the same batch); ignore_eos makes its length certain.
SHORT, LONG = 8, 64


@dataclass
class Pair:
    store: Path
    a: ServerProc
    b: ServerProc


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    store = tmp_path_factory.mktemp("shared") / "store"
    servers = Pair(store, ServerProc(store, ARGS, ENV), ServerProc(store, ARGS, ENV))
    with ExitStack() as stack:
        # whichever B is current at the end (one test restarts it); each must exit 0 on SIGTERM
        stack.callback(lambda: servers.b.stop())
        stack.callback(servers.a.stop)
        with ThreadPoolExecutor(2) as pool:  # ~40 s each: start both at once
            list(pool.map(ServerProc.start, [servers.a, servers.b]))
        yield servers


def chat(url: str, model: str, max_tokens: int = SHORT, **extra: Any) -> tuple[str, int]:
    """Greedy chat: the text and the number of tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={**body, "temperature": 0, **extra},
        headers=headers(API_KEY),
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]


def status(url: str, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=TIMEOUT)
    if r.status_code == 404:
        assert r.json()["error"]["code"] == "model_not_found"
    return r.status_code


def version_on(url: str, name: str) -> str | None:
    r = httpx.get(f"{url}/v1/adapters/{name}", headers=headers(ADMIN_KEY), timeout=TIMEOUT)
    return str(r.json()["version"]) if r.status_code == 200 else None


def model_ids(url: str) -> set[str]:
    r = httpx.get(f"{url}/v1/models", headers=headers(API_KEY), timeout=TIMEOUT)
    return {m["id"] for m in r.json()["data"]}


def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Bounded polling for a rescan (every 0.5 s) to land."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def delete(url: str, name: str) -> httpx.Response:
    return httpx.delete(f"{url}/v1/adapters/{name}", headers=headers(ADMIN_KEY), timeout=TIMEOUT)


def stream_chat(url: str, model: str, max_tokens: int) -> Any:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    return httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=TIMEOUT
    )


def started(lines: Iterator[str]) -> str:
    """Read up to the first generated text: the request is admitted (and its version pinned)."""
    for line in lines:
        if line.startswith("data: ") and (text := json.loads(line[6:])["choices"][0]["delta"].get("content")):
            return str(text)
    pytest.fail("the stream ended before any text")


def sse_text(lines: Iterator[str], text: str = "") -> str:
    """The content of the remaining chat chunks, after `text` (what was read already)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text


def test_an_upload_on_a_is_served_by_b(pair: Pair, adapter_dirs: dict[str, Path]) -> None:
    r = upload(pair.a.url, "persona", adapter_dirs["qv-r4"])
    assert r.status_code == 201, r.text
    # at once, before any rescan: B looks an unknown name up in the store before a 404
    assert chat(pair.b.url, "persona") == chat(pair.a.url, "persona")
    assert version_on(pair.b.url, "persona") == r.json()["version"]
    eventually(lambda: "persona" in model_ids(pair.b.url), "B lists the adapter")


def test_a_replacement_reaches_b_but_not_its_running_stream(
    pair: Pair, adapter_dirs: dict[str, Path]
) -> None:
    a, b = pair.a.url, pair.b.url
    assert upload(a, "swap", adapter_dirs["qv-r4"]).status_code in (200, 201)
    assert upload(a, "ref-v2", adapter_dirs["rslora-r16"]).status_code == 201
    long_v1 = chat(b, "swap", LONG, ignore_eos=True)[0]
    short_v2 = chat(b, "ref-v2")

    with stream_chat(b, "swap", LONG) as stream:
        lines = stream.iter_lines()
        head = started(lines)
        replaced = upload(a, "swap", adapter_dirs["rslora-r16"])
        assert replaced.status_code == 201, replaced.text
        eventually(lambda: version_on(b, "swap") == replaced.json()["version"], "B sees version 2")
        assert chat(b, "swap") == short_v2, "a new request on B gets version 2"
        metrics = httpx.get(f"{b}/metrics", timeout=TIMEOUT).text
        assert 'running_lora_adapters="swap"' in metrics, "the version-1 stream was no longer running"
        text = sse_text(lines, head)
    assert text == long_v1, "the running stream finishes on version 1"


def test_a_delete_on_a_becomes_a_404_on_b(pair: Pair) -> None:
    assert status(pair.b.url, "persona") == 200
    assert delete(pair.a.url, "persona").status_code == 200
    eventually(lambda: "persona" not in model_ids(pair.b.url), "B drops the adapter")
    assert status(pair.b.url, "persona") == 404
    assert status(pair.a.url, "persona") == 404


def multipart(fields: dict[str, tuple[str | None, bytes]], boundary: str) -> bytes:
    out = b""
    for field, (filename, data) in fields.items():
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_b_restarting_during_an_upload_on_a_loses_nothing(pair: Pair, adapter_dirs: dict[str, Path]) -> None:
    src = adapter_dirs["patterns"]
    boundary = "loraplex-shared-store-test"
    body = multipart(
        {
            "name": (None, b"late"),
            **{f: (f, (src / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")},
        },
        boundary,
    )
    # A's staging dir, with what an upload in progress would have there
    assert pair.a.proc is not None
    (mine,) = (d for d in (pair.store / "staging").iterdir() if f"-{pair.a.proc.pid}-" in d.name)
    in_progress = mine / "tmp-in-progress" / "adapter_model.safetensors"
    in_progress.parent.mkdir()
    in_progress.write_bytes(b"half an upload")

    resume, sent_half = threading.Event(), threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        sent_half.set()
        assert resume.wait(TIMEOUT)
        yield body[len(body) // 2 :]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post,
            f"{pair.a.url}/v1/adapters",
            content=slow_body(),
            headers={**headers(ADMIN_KEY), "Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=TIMEOUT,
        )
        try:
            assert sent_half.wait(TIMEOUT) and pair.b.proc is not None
            old_b = pair.b.proc.pid
            pair.b.stop()
            pair.b = ServerProc(pair.store, ARGS, ENV)  # the fixture stops it, even if it fails here
            pair.b.start()
        finally:
            resume.set()
        r = pending.result()
    assert r.status_code == 201, r.text
    staging = [d.name for d in (pair.store / "staging").iterdir()]
    assert not [d for d in staging if f"-{old_b}-" in d], "a clean shutdown leaves no staging dir"
    assert in_progress.read_bytes() == b"half an upload", "B's start left A's staging dir alone"
    shutil.rmtree(in_progress.parent)
    assert {"swap", "ref-v2"} <= model_ids(pair.b.url), "the new B restored the names A wrote"
    assert chat(pair.b.url, "late") == chat(pair.a.url, "late")
    eventually(lambda: "late" in model_ids(pair.b.url), "the new B lists the upload")


def test_a_blob_in_use_is_never_collected(pair: Pair, adapter_dirs: dict[str, Path]) -> None:
    r = upload(pair.a.url, "doomed", adapter_dirs["mlp-r8-half"])
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    blob = pair.store / "blobs" / version
    expected = chat(pair.b.url, "doomed", LONG // 2, ignore_eos=True)[0]
    # a third process on the store, collecting with no grace period: only pins protect the blob
    collector = AdapterStore(pair.store)
    try:
        with stream_chat(pair.b.url, "doomed", LONG // 2) as stream:
            lines = stream.iter_lines()
            head = started(lines)
            assert delete(pair.a.url, "doomed").status_code == 200
            assert version not in collector.collect_garbage(grace=0)
            assert blob.is_dir() and list((pair.store / "pins" / version).iterdir()), "B pins it"
            text = sse_text(lines, head)
        assert text == expected, "the stream finished on the deleted adapter"
        # the stream's last sequence unpinned it before its last chunk was sent
        assert version in collector.collect_garbage(grace=0)
        assert not blob.exists()
    finally:
        collector.close()

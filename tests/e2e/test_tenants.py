"""Tenants over real HTTP: keys from a keys file scoped to adapter-name patterns (what each key
lists, uses and manages; another tenant's adapter answers exactly as an unknown name), no key
material in /metrics, a bad keys document stopping the start, and fair share per key
(--max-concurrent-per-key)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, chat, headers, upload

pytestmark = pytest.mark.e2e
TIMEOUT = 300.0
A_APP = "sk-team-a-app-0123456789"
A_ADMIN = "sk-team-a-admin-0123456789"
B_APP = "sk-team-b-app-0123456789"
B_ADMIN = "sk-team-b-admin-0123456789"
KEYS_DOC = {
    "keys": [
        {"name": "team-a-app", "key": A_APP, "role": "inference", "adapters": ["team-a/*"]},
        # the file may hold a key's digest instead of the key
        {
            "name": "team-a-admin",
            "sha256": hashlib.sha256(A_ADMIN.encode()).hexdigest(),
            "role": "admin",
            "adapters": ["team-a/*"],
        },
        {"name": "team-b-app", "key": B_APP, "adapters": ["team-b/*", "shared-*"]},
        {"name": "team-b-admin", "key": B_ADMIN, "role": "admin", "adapters": ["team-b/*"]},
    ]
}
SECRETS = [A_APP, A_ADMIN, B_APP, B_ADMIN, API_KEY, ADMIN_KEY]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path]) -> Iterator[ServerProc]:
    root = tmp_path_factory.mktemp("tenants")
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(KEYS_DOC))
    with ServerProc(
        root / "store",
        args=["--max-concurrent-per-key", "1"],
        env={
            "LORAPLEX_API_KEYS": API_KEY,
            "LORAPLEX_ADMIN_KEYS": ADMIN_KEY,
            "LORAPLEX_KEYS_FILE": str(keys_file),
        },
    ) as proc:
        # the operator's (unscoped) admin key puts one adapter in each namespace, and one shared
        for name, d in (
            ("team-a/support", "qv-r4"),
            ("team-b/support", "rslora-r16"),
            ("shared-faq", "qv-r4"),
        ):
            r = upload(proc.url, name, adapter_dirs[d])
            assert r.status_code == 201, r.text
        yield proc


def model_ids(url: str, key: str) -> set[str]:
    r = httpx.get(f"{url}/v1/models", headers=headers(key), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def comparable(r: httpx.Response, name: str) -> tuple[int, str, dict[str, str]]:
    """A 404 with the name taken out, and its headers less the per-request ones."""
    skip = {"x-request-id", "date", "content-length"}
    return r.status_code, r.text.replace(name, "NAME"), {k: v for k, v in r.headers.items() if k not in skip}


def test_each_key_lists_only_what_it_may_use(server: ServerProc) -> None:
    everything = {BASE_ID, "team-a/support", "team-b/support", "shared-faq"}
    assert model_ids(server.url, A_APP) == {BASE_ID, "team-a/support"}
    assert model_ids(server.url, B_APP) == {BASE_ID, "team-b/support", "shared-faq"}
    assert model_ids(server.url, API_KEY) == everything  # unscoped keys see every adapter
    r = httpx.get(f"{server.url}/v1/adapters", headers=headers(A_ADMIN), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert [a["name"] for a in r.json()["data"]] == ["team-a/support"]


def test_another_tenants_adapter_is_an_unknown_name(server: ServerProc) -> None:
    assert chat(server.url, "team-a/support", A_APP).status_code == 200
    assert chat(server.url, BASE_ID, A_APP).status_code == 200  # the base is every key's
    foreign = chat(server.url, "team-b/support", A_APP)
    unknown = chat(server.url, "team-a/no-such-adapter", A_APP)
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "model_not_found"
    assert comparable(foreign, "team-b/support") == comparable(unknown, "team-a/no-such-adapter")
    for path, method, body in (
        ("/v1/models/team-b/support", "GET", None),
        ("/tokenize", "POST", {"model": "team-b/support", "prompt": "hello"}),
        ("/v1/completions", "POST", {"model": "team-b/support", "prompt": "hello", "max_tokens": 1}),
    ):
        r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers(A_APP), timeout=TIMEOUT)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "model_not_found"
    # the same names, for the tenant that owns them
    assert chat(server.url, "team-b/support", B_APP).status_code == 200
    assert chat(server.url, "shared-faq", B_APP).status_code == 200


def test_a_tenant_admin_manages_only_its_own_adapters(
    server: ServerProc, adapter_dirs: dict[str, Path]
) -> None:
    url = server.url
    made = upload(url, "team-a/new", adapter_dirs["mlp-r8-half"], key=A_ADMIN)
    assert made.status_code == 201, made.text
    replaced = upload(url, "team-a/new", adapter_dirs["qv-r4"], key=A_ADMIN)
    assert replaced.status_code == 201 and replaced.json()["version"] != made.json()["version"]
    assert "team-a/new" in model_ids(url, A_APP) and "team-a/new" not in model_ids(url, B_APP)
    # outside its patterns: creating is refused, whether or not the name exists
    for name in ("team-b/support", "team-b/fresh", "unscoped"):
        r = upload(url, name, adapter_dirs["qv-r4"], key=A_ADMIN)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "insufficient_scope"
    load = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "team-b/loaded", "lora_path": "/nowhere"},
        headers=headers(A_ADMIN),
        timeout=TIMEOUT,
    )
    assert load.status_code == 403, load.text
    # reading and deleting another tenant's adapter: the unknown-name 404, and nothing changes
    for method, path, body in (
        ("GET", "/v1/adapters/team-b/support", None),
        ("DELETE", "/v1/adapters/team-b/support", None),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "team-b/support"}),
    ):
        r = httpx.request(method, f"{url}{path}", json=body, headers=headers(A_ADMIN), timeout=TIMEOUT)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "model_not_found"
    assert "team-b/support" in model_ids(url, B_APP)
    assert chat(url, "team-b/support", B_APP).status_code == 200
    # a tenant's inference key is not an admin key, even inside its patterns
    r = upload(url, "team-a/other", adapter_dirs["qv-r4"], key=A_APP)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    gone = httpx.delete(f"{url}/v1/adapters/team-a/new", headers=headers(A_ADMIN), timeout=TIMEOUT)
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert "team-a/new" not in model_ids(url, ADMIN_KEY)


def test_metrics_carry_no_key_material(server: ServerProc) -> None:
    assert chat(server.url, "team-a/support", A_APP).status_code == 200
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    for secret in SECRETS:
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    for entry in KEYS_DOC["keys"]:
        assert str(entry["name"]) not in text


def test_one_key_cannot_hold_more_than_its_share(server: ServerProc) -> None:
    """--max-concurrent-per-key 1: while team A's app has a stream open, its next request is a 429
    with Retry-After; team B is served meanwhile; once A's stream ends, A is served again."""
    url = server.url
    body = {
        "model": "team-a/support",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 32,
        "min_tokens": 32,  # no early end of sequence: the stream is surely still running below
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers(A_APP), timeout=TIMEOUT
    ) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # one iterator: dropping it would close the stream
        next(lines)  # the first event: the request is in flight
        refused = chat(url, "team-a/support", A_APP)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
        assert refused.headers["retry-after"] == "1"
        assert chat(url, "team-b/support", B_APP).status_code == 200
        # the limit is per key, not per tenant: team A's admin key is counted apart
        assert chat(url, "team-a/support", A_ADMIN).status_code == 200
        events = [line for line in lines if line.startswith("data: {")]
        assert len(events) >= 32  # read to the end: the request completes
    assert chat(url, "team-a/support", A_APP).status_code == 200


# every refusal is unit-tested (tests/unit/test_tenant_keys.py); these show the start stopping
BAD_DOCUMENTS = {
    "not-json": "{keys: [",
    "short-key": json.dumps({"keys": [{"name": "x", "key": "sk-short"}]}),
    "bad-pattern": json.dumps({"keys": [{"name": "x", "key": "k" * 20, "adapters": ["../*"]}]}),
}


@pytest.mark.parametrize("case", list(BAD_DOCUMENTS))
def test_a_bad_keys_document_stops_the_start(case: str, tmp_path: Path) -> None:
    """Exit 2 with the problem named, before the model loads, and never the secret in the log."""
    env: dict[str, Any] = {**os.environ, "LORAPLEX_KEYS": BAD_DOCUMENTS[case]}
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--adapters-dir", str(tmp_path), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "LORAPLEX_KEYS" in done.stderr
    assert "sk-short" not in done.stderr and "k" * 20 not in done.stderr

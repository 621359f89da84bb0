"""Keys documents (parse, refuse, never echo a secret), grants over adapter-name patterns, and
the fair-share middleware's count per key."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from server.api.auth import Grant, KeyRing, KeysFileError, parse_keys_document
from server.api.fair_share import FairShareMiddleware, caller
from server.config import Settings
from server.errors import AdapterError
from server.lora.registry import check_name

KEY_A = "sk-team-a-0123456789abcdef"
KEY_OPS = "sk-ops-0123456789abcdef"


def doc(*entries: dict[str, Any]) -> str:
    return json.dumps({"keys": list(entries)})


def test_patterns_scope_a_key() -> None:
    g = Grant("a", "inference", ("team-a/*", "shared-?"))
    assert g.may_use("team-a/support") and g.may_use("shared-1")
    assert not g.may_use("team-b/support") and not g.may_use("shared-12") and not g.may_use("Team-A/x")
    assert Grant("ops", "admin").may_use("anything/at-all")


def test_keys_document_by_key_and_by_digest() -> None:
    entries = parse_keys_document(
        doc(
            {"name": "a", "key": KEY_A, "adapters": ["team-a/*"]},
            {"name": "ops", "sha256": hashlib.sha256(KEY_OPS.encode()).hexdigest(), "role": "admin"},
        ),
        "test",
    )
    ring = KeyRing(["plain-inference-key"], [], entries)
    a = ring.grant_of(KEY_A)
    assert a == Grant("a", "inference", ("team-a/*",))
    ops = ring.grant_of(KEY_OPS)
    assert ops is not None and ops.role == "admin" and ops.patterns is None
    assert ring.scope_of("plain-inference-key") == "inference"
    assert ring.grant_of(KEY_A + " ") is None and ring.grant_of("") is None
    assert ring.grant_of(hashlib.sha256(KEY_OPS.encode()).hexdigest()) is None  # the digest is no key


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[", "not valid JSON"),
        (json.dumps({"keys": [{"name": "x", "key": KEY_A, "tenant": "a"}]}), "keys.0.tenant"),
        (doc({"name": "x"}), "exactly one of 'key' and 'sha256'"),
        (doc({"name": "x", "key": KEY_A, "sha256": "0" * 64}), "exactly one"),
        (doc({"name": "x", "sha256": "XYZ"}), "64 lowercase hex"),
        (doc({"name": "x", "key": "short"}), "keys.0.key"),
        (doc({"name": "x", "key": KEY_A, "role": "root"}), "keys.0.role"),
        (doc({"name": "x", "key": KEY_A, "adapters": []}), "keys.0.adapters"),
        (doc({"name": "x", "key": KEY_A, "adapters": ["team a/*"]}), "adapter pattern"),
        (doc({"name": "x", "key": KEY_A, "adapters": ["../*"]}), "adapter pattern"),
        (doc({"name": "x", "key": KEY_A, "adapters": ["a/b/*"]}), "adapter pattern"),
        (doc({"name": "x", "key": KEY_A}, {"name": "x", "key": KEY_OPS}), "names must be unique"),
        (doc({"name": "x", "key": KEY_A}, {"name": "y", "key": KEY_A}), "listed twice"),
    ],
)
def test_bad_documents_are_refused_without_the_secret(text: str, problem: str) -> None:
    with pytest.raises(KeysFileError) as e:
        parse_keys_document(text, "keys.json")
    assert problem in str(e.value) and "keys.json" in str(e.value)
    assert KEY_A not in str(e.value) and "short" not in str(e.value).replace("'key'", "")


def test_settings_combine_env_lists_inline_document_and_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(doc({"name": "ops", "key": KEY_OPS, "role": "admin"}))
    ring = KeyRing.from_settings(
        Settings.model_validate(
            {
                "api_keys": "k1",
                "admin_keys": "k2",
                "keys": doc({"name": "a", "key": KEY_A}),
                "keys_file": path,
            }
        )
    )
    assert [ring.scope_of(k) for k in ("k1", "k2", KEY_A, KEY_OPS)] == [
        "inference",
        "admin",
        "inference",
        "admin",
    ]
    with pytest.raises(KeysFileError, match="twice"):
        KeyRing.from_settings(
            Settings.model_validate({"api_keys": KEY_A, "keys": doc({"name": "a", "key": KEY_A})})
        )
    with pytest.raises(KeysFileError, match="cannot read"):
        KeyRing.from_settings(Settings.model_validate({"keys_file": tmp_path / "missing.json"}))


@pytest.mark.parametrize("name", ["team-a/support", "support", "a.b/c_d-1"])
def test_namespaced_names_are_valid(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", ["a/b/c", "/a", "a/", "../a", "a/..", "a\n", "a/.b", "é/a", "a" * 65 + "/b"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(AdapterError):
        check_name(name)


# -- fair share -----------------------------------------------------------------------------------


def http_scope(key: str | None, path: str = "/v1/chat/completions", client: str = "10.0.0.1") -> Scope:
    hdrs = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return {"type": "http", "method": "POST", "path": path, "headers": hdrs, "client": (client, 1234)}


def test_caller_is_the_key_digest_or_the_address() -> None:
    assert caller(http_scope("k1")) == caller(http_scope("k1", client="10.0.0.2"))
    assert caller(http_scope("k1")) != caller(http_scope("k2"))
    assert "k1" not in caller(http_scope("k1"))
    assert caller(http_scope(None)) != caller(http_scope(None, client="10.0.0.2"))


def test_fair_share_counts_per_caller_until_the_response_ends() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await release.wait()  # a request in flight until released
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        mw = FairShareMiddleware(app, limit=2, paths=frozenset({"/v1/chat/completions"}))

        async def call(scope: Scope) -> int:
            sent: list[Message] = []

            async def receive() -> Message:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(m: Message) -> None:
                sent.append(m)

            await mw(scope, receive, send)
            return int(sent[0]["status"])

        held = [asyncio.create_task(call(http_scope("a"))) for _ in range(2)]
        await asyncio.sleep(0)
        assert await call(http_scope("a")) == 429  # a third for key a
        other = asyncio.create_task(call(http_scope("b")))  # key b is not affected
        open_path = asyncio.create_task(call(http_scope("a", path="/v1/models")))  # nor other paths
        await asyncio.sleep(0)
        assert mw.inflight == {caller(http_scope("a")): 2, caller(http_scope("b")): 1}
        release.set()
        assert await asyncio.gather(*held, other, open_path) == [200, 200, 200, 200]
        assert not mw.inflight  # everything released, nothing left behind
        assert await call(http_scope("a")) == 200

    asyncio.run(main())

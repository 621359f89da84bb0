"""Bearer-key auth, one dependency per router, and tenants: keys scoped to adapter-name patterns.

Keys come from the environment only, never from flags (a command line is visible to every user of
the machine): LORAPLEX_API_KEYS and LORAPLEX_ADMIN_KEYS (comma-separated, every adapter), and a keys
document, inline in LORAPLEX_KEYS or in the file LORAPLEX_KEYS_FILE names:

    {"keys": [
      {"name": "team-a-app",   "key": "sk-...",        "role": "inference", "adapters": ["team-a/*"]},
      {"name": "team-a-admin", "sha256": "9f86d0...",  "role": "admin",     "adapters": ["team-a/*"]},
      {"name": "ops",          "sha256": "...",        "role": "admin"}
    ]}

`adapters` are glob patterns (fnmatch, case-sensitive) over adapter names; without it a key reaches
every adapter. `sha256` (hex of the key's UTF-8 bytes) keeps the secret itself out of the file.
Inference keys reach the OpenAI routes; admin keys reach everything, and a scoped admin key manages
only the adapters its patterns match. Every key may use the base model. An adapter outside a key's
patterns answers exactly as an unknown name does (404 model_not_found), so names do not leak.
With no key configured at all the server is open (local use)."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.config import Settings
from server.errors import LoraplexError

log = logging.getLogger(__name__)

Scope = Literal["inference", "admin"]
# what a pattern may hold: adapter-name characters and the glob's own
_PATTERN = re.compile(r"^[A-Za-z0-9*?][A-Za-z0-9._*?-]*(/[A-Za-z0-9*?][A-Za-z0-9._*?-]*)?\Z")
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


class AuthError(LoraplexError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class KeysFileError(LoraplexError):
    """The keys document is malformed: the server refuses to start rather than guess."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What one key may do. `patterns` None: every adapter."""

    name: str
    role: Scope
    patterns: tuple[str, ...] | None = None

    def may_use(self, adapter: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatchcase(adapter, p) for p in self.patterns)


OPEN = Grant("anonymous", "admin")  # every request of a server without keys


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    key: str | None = Field(None, min_length=16, max_length=512)
    sha256: str | None = None
    role: Scope = "inference"
    adapters: list[str] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_secret(self) -> _KeyEntry:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' and 'sha256'")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError("'sha256' must be 64 lowercase hex digits")
        for p in self.adapters or []:
            if len(p) > 129 or not _PATTERN.match(p):
                raise ValueError(f"adapter pattern {p!r}: write it as an adapter name, with '*' and '?'")
        return self


class _KeysDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[_KeyEntry] = Field(max_length=10_000)


def parse_keys_document(text: str, source: str) -> list[tuple[bytes, Grant]]:
    """(sha256 digest, grant) of every key in a keys document; KeysFileError names what is wrong
    (never the secret: pydantic's message would quote the bad input, so only locations are kept)."""
    try:
        doc = _KeysDocument.model_validate(json.loads(text))
    except json.JSONDecodeError as e:
        raise KeysFileError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'document'}: {err['msg']}"
            for err in e.errors(include_input=False)
        )
        raise KeysFileError(f"{source}: {problems}") from None
    entries: list[tuple[bytes, Grant]] = []
    for entry in doc.keys:
        digest = bytes.fromhex(entry.sha256) if entry.sha256 else _digest(entry.key or "")
        patterns = tuple(entry.adapters) if entry.adapters is not None else None
        entries.append((digest, Grant(entry.name, entry.role, patterns)))
    names = [g.name for _, g in entries]
    if len(set(names)) != len(names):
        raise KeysFileError(f"{source}: key names must be unique")
    if len({d for d, _ in entries}) != len(entries):
        raise KeysFileError(f"{source}: the same key is listed twice")
    return entries


class KeyRing:
    """Every configured key as (sha256 digest, grant). A presented key is hashed and compared with
    every digest, always, so timing tells nothing about which one matched."""

    def __init__(
        self,
        api_keys: list[str],
        admin_keys: list[str],
        scoped: list[tuple[bytes, Grant]] | None = None,
    ) -> None:
        self.entries: list[tuple[bytes, Grant]] = [
            *((_digest(k), Grant(f"admin-key-{i}", "admin")) for i, k in enumerate(admin_keys)),
            *((_digest(k), Grant(f"api-key-{i}", "inference")) for i, k in enumerate(api_keys)),
            *(scoped or []),
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        scoped: list[tuple[bytes, Grant]] = []
        if settings.keys.strip():
            scoped += parse_keys_document(settings.keys, "LORAPLEX_KEYS")
        file = settings.keys_file
        if file is not None:
            try:
                text = file.read_text()
            except OSError as e:
                raise KeysFileError(f"LORAPLEX_KEYS_FILE: cannot read {file}: {e.strerror}") from None
            scoped += parse_keys_document(text, str(file))
        ring = cls(settings.split(settings.api_keys), settings.split(settings.admin_keys), scoped)
        digests = [d for d, _ in ring.entries]
        if len(set(digests)) != len(digests):
            raise KeysFileError("the same key is configured twice (LORAPLEX_*KEYS and the keys document)")
        if scoped:
            tenants = sum(1 for _, g in scoped if g.patterns is not None)
            log.info("%d keys configured, %d of them scoped to adapter patterns", len(ring.entries), tenants)
        return ring

    @property
    def open(self) -> bool:
        return not self.entries

    def grant_of(self, key: str) -> Grant | None:
        digest = _digest(key)
        found: Grant | None = None
        for d, grant in self.entries:
            if hmac.compare_digest(digest, d) and found is None:
                found = grant
        return found

    def scope_of(self, key: str) -> Scope | None:
        grant = self.grant_of(key)
        return grant.role if grant is not None else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


# where the edge leaves the grant it found for a request with a body, so that the route's
# `require` does not hash every configured key a second time. Not `grant`: a route without
# `require` must still fail closed in `grant()`, whatever the edge did.
EDGE_GRANT = "edge_grant"


def authenticate(keys: KeyRing, authorization: str) -> Grant:
    """The grant of the key an Authorization header carries; AuthError (401) when it carries none
    that is configured. The edge calls it before it reads a request body (an unauthenticated
    client gets its 401 without the server parsing what it sent) and leaves the grant under
    EDGE_GRANT; each route's `require` takes it from there, or calls this itself."""
    if keys.open:
        return OPEN
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token:
        raise AuthError("Missing API key: send 'Authorization: Bearer KEY'.", 401)
    granted = keys.grant_of(token.strip())
    if granted is None:
        raise AuthError("Incorrect API key provided.", 401)
    return granted


def require(scope: Scope) -> Callable[[Request], Coroutine[Any, Any, None]]:
    async def check(request: Request) -> None:
        granted: Grant | None = getattr(request.state, EDGE_GRANT, None)
        if granted is None:
            granted = authenticate(request.app.state.keys, request.headers.get("authorization", ""))
        if scope == "admin" and granted.role != "admin":
            raise AuthError("This endpoint needs an admin key.", 403)
        request.state.grant = granted

    return check


def grant(request: Request) -> Grant:
    """The grant `require` found for this request. Fails closed: a route that asks without a
    `require` dependency is a bug, not an open door."""
    found: Grant | None = getattr(request.state, "grant", None)
    if found is None:
        raise RuntimeError(f"{request.url.path} has no auth dependency")
    return found


def check_manageable(request: Request, adapter: str) -> None:
    """Creating a name outside the key's patterns is refused (403: the answer is the same whether
    or not the name exists, so it tells nothing about other tenants)."""
    g = grant(request)
    if not g.may_use(adapter):
        patterns = ", ".join(g.patterns or ())
        raise AuthError(f"this key may only manage adapters matching {patterns}", 403)

"""Bearer-key auth, one dependency per router. Inference keys reach the OpenAI routes; admin keys
reach everything. With no key configured at all the server is open (local use)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import Request

from server.errors import LoraplexError

log = logging.getLogger(__name__)

Scope = Literal["inference", "admin"]


class AuthError(LoraplexError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class KeyRing:
    def __init__(self, api_keys: list[str], admin_keys: list[str]) -> None:
        self.api_keys = [k.encode() for k in api_keys]
        self.admin_keys = [k.encode() for k in admin_keys]

    @property
    def open(self) -> bool:
        return not self.api_keys and not self.admin_keys

    def scope_of(self, key: str) -> Scope | None:
        raw = key.encode()
        # compare against every key, always, so timing tells nothing about which one matched
        admin = any([hmac.compare_digest(raw, k) for k in self.admin_keys])
        inference = any([hmac.compare_digest(raw, k) for k in self.api_keys])
        if admin:
            return "admin"
        return "inference" if inference else None


def require(scope: Scope) -> Callable[[Request], Coroutine[Any, Any, None]]:
    async def check(request: Request) -> None:
        keys: KeyRing = request.app.state.keys
        if keys.open:
            return
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token:
            raise AuthError("Missing API key: send 'Authorization: Bearer KEY'.", 401)
        granted = keys.scope_of(token.strip())
        if granted is None:
            raise AuthError("Incorrect API key provided.", 401)
        if scope == "admin" and granted != "admin":
            raise AuthError("This endpoint needs an admin key (LORAPLEX_ADMIN_KEYS).", 403)

    return check

"""Fair share per key (--max-concurrent-per-key): one key cannot hold every slot of the queue.

A request is counted from its arrival until its last byte is sent (a stream outlives its handler),
like the drain's count. The caller is the presented bearer key, hashed (the key itself is never
kept); a server without keys counts per client address instead, so one local script still cannot
starve a browser. A request with n choices counts once: the engine's own queue bound (--max-queue)
already counts sequences. Over the limit the answer is 429 `too_many_concurrent_requests` with
Retry-After, before the request is parsed or queued (the edge has already read its body, within
--max-request-bytes), so a refused request costs little. An invalid key is
counted too, but only against itself, and it is refused with 401 a moment later."""

from __future__ import annotations

import hashlib
from collections import Counter

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api import errors


def caller(scope: Scope) -> str:
    """Who a request counts against: its key's digest, else its client address."""
    header = Headers(scope=scope).get("authorization", "")
    kind, _, token = header.partition(" ")
    if kind.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()
    client = scope.get("client")
    return f"addr:{client[0] if client else 'unknown'}"


class FairShareMiddleware:
    """Counts inference requests in flight per caller and refuses those over `limit`. The check
    and the count happen in one synchronous step on the event loop, so two requests arriving
    together cannot both take the last place."""

    def __init__(self, app: ASGIApp, limit: int, paths: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.inflight: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        who = caller(scope)
        if self.inflight[who] >= self.limit:
            refusal = errors.envelope(
                429,
                f"this key already has {self.limit} requests in flight (--max-concurrent-per-key); "
                "retry when one has finished",
                "rate_limit_error",
                "too_many_concurrent_requests",
            )
            await refusal(scope, receive, send)
            return
        self.inflight[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight[who] -= 1
            if not self.inflight[who]:
                del self.inflight[who]

"""The bridge from the engine thread to the requests' asyncio queues."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from server.engine.async_engine import AsyncEngine
from server.engine.engine import RequestOutput


class RecordingLoop:
    """An event loop's call_soon_threadsafe, recorded instead of scheduled."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        self.calls.append((fn, args))


def test_a_steps_outputs_wake_each_event_loop_once_and_keep_their_order() -> None:
    front = AsyncEngine(cast(Any, SimpleNamespace(cache=SimpleNamespace(on_loaded=None))), max_queue=8)
    a, b = RecordingLoop(), RecordingLoop()
    queues: dict[str, asyncio.Queue[Any]] = {rid: asyncio.Queue() for rid in "wxy"}
    front._streams = {
        "w": (cast(Any, a), queues["w"]),
        "x": (cast(Any, b), queues["x"]),
        "y": (cast(Any, a), queues["y"]),
    }
    # z's stream is gone (its client left): its output is dropped
    outputs = [RequestOutput(rid, (i,), str(i), False, None, 1, 1) for i, rid in enumerate("wxzyw")]
    front._deliver(outputs)
    assert len(a.calls) == 1 and len(b.calls) == 1
    for fn, args in a.calls + b.calls:
        fn(*args)
    got = {rid: [q.get_nowait().token_ids for _ in range(q.qsize())] for rid, q in queues.items()}
    assert got == {"w": [(0,), (4,)], "x": [(1,)], "y": [(3,)]}
    front._deliver([])
    assert len(a.calls) == 1 and len(b.calls) == 1

"""The engine thread and one asyncio stream per request: the only bridge between HTTP and the model.

Engine faults: an exception inside a step kills the engine, it does not skip the step. A step
that raised may leave the scheduler, the KV block tables and the adapter slots half-updated, and
carrying on from there could serve wrong tokens; a restart is the only state known to be good. So
every request in flight gets a terminal error (`RequestOutput.error`), `alive` turns False
(/health and /ready answer 503, new requests 503 `engine_unavailable`), and `loraplex serve`
exits with status 3 (EXIT_ENGINE_FAULT) once those errors are sent, for its supervisor (Docker's
restart policy, Kubernetes, systemd) to start a fresh process. An embedding that runs the loop
with start() keeps the dead engine and must watch `alive` itself.

Test-only: LORAPLEX_TEST_FAULT=step:N, read once when the AsyncEngine is built, makes the N-th
step (1-based, counted from start, the warm-up's steps included) raise instead of running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable

from server.engine.engine import LLMEngine, RequestOutput
from server.engine.sequence import Sequence
from server.errors import EngineDeadError, QueueFullError

log = logging.getLogger(__name__)

FAULT_ENV = "LORAPLEX_TEST_FAULT"
_Item = RequestOutput | Exception  # what a request's stream carries
# `loraplex serve`'s status after an engine fault: not 1 (start-up failed) nor 2 (no model)
EXIT_ENGINE_FAULT = 3


def fault_step(value: str | None) -> int | None:
    """The step LORAPLEX_TEST_FAULT ("step:N") makes raise; a malformed value is refused loudly,
    since a fault test that silently injects nothing would pass for the wrong reason."""
    if not value:
        return None
    kind, _, n = value.partition(":")
    if kind != "step" or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected step:N with N >= 1")
    return int(n)


class AsyncEngine:
    """Runs LLMEngine.step() on one thread, which alone touches the model and device tensors.

    Requests and aborts arrive through a thread-safe inbox; outputs go back to each request's
    asyncio.Queue through `call_soon_threadsafe`. `start()` gives the loop a thread of its own
    (tests, embedding); `loraplex serve` calls `run()` on the main thread instead, because torch's
    OpenMP pool runs every CPU step ~1.8x slower on a secondary thread (see README, benchmarks).
    """

    def __init__(self, engine: LLMEngine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        # a queued exception ends that stream by being raised from generate() (see fail_all)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[_Item]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._running = threading.Event()
        self._external = False  # the loop runs on a thread the caller owns (see hold())
        self.error: BaseException | None = None
        self.last_progress = time.monotonic()  # /health: the loop is alive and not stuck
        self._closed: Callable[[], Exception] | None = None  # set by fail_all: refuse new requests
        self._fault_step = fault_step(os.environ.get(FAULT_ENV))
        self._steps = 0
        if self._fault_step is not None:
            log.warning("test-only fault injection: step %d will raise (%s)", self._fault_step, FAULT_ENV)
        engine.cache.on_loaded = self._wake.set

    def start(self) -> None:
        """Run the loop on a thread of its own, unless the caller has claimed it with hold()."""
        if self._external:
            return
        self._running.set()  # alive from now on: requests may be submitted before the thread runs
        self._thread.start()

    def hold(self) -> None:
        """Promise to call run() on the caller's thread; requests are accepted from now on."""
        self._external = True
        self._running.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.engine.cache.close()

    @property
    def alive(self) -> bool:
        return self._running.is_set() and self.error is None

    def run(self) -> None:
        """The engine loop, on the calling thread, until shutdown()."""
        self._running.set()
        try:
            self._loop()
        finally:
            self._running.clear()

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    async def generate(self, seq: Sequence) -> AsyncGenerator[RequestOutput, None]:
        """Submit `seq` and yield its outputs until it finishes. Leaving early (client gone) aborts it."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        if self._closed is not None:
            raise self._closed()
        q: asyncio.Queue[_Item] = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._streams)} requests are in flight (max_queue {self.max_queue})"
                )
            self._streams[seq.request_id] = (asyncio.get_running_loop(), q)
        self._send("add", seq)
        finished = False
        try:
            while not finished:
                out = await q.get()
                if not isinstance(out, RequestOutput):
                    raise out  # the finally aborts the sequence in the engine
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._send("abort", seq.request_id)
            with self._lock:
                self._streams.pop(seq.request_id, None)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    def fail_all(self, error: Callable[[], Exception]) -> int:
        """End every request in flight by raising `error()` from its generate(), which also aborts
        its sequence in the engine, and refuse later ones with it (a request that was past the
        HTTP checks but not yet submitted must not slip in behind). The graceful drain's last
        step when its timeout expires. Thread-safe; returns how many streams were ended."""
        self._closed = error
        with self._lock:
            streams = list(self._streams.values())
        for loop, q in streams:
            loop.call_soon_threadsafe(q.put_nowait, error())  # one exception object per stream
        return len(streams)

    def _send(self, kind: str, item: object) -> None:
        self._inbox.put((kind, item))
        self._wake.set()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                outputs = self._step() if self.engine.has_work() else []
                self._deliver(outputs)
                self.last_progress = time.monotonic()
                if not outputs and (not self.engine.has_work() or self.engine.scheduler.running == []):
                    # idle, or waiting on adapter loads: sleep until new work or a finished load
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as e:  # the engine is dead: say so to every waiting client
            log.exception("engine loop crashed")
            self.error = e
            with self._lock:
                ids = list(self._streams)
            self._deliver(
                [RequestOutput(rid, (), "", True, "abort", 0, 0, error=f"engine failure: {e}") for rid in ids]
            )

    def _step(self) -> list[RequestOutput]:
        self._steps += 1
        if self._steps == self._fault_step:
            raise RuntimeError(f"injected fault in step {self._steps} ({FAULT_ENV}, test-only)")
        return self.engine.step()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                assert isinstance(item, Sequence)
                self.engine.add_request(item)
            else:
                out = self.engine.abort(str(item))
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Each output to its request's queue: one `call_soon_threadsafe` per event loop per step,
        not one per output. Each call takes the lock, writes the loop's wake-up pipe and lets the
        loop's thread contend for the GIL with this one: the engine thread's served step (bench/
        host_step.py, `x served`) was 1.97 ms at 64 streams and 6.79 ms at 256 with one call per
        output, 1.51 and 5.57 ms batched. Each queue still gets its outputs in order."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Item], _Item]]] = {}
        with self._lock:
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    batches.setdefault(target[0], []).append((target[1], out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    """On the event loop: a step's outputs into their queues (unbounded: never blocks)."""
    for q, item in items:
        q.put_nowait(item)

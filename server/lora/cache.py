"""Host-memory tier: parsed adapters kept in an LRU, filled from disk by a background loader so that
the engine thread never waits on a file while other requests are decoding."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.errors import AdapterError
from server.lora.adapter import AdapterWeights
from server.lora.registry import AdapterRecord
from server.torch_threads import use_one_torch_thread

log = logging.getLogger(__name__)


class AdapterCache:
    def __init__(
        self,
        capacity: int,
        load: Callable[[AdapterRecord], AdapterWeights],
        on_loaded: Callable[[], None] | None = None,
        pin: bool = False,
        max_bytes: int | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`capacity` adapters and, when set, `max_bytes` of their tensors (modules_to_save copies
        make one adapter hundreds of MB); the most recent adapter is kept whatever its size."""
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._load = load
        self.pin = pin  # page-locked copies for asynchronous copies to a GPU
        self.factor_dtype = factor_dtype  # the slots' (--lora-dtype): factors are kept cast to it
        self.on_loaded = on_loaded  # wakes the engine loop when a load finishes
        self._lru: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._loading: dict[str, Future[None]] = {}
        self._failed: dict[str, AdapterError] = {}
        self._lock = threading.Lock()
        self._load_done = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adapter-loader", initializer=use_one_torch_thread
        )
        self.hits = 0
        self.misses = 0
        self.observe_load: Callable[[float], None] | None = None  # load-time histogram, if any

    def get(self, record: AdapterRecord) -> AdapterWeights | None:
        """The parsed adapter, or None while it loads (the load starts here). Raises the load's error."""
        key = record.version
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                self.hits += 1
                return self._lru[key]
            if key in self._failed:
                raise self._failed[key]
            if key not in self._loading:
                self.misses += 1
                self._loading[key] = self._pool.submit(self._load_one, record)
        return None

    def put(self, key: str, weights: AdapterWeights) -> None:
        """Keep `weights` (as the loader would: cast and, for a GPU, page-locked)."""
        self._keep(key, self._prepare(weights))

    def _prepare(self, weights: AdapterWeights) -> AdapterWeights:
        # Cast here, not in the registry: a mix combines its parts' fp32 factors first.
        weights = weights.with_factor_dtype(self.factor_dtype)
        return weights.pinned() if self.pin else weights

    def _keep(self, key: str, weights: AdapterWeights) -> None:
        with self._lock:
            self._lru[key] = weights
            self._lru.move_to_end(key)
            while len(self._lru) > self.capacity or (
                self.max_bytes is not None
                and len(self._lru) > 1
                and sum(w.nbytes for w in self._lru.values()) > self.max_bytes
            ):
                self._lru.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._lru.pop(key, None)
            self._failed.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def _load_one(self, record: AdapterRecord) -> None:
        start = time.perf_counter()
        try:
            weights = self._prepare(self._load(record))
        except AdapterError as e:
            log.error("adapter %s (%s) failed to load: %s", record.name, record.version[:12], e)
            with self._lock:
                self._failed[record.version] = e
        except Exception as e:  # a loader bug must not kill the loader thread or hang requests
            log.exception("adapter %s failed to load", record.name)
            with self._lock:
                self._failed[record.version] = AdapterError(f"adapter {record.name!r} failed to load: {e}")
        else:
            self._keep(record.version, weights)
            if self.observe_load is not None:
                self.observe_load(time.perf_counter() - start)
        finally:
            with self._lock:
                self._loading.pop(record.version, None)
                self._load_done.notify_all()
            if self.on_loaded:
                self.on_loaded()

    def wait_for_loads(self, timeout: float) -> None:
        """Block until no load is in flight (for synchronous drivers of the engine, e.g. tests)."""
        with self._lock:
            self._load_done.wait_for(lambda: not self._loading, timeout=timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

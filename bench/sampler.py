"""What the soak watches while the load runs, from a thread of the bench process: /health every
second (each answer that is not 200 in time is a failure), and every few seconds the server's RSS
and its engine gauges from /metrics."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.live_server import LiveServer

GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def engine_gauges(metrics_text: str) -> dict[str, float]:
    """running, waiting and kv_usage from a /metrics page (summed over model_name labels)."""
    out = dict.fromkeys(GAUGES.values(), 0.0)
    seen = set()
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name in GAUGES:
                out[GAUGES[s.name]] += s.value
                seen.add(s.name)
    missing = set(GAUGES) - seen
    if missing:
        raise ValueError(f"/metrics lacks {', '.join(sorted(missing))}")
    return out


@dataclass
class Sampler:
    server: LiveServer
    health_every: float = 1.0
    rss_every: float = 5.0
    health_timeout: float = 10.0
    started: float = field(default_factory=time.monotonic)
    health_checks: int = 0
    health_failures: list[str] = field(default_factory=list)
    health_max_s: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)
    gauges: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _loop(self) -> None:
        next_rss = 0.0
        with httpx.Client(base_url=self.server.url, timeout=self.health_timeout) as client:
            while not self._stop.is_set():
                tick = time.monotonic()
                self._health(client)
                if self.elapsed() >= next_rss:
                    next_rss = self.elapsed() + self.rss_every
                    self.rss.append((self.elapsed(), self.server.rss_bytes()))
                    # the gauges are a record of the run; /health is the goal
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        self.gauges.append((self.elapsed(), engine_gauges(client.get("/metrics").text)))
                self._stop.wait(max(0.0, self.health_every - (time.monotonic() - tick)))

    def _health(self, client: httpx.Client) -> None:
        self.health_checks += 1
        start = time.monotonic()
        try:
            status = client.get("/health").status_code
            if status != 200:
                self.health_failures.append(f"{self.elapsed():.0f}s: HTTP {status}")
        except httpx.HTTPError as e:
            self.health_failures.append(f"{self.elapsed():.0f}s: {type(e).__name__}: {e}")
        self.health_max_s = max(self.health_max_s, time.monotonic() - start)


def rss_drift(rss: list[tuple[float, int]], warmup_s: float, end_s: float) -> dict[str, float]:
    """RSS after warm-up (the first sample at or after `warmup_s`), at the end (the last sample at
    or before `end_s`, while the load still ran), their drift in percent, and the peak between."""
    after = [(t, b) for t, b in rss if warmup_s <= t <= end_s and b > 0]
    if len(after) < 2:
        raise ValueError(f"fewer than 2 RSS samples between {warmup_s:.0f}s and {end_s:.0f}s")
    warm, end = after[0][1], after[-1][1]
    return {
        "warmup_s": warmup_s,
        "warm_mib": warm / 2**20,
        "end_mib": end / 2**20,
        "peak_mib": max(b for _, b in after) / 2**20,
        "drift_pct": 100.0 * (end - warm) / warm,
    }

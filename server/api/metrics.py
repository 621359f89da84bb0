"""Prometheus metrics. vLLM's names (`vllm:` prefix) where a gateway or dashboard expects them,
`loraplex:` for the rest. Engine state is read at scrape time; request timings are observed by
the routes."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.sequence import Sequence
from server.runtime import Runtime

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Metric]:
        engine = self.rt.engine
        sched = engine.scheduler
        labels = ["model_name"]
        model = [self.rt.model_id]
        running = list(sched.running)
        waiting = list(sched.waiting)
        g = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", labels=labels)
        g.add_metric(model, len(running))
        yield g
        g = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled.", labels=labels)
        g.add_metric(model, len(waiting))
        yield g
        blocks = engine.blocks
        g = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use.", labels=labels
        )
        g.add_metric(model, 1.0 - blocks.num_free / blocks.num_blocks)
        yield g
        # vLLM's info gauge: value 1, the configuration in its labels. An endpoint picker reads
        # block_size and num_gpu_blocks (the KV blocks, on whatever device) to size its prefix index;
        # the KV cache holds the model's compute dtype; there is no prefix caching.
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the KV cache configuration.",
            labels=["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
        )
        kv_dtype = str(self.rt.base.dtype).removeprefix("torch.")
        cache.add_metric([str(blocks.block_size), str(blocks.num_blocks), kv_dtype, "False"], 1.0)
        yield cache

        def names(seqs: list[Sequence]) -> str:
            return ",".join(sorted({s.adapter.name for s in seqs if s.adapter is not None}))

        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (value: last update time).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(engine.config.max_loras), names(running), names(waiting)], time.time())
        yield info
        counters = (
            ("loraplex:adapter_slot_loads", "Adapters copied into a device slot.", engine.slots.loads),
            (
                "loraplex:adapter_slot_evictions",
                "Adapters evicted from a device slot.",
                engine.slots.evictions,
            ),
            ("loraplex:adapter_cpu_cache_hits", "CPU adapter cache hits.", engine.cache.hits),
            (
                "loraplex:adapter_cpu_cache_misses",
                "CPU adapter cache misses (disk loads).",
                engine.cache.misses,
            ),
        )
        for name, doc, value in counters:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        g = GaugeMetricFamily("loraplex:adapters_registered", "Adapters in the registry.")
        g.add_metric([], len(self.rt.registry.records()))
        yield g


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between output tokens.",
            ["model_name"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Tokens generated.", ["model_name"], registry=r
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r
        )
        self.requests = Counter(
            "loraplex:requests", "Requests by adapter and outcome.", ["adapter", "outcome"], registry=r
        )
        self.load_seconds = Histogram(
            "loraplex:adapter_load_seconds",
            "Adapter load time, disk to host memory.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(runtime))
        runtime.engine.cache.observe_load = self.load_seconds.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The metric contract of the llm-d router's endpoint picker (deploy/k8s/overlays/gateway), against a
live server: /metrics read without a key and parsed into metric families the way the picker does,
then read by its rules: queue-scorer and kv-cache-utilization-scorer read three gauges;
lora-affinity-scorer takes, of the vllm:lora_requests_info series whose running or waiting label is
not empty, the one with the largest value (its update time), and splits those labels on commas
(no such series: the pod runs no adapter); vllm:cache_config_info gives block_size and num_gpu_blocks."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_proc import API_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e
SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
RUNNING, WAITING = "pirate", "robot"  # shipped persona adapters
MAX_LORAS = 3
KV_CACHE_TOKENS = 8192  # ServerProc's --kv-cache-tokens
BLOCK_SIZE = 16  # Settings' default
NEW_TOKENS = 24  # ignore_eos: the first request keeps running while the second is observed waiting


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    imports = tmp_path_factory.mktemp("imports")
    for name in (RUNNING, WAITING):
        (imports / name).mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(SHIPPED / name / file, imports / name / file)
    with ServerProc(
        tmp_path_factory.mktemp("store"),
        # one sequence at a time: a second request is deterministically left waiting
        args=["--import-adapters", str(imports), "--max-loras", str(MAX_LORAS), "--max-num-seqs", "1"],
        env={"LORAPLEX_API_KEYS": API_KEY},
    ) as proc:
        yield proc


def scrape(url: str) -> dict[str, Metric]:
    r = httpx.get(f"{url}/metrics", timeout=30)  # the picker sends no key
    assert r.status_code == 200
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def gauge(families: dict[str, Metric], name: str) -> float:
    family = families[name]
    assert family.type == "gauge", name
    [sample] = family.samples
    assert sample.labels == {"model_name": BASE_ID}
    return float(sample.value)


def lora_info(families: dict[str, Metric]) -> dict[str, str] | None:
    """The series lora-affinity-scorer reads, chosen by the picker's rule; None: no adapter there."""
    family = families["vllm:lora_requests_info"]
    assert family.type == "gauge"
    now = time.time()
    for s in family.samples:
        assert abs(s.value - now) < 3600, "the value is the series' update time"
        assert s.labels["max_lora"] == str(MAX_LORAS)
    live = [
        s for s in family.samples if s.labels["running_lora_adapters"] or s.labels["waiting_lora_adapters"]
    ]
    return dict(max(live, key=lambda s: s.value).labels) if live else None


def names(csv: str) -> set[str]:
    return {a.strip() for a in csv.split(",") if a.strip()}


def chat_body(model: str, stream: bool, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def test_idle_server(server: ServerProc) -> None:
    families = scrape(server.url)
    assert gauge(families, "vllm:num_requests_waiting") == 0
    assert gauge(families, "vllm:num_requests_running") == 0
    assert gauge(families, "vllm:kv_cache_usage_perc") == 0
    assert lora_info(families) is None  # series exist, every one with empty labels
    cache = families["vllm:cache_config_info"]
    assert cache.type == "gauge"
    [sample] = cache.samples
    assert sample.value == 1
    assert sample.labels["block_size"] == str(BLOCK_SIZE)
    assert sample.labels["num_gpu_blocks"] == str(KV_CACHE_TOKENS // BLOCK_SIZE)


def test_running_and_waiting_adapters_as_the_picker_sees_them(server: ServerProc) -> None:
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream(
        "POST", url, json=chat_body(RUNNING, True, NEW_TOKENS), headers=headers(API_KEY), timeout=300
    ) as a:
        assert a.status_code == 200
        lines = a.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # generating now
        families = scrape(server.url)
        info = lora_info(families)
        assert info is not None, "a pod decoding an adapter must not look adapter-free"
        assert names(info["running_lora_adapters"]) == {RUNNING}
        assert names(info["waiting_lora_adapters"]) == set()
        assert gauge(families, "vllm:num_requests_running") == 1
        assert 0 < gauge(families, "vllm:kv_cache_usage_perc") <= 1

        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(
                httpx.post, url, json=chat_body(WAITING, False, 2), headers=headers(API_KEY), timeout=300
            )
            deadline = time.monotonic() + 60
            while True:  # bounded poll: the request reaches the scheduler within a loop turn
                families = scrape(server.url)
                info = lora_info(families)
                assert info is not None
                if names(info["waiting_lora_adapters"]) == {WAITING}:
                    break
                assert time.monotonic() < deadline, f"{WAITING} never showed as waiting: {info}"
                time.sleep(0.05)
            assert names(info["running_lora_adapters"]) == {RUNNING}
            assert gauge(families, "vllm:num_requests_waiting") == 1
            assert gauge(families, "vllm:num_requests_running") == 1
            done = [json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"]
            assert done[-1]["choices"][0]["finish_reason"] == "length"
            assert second.result().status_code == 200
    # a finished sequence leaves the scheduler before its last chunk is sent
    families = scrape(server.url)
    assert lora_info(families) is None
    assert gauge(families, "vllm:num_requests_running") == 0

"""Locust users for the HTTP benchmarks. bench/loadgen.py runs this file with `locust --headless` in a
process of its own: gevent patches the standard library, which must not happen inside pytest or a
bench script.

Users (pick them by class name on locust's command line):
- ChatUser: streaming chat completions in a loop, each on a random adapter of --adapter-names (or
  --churn-name, which AdminUser deletes and re-creates, so a 404 there is expected and reported
  under its own name, never as a failure).
- DisconnectUser: the same, but closes the connection after the first content chunk
  (--disconnect-users of them).
- AdminUser (one): upload --churn-name, replace one of the first --replace-count adapters (its
  original bytes and a variant take turns), delete --churn-name; one operation per task.
- JobUser: the fixed requests of --jobs (a JSON list of [model, prompt]), shared by all JobUsers;
  the run quits when the last one is done (bench/http_e2e.py).

Besides locust's own entry per request ("chat", response time = the whole stream), every stream
reports its time to the first content chunk as "TTFT" and each gap between content chunks as "ITL"
(request type SSE), so locust's percentiles are the field's. --report PATH writes them at the end,
with one sample per request (ttft, gaps, tokens, error) for exact figures."""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import gevent
from locust import HttpUser, between, constant, events, task
from locust.clients import ResponseContextManager
from locust.env import Environment
from locust.exception import StopUser

PROMPTS = (
    "Tell me a short story about a dragon.",
    "Explain why the sky is blue.",
    "Write a haiku about tea.",
    "Give me three facts about owls.",
    "What is a prime number?",
    "Describe the moon in one sentence.",
    "How do bicycles stay upright?",
    "Suggest a name for a friendly robot.",
)

# Outcomes that are not failures, each reported under its own name
EXPECTED = {"expected 404": "chat 404 (deleted adapter)", "disconnected": "chat disconnect"}
PERCENTILES = (50, 95, 99)
# connect, and then between two chunks: a stream silent for longer than this has hung
TIMEOUT = (10.0, 300.0)

SAMPLES: list[dict[str, Any]] = []


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--adapter-names", default="", help="comma-separated adapters ChatUser picks from")
    parser.add_argument("--churn-name", default="", help="the adapter AdminUser uploads and deletes")
    parser.add_argument("--variants-dir", default="", help="AdminUser's adapter dirs (see bench/soak.py)")
    parser.add_argument("--replace-count", type=int, default=4, help="AdminUser replaces these adapters")
    parser.add_argument("--admin-pause", type=float, default=2.0, help="seconds between admin operations")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--disconnect-users", type=int, default=0)
    parser.add_argument("--jobs", default="", help="JobUser: JSON file of [model, prompt] pairs")
    parser.add_argument("--report", default="", help="write stats, failures and samples here (JSON)")
    parser.add_argument("--api-key", env_var="LOCUST_API_KEY", default="", include_in_web_ui=False)
    parser.add_argument("--admin-key", env_var="LOCUST_ADMIN_KEY", default="", include_in_web_ui=False)


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    DisconnectUser.fixed_count = opts.disconnect_users
    if opts.jobs:
        JobUser.jobs = deque(tuple(j) for j in json.loads(Path(opts.jobs).read_text()))
        JobUser.total = len(JobUser.jobs)


@events.test_start.add_listener
def _watch_jobs(environment: Environment, **_: Any) -> None:
    """With --jobs, quit once every job has finished (locust itself only knows run times)."""
    if not JobUser.total or environment.runner is None:
        return
    runner = environment.runner

    def watch() -> None:
        while JobUser.done < JobUser.total:
            gevent.sleep(0.1)
        runner.quit()

    gevent.spawn(watch)


@events.quitting.add_listener
def _write_report(environment: Environment, **_: Any) -> None:
    """--report PATH: locust's figures once every user has stopped (its CSV files are written by a
    timer and can miss the last seconds), its failures, and the per-request samples."""
    opts, runner = environment.parsed_options, environment.runner
    if opts is None or not opts.report or runner is None:
        return
    entries = {
        e.name: {
            "method": e.method,
            "requests": e.num_requests,
            "failures": e.num_failures,
            "average_ms": e.avg_response_time,
            "max_ms": e.max_response_time,
            "percentiles_ms": {f"p{q}": e.get_response_time_percentile(q / 100) for q in PERCENTILES},
        }
        for e in runner.stats.entries.values()
    }
    failures = [
        {"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
        for e in runner.stats.errors.values()
    ]
    report = {"entries": entries, "failures": failures, "samples": SAMPLES}
    Path(opts.report).write_text(json.dumps(report) + "\n")


def sse_data(resp: ResponseContextManager) -> Iterator[str]:
    """The data of each server-sent event, as it arrives (chunk_size=None: each chunk of the
    response as the server flushed it, so the gaps measured are the server's, not a buffer's)."""
    buffer = b""
    for piece in resp.iter_content(chunk_size=None):
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[len(b"data: ") :].decode().strip()


class StreamingUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 1.0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        assert opts is not None
        self.opts = opts
        if opts.api_key:
            self.client.headers["Authorization"] = f"Bearer {opts.api_key}"

    def metric(self, name: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=seconds * 1000,
            response_length=0,
            exception=None,
            context={},
        )

    def stream_chat(self, model: str, prompt: str, disconnect: bool = False) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.opts.max_tokens,
            "temperature": self.opts.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sample: dict[str, Any] = {"model": model, "start": time.time(), "ttft": None, "gaps": [], "tokens": 0}
        start = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, stream=True, catch_response=True, name="chat", timeout=TIMEOUT
        ) as resp:
            try:
                error = self._read(resp, sample, start, disconnect)
            except Exception as e:  # a broken connection or a bad chunk: the request failed
                error = f"{type(e).__name__}: {e}"
            sample["total"] = time.perf_counter() - start
            sample["error"] = error
            # locust timed the response head only; the stream is what a user waits for
            meta = {**resp.request_meta, "response_time": sample["total"] * 1000}
            if error in EXPECTED:
                meta["name"] = EXPECTED[error]
                resp.success()
            elif error is None:
                resp.success()
            else:
                resp.failure(error)
            resp.request_meta = meta
        SAMPLES.append(sample)

    def _read(
        self, resp: ResponseContextManager, sample: dict[str, Any], start: float, disconnect: bool
    ) -> str | None:
        """Consume one SSE stream; None when it ended well, else what went wrong (or 'disconnected',
        'expected 404')."""
        if resp.error is not None:
            return f"{type(resp.error).__name__}: {resp.error}"
        if resp.status_code != 200:
            text = resp.text or ""
            if (
                resp.status_code == 404
                and sample["model"] == self.opts.churn_name
                and "model_not_found" in text
            ):
                return "expected 404"
            return f"HTTP {resp.status_code}: {text[:200]}"
        last = start
        finish = None
        for data in sse_data(resp):
            if data == "[DONE]":
                return None if finish else "stream ended without a finish_reason"
            event = json.loads(data)
            if "error" in event:
                return f"error event: {event['error'].get('message')}"
            if event.get("usage"):
                sample["tokens"] = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
                if not choice.get("delta", {}).get("content"):
                    continue
                now = time.perf_counter()
                if sample["ttft"] is None:
                    sample["ttft"] = now - start
                    self.metric("TTFT", now - start)
                    if disconnect:
                        resp.close()  # drops the connection: the server must abort the request
                        return "disconnected"
                else:
                    sample["gaps"].append(now - last)
                    self.metric("ITL", now - last)
                last = now
        return "stream ended without [DONE]"


class ChatUser(StreamingUser):
    @task
    def chat(self) -> None:
        names = self.opts.adapter_names.split(",") + ([self.opts.churn_name] if self.opts.churn_name else [])
        self.stream_chat(random.choice(names), random.choice(PROMPTS))


class DisconnectUser(ChatUser):
    fixed_count = 0  # set from --disconnect-users

    @task
    def chat(self) -> None:
        names = self.opts.adapter_names.split(",") + ([self.opts.churn_name] if self.opts.churn_name else [])
        self.stream_chat(random.choice(names), random.choice(PROMPTS), disconnect=True)


class AdminUser(HttpUser):
    """Upload, replace, delete, in turn. Variants come from --variants-dir: churn/<i>/ for the churn
    name, original/<name>/ and replacement/<name>/ for each replaced adapter."""

    fixed_count = 1

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        assert opts is not None
        self.opts = opts
        if opts.admin_key:
            self.client.headers["Authorization"] = f"Bearer {opts.admin_key}"
        root = Path(opts.variants_dir)
        self.churn = sorted((root / "churn").iterdir())
        self.targets = opts.adapter_names.split(",")[: opts.replace_count]
        self.replaced = dict.fromkeys(self.targets, False)
        self.cycle = 0
        self.step = 0

    def wait_time(self) -> float:
        return float(self.opts.admin_pause)

    def upload(self, name: str, directory: Path, label: str) -> None:
        files = {
            f: (f, (directory / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")
        }
        with self.client.post(
            "/v1/adapters", data={"name": name}, files=files, catch_response=True, name=label, timeout=TIMEOUT
        ) as r:
            if r.status_code not in (200, 201):
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")

    @task
    def churn_step(self) -> None:
        name = self.opts.churn_name
        if self.step == 0:
            self.upload(name, self.churn[self.cycle % len(self.churn)], "admin upload")
        elif self.step == 1:
            target = self.targets[self.cycle % len(self.targets)]
            self.replaced[target] = not self.replaced[target]
            kind = "replacement" if self.replaced[target] else "original"
            self.upload(target, Path(self.opts.variants_dir) / kind / target, "admin replace")
        else:
            with self.client.delete(
                f"/v1/adapters/{name}", catch_response=True, name="admin delete", timeout=TIMEOUT
            ) as r:
                if r.status_code != 200:
                    r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            self.cycle += 1
        self.step = (self.step + 1) % 3


class JobUser(StreamingUser):
    jobs: ClassVar[deque[tuple[str, str]]] = deque()
    total: ClassVar[int] = 0
    done: ClassVar[int] = 0
    wait_time = constant(0)

    @task
    def job(self) -> None:
        if not JobUser.jobs:
            raise StopUser()
        model, prompt = JobUser.jobs.popleft()
        try:
            self.stream_chat(model, prompt)
        finally:
            JobUser.done += 1

"""loraplex on a real local Ray Serve app (server/integrations/ray_serve.py): 2 replicas on CPU,
each with its own `loraplex serve` child, on one shared store. Adapter affinity, greedy output equal
to a single server's, SSE through the ingress with the official client, an upload served by both
replicas, 404/429 passing through, and a replica whose engine is killed being replaced (the deploy
configs and the builder's arguments: tests/unit/test_ray_serve_config.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.config import Settings
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, free_port, headers, upload

REPO = Path(__file__).resolve().parents[2]
PERSONAS = REPO / "adapters"
PROMPT = "Tell me about the sea in one sentence."
TIMEOUT = 300.0
pytestmark = [pytest.mark.e2e, pytest.mark.ray]  # the real model on real Ray Serve: minutes, ~6 GB
KEYS = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
# One OpenMP thread per engine: two children (and the reference server before them) share 2 cores.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CHILD_FLAGS = ["--kv-cache-tokens", "8192", "--max-model-len", "1024", "--log-level", "warning"]
# The shared-store work gave `serve` this flag: with it, uploads on one replica reach the other.
SHARED_STORE = "store_rescan_seconds" in Settings.model_fields


def chat_body(model: str, stream: bool = False, max_tokens: int = 16) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def chat(url: str, model: str, key: str | None = API_KEY) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json=chat_body(model), headers=headers(key), timeout=TIMEOUT
    )


def text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@dataclass
class RayApp:
    url: str
    expected: dict[str, str]  # greedy chat text of a single plain server, per model
    expected_completion: str  # robot, /v1/completions
    child_pids: set[int] = field(default_factory=set)


def _reference(store: Path) -> tuple[dict[str, str], str]:
    """One plain `loraplex serve` imports the personas into the store and answers the oracle
    outputs; it stops before Ray starts, so the engines never outnumber the cores by more."""
    with ServerProc(store, ["--import-adapters", str(PERSONAS)], {**KEYS, **THREADS}) as ref:
        expected = {m: text(chat(ref.url, m)) for m in ("pirate", "robot", "shakespeare", BASE_ID)}
        body = {"model": "robot", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{ref.url}/v1/completions", json=body, headers=headers(API_KEY), timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return expected, str(r.json()["choices"][0]["text"])


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from server.integrations.ray_serve import APP_NAME, build_app

    store = tmp_path_factory.mktemp("ray") / "store"
    store.mkdir()
    expected, completion = _reference(store)
    args = {
        "replicas": 2,
        "adapters_dir": str(store),
        "serve_args": CHILD_FLAGS + (["--store-rescan-seconds", "1"] if SHARED_STORE else []),
        "env": THREADS,
        "num_cpus": 0,  # Ray has 2 CPUs; the children's cores are not Ray's to hand out
        "max_num_seqs": 4,
        "max_queue": 1,
        # above the child's in-flight limit (1), on purpose: a burst must reach the child, whose
        # 429 passes through (the default never lets Serve provoke one)
        "max_ongoing_requests": 16,
        "health_check_period_s": 1,
    }
    port = free_port()
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:  # the raylet, hence every replica and child, inherits them
        for k, v in KEYS.items():
            mp.setenv(k, v)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        print(f"Ray Serve app with 2 replicas ready in {time.monotonic() - started:.0f}s")  # noqa: T201
        rayapp = RayApp(f"http://127.0.0.1:{port}", expected, completion)
        yield rayapp
    finally:
        serve.shutdown()
        ray.shutdown()
    # every engine child the test saw stops with its replica
    assert not [pid for pid in rayapp.child_pids if _alive(pid)], "an engine child outlived Serve"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def replica_info(model: str) -> dict[str, Any]:
    """The replica that holds `model` (Serve routes a multiplexed call there) and its child."""
    from ray import serve

    from server.integrations.ray_serve import APP_NAME

    handle = serve.get_deployment_handle("LoraplexReplica", app_name=APP_NAME)
    info: dict[str, Any] = handle.options(multiplexed_model_id=model).info.remote().result()
    return info


@pytest.fixture(scope="module")
def placement(app: RayApp) -> dict[str, dict[str, Any]]:
    """6 requests for each of 2 adapters through the ingress, in turn: the replica names each got,
    their texts, and the info of the replica that holds each adapter."""
    seen: dict[str, dict[str, Any]] = {}
    for model in ("pirate", "robot"):
        replies = [chat(app.url, model) for _ in range(6)]
        seen[model] = {
            "replicas": [r.headers["x-loraplex-replica"] for r in replies],
            "texts": [text(r) for r in replies],
            "info": replica_info(model),
        }
        app.child_pids.add(seen[model]["info"]["pid"])
    return seen


def all_replicas() -> dict[str, dict[str, Any]]:
    """Every replica's info: unmultiplexed calls spread at random over the replicas."""
    from ray import serve

    from server.integrations.ray_serve import APP_NAME

    handle = serve.get_deployment_handle("LoraplexReplica", app_name=APP_NAME)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(100):
        info = handle.info.remote().result()
        seen[info["replica"]] = info
        if len(seen) == 2:
            break
    return seen


@pytest.mark.parametrize("model", ["pirate", "robot"])
def test_adapter_stays_on_one_replica_with_single_server_output(
    app: RayApp, placement: dict[str, dict[str, Any]], model: str
) -> None:
    got = placement[model]
    assert len(set(got["replicas"])) == 1, got["replicas"]
    assert got["info"]["replica"] == got["replicas"][0]
    assert got["texts"] == [app.expected[model]] * 6


def test_base_model_and_routes_pass_through(app: RayApp, placement: dict[str, dict[str, Any]]) -> None:
    assert text(chat(app.url, BASE_ID)) == app.expected[BASE_ID]
    for path in ("/health", "/ready"):
        r = httpx.get(app.url + path, timeout=TIMEOUT)
        assert r.status_code == 200 and r.headers["x-loraplex-replica"], r.text
    r = httpx.get(f"{app.url}/v1/models", headers=headers(API_KEY), timeout=TIMEOUT)
    assert {m["id"] for m in r.json()["data"]} >= {BASE_ID, "pirate", "robot", "shakespeare", "fan"}
    # auth is the child's: no key, its 401 envelope and header come back unchanged
    r = chat(app.url, "pirate", key=None)
    envelope(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["x-loraplex-replica"] == placement["pirate"]["info"]["replica"]


def test_sse_through_ingress_with_openai_client(app: RayApp, placement: dict[str, dict[str, Any]]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{app.url}/v1", api_key=API_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": PROMPT}]
    chunks = client.chat.completions.create(
        model="shakespeare", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == app.expected["shakespeare"]
    assert sum(1 for p in pieces if p) > 1  # token by token, not one block
    comp = client.completions.create(model="robot", prompt=PROMPT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in comp if c.choices) == app.expected_completion
    body = chat_body("robot", stream=True)
    with httpx.stream(
        "POST", f"{app.url}/v1/chat/completions", json=body, headers=headers(API_KEY), timeout=TIMEOUT
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-loraplex-replica"] == placement["robot"]["info"]["replica"]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 3 and events[-1] == "data: [DONE]"


def poll_status(url: str, model: str, status: int) -> httpx.Response:
    """Bounded polling: a store rescan (1 s) brings another replica's change to this child."""
    deadline = time.monotonic() + 60
    while (r := chat(url, model)).status_code != status:
        assert time.monotonic() < deadline, (url, r.status_code, r.text)
        time.sleep(0.2)
    return r


def test_upload_through_ingress_served_by_both_replicas(app: RayApp) -> None:
    if not SHARED_STORE:
        pytest.skip("shared adapter store not landed (no --store-rescan-seconds): replicas can't see uploads")
    children = {name: info["url"] for name, info in all_replicas().items()}
    assert len(children) == 2
    r = upload(app.url, "bard", PERSONAS / "shakespeare")  # the shakespeare weights, a new name
    assert r.status_code == 201, r.text
    assert r.headers["x-loraplex-replica"] in children
    for url in children.values():  # each replica's own child, directly
        assert text(poll_status(url, "bard", 200)) == app.expected["shakespeare"]
    assert text(chat(app.url, "bard")) == app.expected["shakespeare"]
    r = httpx.delete(f"{app.url}/v1/adapters/bard", headers=headers(ADMIN_KEY), timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["deleted"] is True, r.text
    for url in children.values():
        envelope(poll_status(url, "bard", 404), 404, "model_not_found")


def test_unknown_model_404_and_queue_full_429_pass_through(
    app: RayApp, placement: dict[str, dict[str, Any]]
) -> None:
    r = chat(app.url, "no-such-adapter")
    envelope(r, 404, "model_not_found")
    assert r.headers["x-loraplex-replica"] in {p["info"]["replica"] for p in placement.values()}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=headers(API_KEY), timeout=TIMEOUT) as client:
            url = f"{app.url}/v1/chat/completions"
            return list(
                await asyncio.gather(*[client.post(url, json=chat_body("pirate")) for _ in range(12)])
            )

    replies = asyncio.run(burst())  # the children accept 1 request in flight (--max-queue 1)
    assert {r.status_code for r in replies} == {200, 429}, [r.status_code for r in replies]
    for r in replies:
        assert r.headers["x-loraplex-replica"] == placement["pirate"]["info"]["replica"]
        if r.status_code == 429:
            assert envelope(r, 429, "queue_full")["type"] == "rate_limit_error"
            assert r.headers["retry-after"].isdigit()
        else:
            assert text(r) == app.expected["pirate"]


def replica_ids() -> set[str]:
    import ray

    from server.integrations.ray_serve import APP_NAME

    prefix = f"SERVE_REPLICA::{APP_NAME}#LoraplexReplica#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n[len(prefix) :] for n in names if n.startswith(prefix)}


def test_killed_engine_fails_health_check_and_replica_is_replaced(
    app: RayApp, placement: dict[str, dict[str, Any]]
) -> None:
    from ray import serve

    from server.integrations.ray_serve import APP_NAME

    before = replica_ids()
    victim = replica_info("pirate")
    os.kill(victim["pid"], signal.SIGKILL)
    r = chat(app.url, "pirate")  # its replica still holds the adapter, but the engine is gone
    envelope(r, 503, "engine_unavailable")
    assert r.headers["x-loraplex-replica"] == victim["replica"]
    # health checks every 1 s; after 3 failures Serve stops the replica and starts a new one
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = serve.status().applications[APP_NAME].deployments["LoraplexReplica"]
        live = replica_ids()
        if victim["replica"] not in live and len(live) == 2 and status.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, (live, status)
        time.sleep(0.5)
    (new,) = live - before
    infos = all_replicas()
    assert set(infos) == live
    app.child_pids.add(infos[new]["pid"])
    deadline = time.monotonic() + 60  # routers learn of the replacement through the controller
    while (r := chat(app.url, "pirate")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert text(r) == app.expected["pirate"] and r.headers["x-loraplex-replica"] in live

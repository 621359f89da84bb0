"""schemathesis against a live server's own /openapi.json: every operation fuzzed (positive and
negative data, boundary values from the coverage phase) with the admin key, with an inference key and
without a key. Allowed outcomes: a 2xx that conforms to its declared schema, media type and headers,
or a declared 4xx with the OpenAI envelope; never a 5xx. The server runs with a 64-token context and
max_tokens at most 4, so generations stay short, over a store of its own (fuzzed DELETEs and uploads
touch nothing another test uses). Seeded: CI replays the same cases. The counts are printed at the end.

Before the fuzz, plain regression tests for what fuzzing found: a 405 whose Allow missed a method of
the path, a NUL byte in lora_path (a 500), completions' default max_tokens above --max-tokens-limit;
and NaN/Infinity, which Python's JSON parser reads and no sampling parameter may carry."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.config import (
    CoveragePhaseConfig,
    GenerationConfig,
    PhasesConfig,
    ProjectConfig,
    ProjectsConfig,
    SchemathesisConfig,
    StatefulPhaseConfig,
)

from server.lora.registry import NAME_RE
from tests.e2e.server_proc import ADMIN_KEY, API_KEY, BASE_ID, ServerProc, headers

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).parent.parent.parent / "adapters"
ADAPTER = "pirate"  # one shipped adapter in the fuzz server's own store: fuzzed requests use a LoRA too
SEED = 12  # fixed: the same cases on every run
# Fuzzing-phase cases per operation (the admin key's coverage phase adds about 1 800 of its own)
MAX_EXAMPLES = {"admin": 12, "inference": 12, "anonymous": 4}
KEYS: dict[str, str | None] = {"admin": ADMIN_KEY, "inference": API_KEY, "anonymous": None}
# Every stateless check but one: `positive_data_acceptance` (a schema-valid request may still be
# refused: a prompt may not fit the 64-token context, a tool_choice may name a tool not in `tools`).
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
    checks.allow_header_conformance,
    checks.unsupported_method,
]
STATS: Counter[tuple[str, str, int]] = Counter()  # (key, operation, status) -> cases


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    imports = tmp_path_factory.mktemp("fuzz-imports")
    shutil.copytree(SHIPPED / ADAPTER, imports / ADAPTER)
    store = tmp_path_factory.mktemp("fuzz-store")
    args = [
        *("--max-model-len", "64", "--max-tokens-limit", "4", "--max-n", "2", "--max-stop", "4"),
        *("--kv-cache-tokens", "2048", "--store-rescan-seconds", "0", "--import-adapters", str(imports)),
    ]
    env = {"LORAPLEX_API_KEYS": API_KEY, "LORAPLEX_ADMIN_KEYS": ADMIN_KEY}
    with ServerProc(store, args=args, env=env) as server:
        yield server


# -- regressions: what the fuzzer found ---------------------------------------------------------


def envelope(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error


def test_undeclared_method_is_405_with_allow(fuzz_server: ServerProc) -> None:
    admin = headers(ADMIN_KEY)
    # GET and POST of /v1/adapters are two routes: Allow names both, whichever the router tried first
    for method, path, allow in [
        ("DELETE", "/v1/adapters", "GET, POST"),
        ("POST", "/v1/adapters/x", "DELETE, GET"),
        ("GET", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
    ]:
        r = httpx.request(method, fuzz_server.url + path, headers=admin, json={}, timeout=30)
        assert envelope(r, 405)["code"] == "method_not_allowed", (method, path)
        assert r.headers["allow"] == allow, (method, path)


def test_undeclared_method_before_media_type(fuzz_server: ServerProc) -> None:
    """A method the path does not answer is a 405 whatever the body (RFC 9110), not a 415."""
    r = httpx.put(fuzz_server.url + "/v1/models", headers=headers(ADMIN_KEY), timeout=30)
    assert envelope(r, 405)["code"] == "method_not_allowed"


def test_nan_and_infinity_are_refused(fuzz_server: ServerProc) -> None:
    """Python's JSON parser reads NaN and Infinity; no sampling parameter may carry them."""
    for field in ('"temperature": NaN', '"logit_bias": {"5": Infinity}', '"top_p": -Infinity'):
        body = f'{{"model": "{BASE_ID}", "prompt": "Hi", "max_tokens": 2, {field}}}'
        r = httpx.post(
            fuzz_server.url + "/v1/completions",
            content=body,
            headers={**headers(API_KEY), "content-type": "application/json"},
            timeout=60,
        )
        envelope(r, 400)


def test_a_nul_byte_in_lora_path_is_a_400(fuzz_server: ServerProc) -> None:
    r = httpx.post(
        fuzz_server.url + "/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": "/tmp/a\x00b"},
        headers=headers(ADMIN_KEY),
        timeout=30,
    )
    assert envelope(r, 400)["param"] == "lora_path"


def maxima(schema: dict[str, Any]) -> list[Any]:
    """Every `maximum` in a property's schema, its anyOf branches included."""
    found = [schema["maximum"]] if "maximum" in schema else []
    return found + [m for branch in schema.get("anyOf", []) for m in maxima(branch)]


def test_completions_default_max_tokens_is_within_the_limit(fuzz_server: ServerProc) -> None:
    """Without max_tokens a completion gets OpenAI's 16 tokens, but never more than --max-tokens-limit."""
    body = {"model": BASE_ID, "prompt": "Once upon a time", "ignore_eos": True}
    r = httpx.post(fuzz_server.url + "/v1/completions", json=body, headers=headers(API_KEY), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


def test_the_document_describes_this_server(fuzz_server: ServerProc) -> None:
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json()
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert maxima(request["max_tokens"]) == [4] and maxima(request["n"]) == [2]
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert ADAPTER not in json.dumps(doc)  # names are not listed: /openapi.json needs no key


# -- the fuzz -----------------------------------------------------------------------------------


def flatmap_body(context: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
    """Most generated `model` values are adapter-shaped names nobody registered (a 404 before the
    engine): a valid one is swapped for the base model or the adapter, so bodies reach the engine.
    An invalid one is kept, so a negative case stays negative."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not (model == BASE_ID or NAME_RE.match(model)):
        return st.just(body)
    return st.sampled_from([BASE_ID, BASE_ID, ADAPTER, model]).map(lambda m: {**body, "model": m})


def load(server: ServerProc, who: str) -> Any:
    """The server's document, fuzzed as `who`. The admin key gets every phase: explicit examples,
    coverage (boundary values of each keyword, undeclared methods, missing fields) and fuzzing.
    The other keys meet the same validation behind a 401 or 403, so random cases are enough."""
    phases = PhasesConfig(
        coverage=CoveragePhaseConfig(enabled=who == "admin"),
        stateful=StatefulPhaseConfig(enabled=False),  # no links in the document: nothing to chain
    )
    config = SchemathesisConfig(
        seed=SEED,
        projects=ProjectsConfig(
            default=ProjectConfig(
                request_timeout=120,
                phases=phases,
                generation=GenerationConfig(
                    max_examples=MAX_EXAMPLES[who],
                    deterministic=True,
                    # keys are passed per request: none generated, so "anonymous" sends none at all
                    with_security_parameters=False,
                ),
            )
        ),
    )
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    schema.hook(flatmap_body)
    return schema


@pytest.fixture(scope="module")
def admin_schema(fuzz_server: ServerProc) -> Any:
    return load(fuzz_server, "admin")


@pytest.fixture(scope="module")
def inference_schema(fuzz_server: ServerProc) -> Any:
    return load(fuzz_server, "inference")


@pytest.fixture(scope="module")
def anonymous_schema(fuzz_server: ServerProc) -> Any:
    return load(fuzz_server, "anonymous")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schema renames each operation's subtest through `_nodeid`, an
    attribute pytest 9.2 no longer has: give it one (pytest itself reads `_id`)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def fuzz(case: schemathesis.Case, who: str) -> None:
    response = case.call_and_validate(headers=headers(KEYS[who]), checks=CHECKS, timeout=120)
    if 400 <= response.status_code < 500:  # every error is the OpenAI envelope, declared or not
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), response.text
    STATS[who, case.operation.label, response.status_code] += 1


# One lazy schema and one test per key: a lazy schema's test takes no parametrized fixture
FUZZ_SETTINGS = settings(deadline=None, suppress_health_check=list(HealthCheck))
admin = schemathesis.pytest.from_fixture("admin_schema")
inference = schemathesis.pytest.from_fixture("inference_schema")
anonymous = schemathesis.pytest.from_fixture("anonymous_schema")


@pytest.mark.slow
@admin.parametrize()
@FUZZ_SETTINGS
def test_fuzz_admin_key(case: schemathesis.Case) -> None:
    fuzz(case, "admin")


@pytest.mark.slow
@inference.parametrize()
@FUZZ_SETTINGS
def test_fuzz_inference_key(case: schemathesis.Case) -> None:
    fuzz(case, "inference")


@pytest.mark.slow
@anonymous.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_key(case: schemathesis.Case) -> None:
    fuzz(case, "anonymous")


@pytest.mark.slow
def test_fuzz_totals(capsys: pytest.CaptureFixture[str]) -> None:
    """How much ran and what came back (the README quotes the total): no 5xx, and fuzzed bodies
    reach the engine (a 200 from each generation route with the admin key)."""
    if not STATS:
        pytest.skip("the fuzz did not run in this session")
    by_status: Counter[int] = Counter()
    for (_, _, status), n in STATS.items():
        by_status[status] += n
    per_key = {w: sum(n for (k, _, _), n in STATS.items() if k == w) for w in KEYS}
    generated = {op: STATS["admin", op, 200] for op in ("POST /v1/chat/completions", "POST /v1/completions")}
    with capsys.disabled():
        print(  # noqa: T201
            f"\nfuzz: {sum(STATS.values())} cases {per_key}, statuses {dict(sorted(by_status.items()))}; "
            f"admin-key generations answered 200: {generated}"
        )
    assert not [s for s in by_status if s >= 500]
    assert all(generated.values()), "no fuzzed generation reached the engine"

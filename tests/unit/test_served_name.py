"""--served-model-name (vLLM's flag): the id clients send for the base model, from a runtime built
as `loraplex serve` builds it, over the real app."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.api.app import create_app
from server.config import Settings
from server.runtime import build_runtime

SERVED = "acme/tiny-llama:v1"


def test_the_served_name_is_the_base_models_id(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint("llama")
    settings = Settings.model_validate(
        {
            "model": str(checkpoint),
            "served_model_name": SERVED,
            "quantization": "none",
            "device": "cpu",
            "cache_dir": tmp_path,
            "kv_cache_tokens": 256,
            "api_keys": "",
            "admin_keys": "",
        }
    )
    runtime = build_runtime(settings)
    try:
        client = TestClient(create_app(runtime), raise_server_exceptions=False)  # no lifespan: no engine loop
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [SERVED]
        assert client.get(f"/v1/models/{SERVED}").status_code == 200
        assert client.post("/tokenize", json={"model": SERVED, "prompt": "hi"}).status_code == 200
        r = client.post("/tokenize", json={"model": checkpoint.name, "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    finally:
        runtime.engine.cache.close()


@pytest.mark.parametrize("name", ["a+b", "a*2", " a", "a b", "", "-a", "a\n", "x" * 129])
def test_a_served_name_that_would_spell_a_mix_or_need_escaping_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="served_model_name"):
        Settings.model_validate({"served_model_name": name})

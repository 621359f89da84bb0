"""vLLM's start-up flags: --served-model-name (the id clients send for the base model),
--lora-modules (adapters named at start), --chat-template (the operator's template) and
--generation-config (the checkpoint's sampling defaults), from a
runtime built as `loraplex serve` builds it, over the real app; their refusals; the command-line
and environment forms of a list flag."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.api import openai_routes, prompting
from server.api.app import create_app
from server.api.schemas import ChatCompletionRequest
from server.cli import _add_settings_flags, _settings
from server.config import Settings
from server.errors import StartupAdapterError, StartupError
from server.lora import startup_modules
from server.model.chat_template import load_chat_template
from server.runtime import Runtime, build_runtime

SERVED = "acme/tiny-llama:v1"


def runtime_with(checkpoint: Path, cache: Path, **extra: Any) -> Runtime:
    fields = {"model": str(checkpoint), "quantization": "none", "device": "cpu", "cache_dir": cache}
    return build_runtime(
        Settings.model_validate({**fields, "kv_cache_tokens": 256, "api_keys": "", "admin_keys": "", **extra})
    )


def test_served_name_and_lora_modules(
    tiny_checkpoint: Callable[[str], Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint("llama")
    modules = [
        f"persona-a={adapters['a']}",
        json.dumps({"name": "team/b", "path": str(adapters["b"]), "base_model_name": "meta-llama/x"}),
    ]
    runtime = runtime_with(checkpoint, tmp_path, served_model_name=SERVED, lora_modules=modules)
    try:
        client = TestClient(create_app(runtime), raise_server_exceptions=False)  # no lifespan: no engine loop
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert set(listed) == {SERVED, "persona-a", "team/b"}
        assert listed["team/b"]["parent"] == SERVED and listed["team/b"]["root"] == "team/b"
        assert client.get(f"/v1/models/{SERVED}").status_code == 200
        assert client.post("/tokenize", json={"model": SERVED, "prompt": "hi"}).status_code == 200
        r = client.post("/tokenize", json={"model": checkpoint.name, "prompt": "hi"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    finally:
        runtime.engine.cache.close()


def test_aliases_after_the_first_served_name_reach_the_base_model(
    tiny_checkpoint: Callable[[str], Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM's reading of several names: a request may send any of them; the base answers, lists
    its adapters and is counted under the first; each name is a base card in /v1/models; no
    adapter may take one."""
    checkpoint = tiny_checkpoint("llama")
    names = [SERVED, "tiny", "acme/alias"]
    with pytest.raises(StartupAdapterError, match="'acme/alias' is the base model's id"):
        runtime_with(
            checkpoint, tmp_path, served_model_name=names, lora_modules=[f"acme/alias={adapters['a']}"]
        )
    runtime = runtime_with(checkpoint, tmp_path, served_model_name=names, lora_modules=[f"a={adapters['a']}"])
    try:
        assert runtime.model_id == SERVED and runtime.base_names == tuple(names)
        client = TestClient(create_app(runtime), raise_server_exceptions=False)
        listed = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in listed] == [
            (SERVED, None, SERVED),
            ("tiny", None, SERVED),
            ("acme/alias", None, SERVED),
            ("a", SERVED, "a"),
        ]
        card = client.get("/v1/models/acme/alias")
        assert card.status_code == 200 and card.json()["id"] == "acme/alias"
        messages = [{"role": "user", "content": "hi"}]
        for sent in names:
            body = ChatCompletionRequest.model_validate({"model": sent, "messages": messages})
            job = openai_routes._job(runtime, body, [prompting.chat_prompt(runtime, body)], 2, lambda _: True)
            assert job.adapter is None and job.model == SERVED, sent
        mix = {"model": "tiny", "messages": messages, "adapters": [{"name": "a", "weight": 0.5}]}
        body = ChatCompletionRequest.model_validate(mix)
        job = openai_routes._job(runtime, body, [prompting.chat_prompt(runtime, body)], 2, lambda _: True)
        assert job.adapter is not None and job.model == job.adapter.name
        r = client.post("/tokenize", json={"model": "tiny+a", "prompt": "hi"})
        assert r.status_code == 400 and "cannot be part of a mix" in r.json()["error"]["message"]
        model_field = client.get("/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]
        assert {"enum": names} in model_field["properties"]["model"]["anyOf"]
    finally:
        runtime.engine.cache.close()


@pytest.mark.parametrize("name", ["a+b", "a*2", " a", "a b", "-a", "a\n", "x" * 129])
def test_a_served_name_that_would_spell_a_mix_or_need_escaping_is_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="served_model_name"):
        Settings.model_validate({"served_model_name": [name]})


def test_served_names_on_the_command_line_and_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    assert _settings(parser.parse_args(["--served-model-name", "a", "b/c"])).served_model_name == ["a", "b/c"]
    assert _settings(parser.parse_args(["--served-model-name", ""])).served_model_name == []
    for value, names in (("", []), ("a", ["a"]), (" a  b ", ["a", "b"]), ('["a", "b"]', ["a", "b"])):
        monkeypatch.setenv("LORAPLEX_SERVED_MODEL_NAME", value)
        assert Settings.model_validate({}).served_model_name == names, value
    monkeypatch.setenv("LORAPLEX_SERVED_MODEL_NAME", "a b a")
    with pytest.raises(ValidationError, match="'a' named twice"):
        Settings.model_validate({})


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["pirate"], "expected name=path"),
        (["=/x"], "needs a name and a path"),
        (["p="], "needs a name and a path"),
        (['{"name": "p"'], "not valid JSON"),
        (['{"name": "p", "path": "/x", "rank": 8}'], "unknown ['rank']"),
        (['{"name": "p", "path": 3}'], "needs a name and a path"),
        (["p=/x", "p=/y"], "'p' is named twice"),
    ],
)
def test_malformed_lora_modules_are_refused(entries: list[str], message: str) -> None:
    with pytest.raises(StartupAdapterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        startup_modules.parse(entries)


def test_a_lora_module_that_cannot_be_registered_stops_the_start(
    tiny_checkpoint: Callable[[str], Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(adapters["a"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    checkpoint = tiny_checkpoint("llama")
    for modules, says in (
        ([f"x={broken}"], f"--lora-modules x={broken}: "),
        ([f"x={tmp_path / 'absent'}"], "not a directory"),
        ([f"tiny={adapters['a']}"], "is the base model's id"),
    ):
        with pytest.raises(StartupAdapterError, match=says):
            runtime_with(checkpoint, tmp_path / "cache", served_model_name="tiny", lora_modules=modules)


def test_lora_modules_on_the_command_line_and_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    ns = parser.parse_args(["--lora-modules", "a=/x", '{"name": "b", "path": "/y"}', "--max-loras", "2"])
    assert _settings(ns).lora_modules == ["a=/x", '{"name": "b", "path": "/y"}']


TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize("as_file", [True, False], ids=["file", "inline"])
def test_the_operators_chat_template_replaces_the_tokenizers(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, as_file: bool
) -> None:
    value = TEMPLATE
    if as_file:
        (tmp_path / "chat.jinja").write_text(TEMPLATE)
        value = str(tmp_path / "chat.jinja")
    runtime = runtime_with(tiny_checkpoint("llama"), tmp_path / "cache", chat_template=value)
    try:
        client = TestClient(create_app(runtime), raise_server_exceptions=False)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        body = {"messages": messages, "add_generation_prompt": True, "return_token_strs": True}
        r = client.post("/tokenize", json=body)
        assert r.status_code == 200, r.text
        text = "".join(r.json()["token_strs"])
        assert text == "<system>be brief<user>hi<assistant>"
        assert client.get("/tokenizer_info").json()["chat_template"] == TEMPLATE
    finally:
        runtime.engine.cache.close()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("templates/chat.jinja", "looks like a path, but no such file"),
        ("{{ messages | tojsonn }}", "No filter named 'tojsonn'"),
        ("{% for m in messages %}{{ m }}", "line 1: Unexpected end of template"),
        ("{{ messages[0] }", "line 1: unexpected '}'"),
    ],
)
def test_a_chat_template_that_cannot_be_used_stops_the_start(value: str, says: str) -> None:
    with pytest.raises(StartupError, match=re.escape(says)):
        load_chat_template(value)


def test_without_any_chat_template_a_chat_request_is_a_400_that_says_what_to_do(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    checkpoint = tmp_path / "no-template"
    shutil.copytree(tiny_checkpoint("llama"), checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    for f in checkpoint.glob("chat_template*"):
        f.unlink()
    runtime = runtime_with(checkpoint, tmp_path / "cache")
    try:
        client = TestClient(create_app(runtime), raise_server_exceptions=False)
        chat = {"model": "no-template", "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/chat/completions", "/tokenize"):
            r = client.post(path, json=chat)
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
            assert "--chat-template" in r.json()["error"]["message"]
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    finally:
        runtime.engine.cache.close()


GENERATION = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 7}


def checkpoint_with_generation_config(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, **config: Any
) -> Path:
    checkpoint = tmp_path / "with-generation-config"
    shutil.copytree(tiny_checkpoint("llama"), checkpoint)
    (checkpoint / "generation_config.json").write_text(json.dumps({"do_sample": True, **config}))
    return checkpoint


def test_the_checkpoints_generation_config_fills_what_a_request_leaves_out(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    """vLLM's --generation-config auto: temperature, top_p, top_k, repetition_penalty from the
    checkpoint where the request is silent (a field sent with our default's value still wins), and
    max_new_tokens bounding every request's max_tokens; `vllm` ignores the file."""
    checkpoint = checkpoint_with_generation_config(tiny_checkpoint, tmp_path, **GENERATION)
    runtime = runtime_with(checkpoint, tmp_path / "cache")
    messages = [{"role": "user", "content": "hi"}]

    def params(rt: Runtime, **extra: Any) -> tuple[float, float, int, float]:
        body = ChatCompletionRequest.model_validate({"model": rt.model_id, "messages": messages, **extra})
        p = prompting.sampling_params(rt, body, 3, 0, max_tokens=5, logprobs=None, prompt_logprobs=None)
        return p.temperature, p.top_p, p.top_k, p.repetition_penalty

    try:
        assert params(runtime) == (0.6, 0.9, 20, 1.1)
        assert params(runtime, temperature=1.0, top_k=-1) == (1.0, 0.9, 0, 1.1)
        for asked in (None, 20):  # the route's own job building: the sequences' limits
            body = ChatCompletionRequest.model_validate({"model": runtime.model_id, "messages": messages})
            job = openai_routes._job(
                runtime, body, [prompting.chat_prompt(runtime, body)], asked, lambda _: True
            )
            assert [seq.params.max_tokens for seq in job.seqs] == [7], asked
    finally:
        runtime.engine.cache.close()
    plain = runtime_with(checkpoint, tmp_path / "cache", generation_config="vllm")
    try:
        assert params(plain) == (1.0, 1.0, 0, 1.0)
    finally:
        plain.engine.cache.close()


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"temperature": 3.0}, "temperature 3.0"),
        ({"top_p": 0}, "top_p 0"),
        ({"max_new_tokens": 0}, "max_new_tokens 0"),
    ],
)
def test_a_generation_config_no_request_could_send_stops_the_start(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path, config: dict[str, Any], says: str
) -> None:
    checkpoint = checkpoint_with_generation_config(tiny_checkpoint, tmp_path, **config)
    with pytest.raises(StartupError, match=says):
        runtime_with(checkpoint, tmp_path / "cache")


def test_an_inline_template_is_read_as_vllm_reads_it(tmp_path: Path) -> None:
    """Backslash escapes decoded (a one-line template written for vLLM), non-ASCII text kept; a file
    is read as it is; transformers' own tags (generation) compile."""
    assert load_chat_template("{{ 'é' }}\\n{% generation %}x{% endgeneration %}") == (
        "{{ 'é' }}\n{% generation %}x{% endgeneration %}"
    )
    (tmp_path / "t.jinja").write_text("{{ 'a' }}\\n")
    assert load_chat_template(str(tmp_path / "t.jinja")) == "{{ 'a' }}\\n"


def test_generation_config_from_a_directory_of_the_operators(
    tiny_checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    from server.model import generation_defaults

    folder = checkpoint_with_generation_config(tiny_checkpoint, tmp_path, temperature=0.3, top_k=50)
    checkpoint = tiny_checkpoint("llama")
    assert generation_defaults.resolve(str(folder), checkpoint) == {"temperature": 0.3, "top_k": 50}
    assert generation_defaults.resolve("vllm", folder) == {}
    with pytest.raises(StartupError, match=re.escape("no generation_config.json there")):
        generation_defaults.resolve(str(tmp_path), checkpoint)


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("", []),
        ("a=/x  b=/y", ["a=/x", "b=/y"]),
        ('{"name": "a", "path": "/x y"}', ['{"name": "a", "path": "/x y"}']),
        ('["a=/x", "b=/y"]', ["a=/x", "b=/y"]),
    ],
)
def test_lora_modules_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, entries: list[str]
) -> None:
    monkeypatch.setenv("LORAPLEX_LORA_MODULES", value)
    assert Settings.model_validate({}).lora_modules == entries


def test_bad_settings_exit_2_naming_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    monkeypatch.setenv("LORAPLEX_LORA_MODULES", "[not json")
    assert main(["prepare-model"]) == 2
    assert "lora_modules" in capsys.readouterr().err
    monkeypatch.setenv("LORAPLEX_LORA_MODULES", "")
    monkeypatch.setenv("LORAPLEX_SERVED_MODEL_NAME", "")  # empty: unset
    assert Settings.model_validate({}).served_model_name == []


def test_lora_dtype_reaches_the_slots_and_the_upload_check(
    tiny_checkpoint: Callable[[str], Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """--lora-dtype float16 through the runtime `loraplex serve` builds: the slots hold fp16 factors
    (scales fp32), and an adapter with a factor past fp16's range, loaded over HTTP, is a 400 in the
    OpenAI envelope naming the tensor, registered nowhere; an adapter within the range loads."""
    import torch
    from safetensors.torch import load_file, save_file

    big = tmp_path / "imports" / "big"
    shutil.copytree(adapters["a"], big)
    weights = big / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key][0, 0] = 1e5
    save_file(tensors, weights, metadata={"format": "pt"})
    runtime = runtime_with(
        tiny_checkpoint("llama"), tmp_path / "cache", lora_dtype="float16",
        adapter_import_dirs=str(tmp_path / "imports"), lora_modules=[f"small={adapters['a']}"],
    )  # fmt: skip
    try:
        layer = next(iter(runtime.base.lora_layers.values()))
        assert (layer.lora_A.dtype, layer.lora_B.dtype, layer.lora_scale.dtype) == (
            torch.float16, torch.float16, torch.float32
        )  # fmt: skip
        client = TestClient(create_app(runtime), raise_server_exceptions=False)
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(big)})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "65504" in error["message"] and "float16" in error["message"]
        assert error["param"].endswith(".lora_B")
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {runtime.model_id, "small"}
    finally:
        runtime.engine.cache.close()

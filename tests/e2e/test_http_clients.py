"""What real clients send, against the real server on the real default model: request shapes
refused before, sampling controls and logprobs checked against PEFT on the same NF4 base, structured
output and tool calls through the official openai client, and LangChain's ChatOpenAI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from tests.e2e.conftest import nf4_reference
from tests.e2e.server_proc import BASE_ID, ServerProc

pytestmark = pytest.mark.e2e
ADAPTER = "qv-r4"
OTHER = "patterns"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, adapter_dirs: dict[str, Path]) -> Iterator[ServerProc]:
    root = next(iter(adapter_dirs.values())).parent
    with ServerProc(
        tmp_path_factory.mktemp("store"),
        args=["--batch-invariant", "--import-adapters", str(root), "--max-tokens-limit", "512"],
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def peft(model_path: Path, adapter_dirs: dict[str, Path]) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(nf4_reference(model_path), adapter_dirs[ADAPTER], adapter_name=ADAPTER)
    return model.eval()


def post(server: ServerProc, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=300)


def chat(server: ServerProc, content: Any, **kw: Any) -> dict[str, Any]:
    body = {"model": ADAPTER, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
    r = post(server, "/v1/chat/completions", {"max_tokens": 12, **body})
    assert r.status_code == 200, r.text
    return r.json()


def tokenize_chat(server: ServerProc, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    r = post(server, "/tokenize", {"model": ADAPTER, "messages": messages, **kw})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def together(*calls: Any) -> list[Any]:
    """Runs the calls at once, so the engine batches them in the same steps."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


# ------------------------------------------------------------------------ shapes refused before


def test_content_parts_equal_the_plain_string(server: ServerProc) -> None:
    plain = chat(server, "Name a fruit.")
    parts = chat(server, [{"type": "text", "text": "Name a"}, {"type": "text", "text": "fruit."}])
    joined = chat(server, "Name a\nfruit.")
    assert parts["choices"][0]["message"] == joined["choices"][0]["message"]
    assert plain["choices"][0]["message"]["content"]
    r = post(
        server,
        "/v1/chat/completions",
        {
            "model": ADAPTER,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
    )
    assert r.status_code == 400
    assert "image_url" in r.json()["error"]["message"] and "messages" in r.json()["error"]["param"]


def test_stop_lists_nulls_and_top_k_off(server: ServerProc) -> None:
    base = chat(server, "Count from one to ten.", max_tokens=24)["choices"][0]["message"]["content"]
    eight = [f"never{i}" for i in range(7)] + [base[6:12]]
    got = chat(server, "Count from one to ten.", max_tokens=24, stop=eight)["choices"][0]
    assert got["finish_reason"] == "stop" and got["message"]["content"] == base[: base.index(base[6:12])]
    long_stop = chat(server, "Count from one to ten.", max_tokens=24, stop="this stop string is long")
    assert long_stop["choices"][0]["message"]["content"] == base
    nulls = {"temperature": None, "top_p": None, "n": None, "top_k": -1, "stream": None, "seed": 3}
    r = post(
        server,
        "/v1/chat/completions",
        {"model": ADAPTER, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **nulls},
    )
    assert r.status_code == 200, r.text
    too_many = chat_error(server, stop=[f"s{i}" for i in range(17)])
    assert too_many["param"] == "stop"


def chat_error(server: ServerProc, **kw: Any) -> dict[str, Any]:
    r = post(
        server,
        "/v1/chat/completions",
        {"model": ADAPTER, "messages": [{"role": "user", "content": "Hi"}], **kw},
    )
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_prompt_token_ids_and_prompt_lists(server: ServerProc, client: openai.OpenAI) -> None:
    text = "The three primary colours are"
    ids = post(server, "/tokenize", {"model": ADAPTER, "prompt": text}).json()["tokens"]
    by_text = client.completions.create(model=ADAPTER, prompt=text, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=ADAPTER, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(
        model=ADAPTER, prompt=[text, "One, two,"], max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text.choices[0].text
    assert many.choices[2].text != by_text.choices[0].text
    assert many.usage is not None and many.usage.prompt_tokens == len(ids) + len(
        post(server, "/tokenize", {"prompt": "One, two,"}).json()["tokens"]
    )


def test_chat_default_max_tokens_is_the_rest_of_the_context(server: ServerProc) -> None:
    long = "word " * 980
    r = post(
        server,
        "/v1/chat/completions",
        {
            "model": BASE_ID,
            "messages": [{"role": "user", "content": long}],
            "ignore_eos": True,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 1024  # --max-model-len in server_proc
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------ fidelity against PEFT


def test_echo_logprobs_equal_peft_in_a_mixed_batch(server: ServerProc, peft: Any) -> None:
    text = "Paris is the capital of France, and Rome is the capital of"
    ids = post(server, "/tokenize", {"model": ADAPTER, "prompt": text}).json()["tokens"]
    lm_eval = {
        "model": ADAPTER,
        "prompt": text,
        "max_tokens": 1,
        "logprobs": 1,
        "echo": True,
        "temperature": 0,
    }
    neighbour = {
        "model": OTHER,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 16,
    }
    one, zero, _ = together(
        lambda: post(server, "/v1/completions", lm_eval),
        lambda: post(server, "/v1/completions", {**lm_eval, "max_tokens": 0}),
        lambda: post(server, "/v1/chat/completions", neighbour),
    )
    assert one.status_code == zero.status_code == 200, (one.text, zero.text)
    lp = one.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    assert one.json()["choices"][0]["text"].startswith(text)
    peft.set_adapter(ADAPTER)
    with torch.no_grad():
        want = torch.log_softmax(peft(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-3)
        # lm-eval's is_greedy: the token's logprob against the best of top_logprobs
        best = max(lp["top_logprobs"][i].values())
        assert best == pytest.approx(want[i - 1].max().item(), abs=1e-3)
    only_prompt = zero.json()["choices"][0]
    assert only_prompt["text"] == text and len(only_prompt["logprobs"]["tokens"]) == len(ids)
    assert only_prompt["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]
    assert zero.json()["usage"]["completion_tokens"] == 0


def test_penalised_greedy_equals_peft_in_a_mixed_batch(
    server: ServerProc, peft: Any, model_path: Path
) -> None:
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    class OpenAIPenalties(LogitsProcessor):
        def __init__(self, prompt_len: int) -> None:
            self.n = prompt_len

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            counts = torch.bincount(input_ids[0, self.n :], minlength=scores.shape[1]).to(scores.dtype)
            scores[0] -= counts * 0.8 + (counts > 0).to(scores.dtype) * 0.6
            return scores

    messages = [{"role": "user", "content": "List some animals, repeating yourself a lot."}]
    ids = tokenize_chat(server, messages)
    body = {"model": ADAPTER, "messages": messages, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    rep, pen, plain, _ = together(
        lambda: post(server, "/v1/chat/completions", {**body, "repetition_penalty": 1.3, "logprobs": True}),
        lambda: post(
            server, "/v1/chat/completions", {**body, "presence_penalty": 0.6, "frequency_penalty": 0.8}
        ),
        lambda: post(server, "/v1/chat/completions", body),
        lambda: post(server, "/v1/chat/completions", {**body, "model": OTHER}),
    )
    peft.set_adapter(ADAPTER)
    x = torch.tensor([ids])
    kw: dict[str, Any] = {"attention_mask": torch.ones_like(x), "max_new_tokens": 24, "do_sample": False}
    with torch.no_grad():
        want_rep = peft.generate(x, repetition_penalty=1.3, **kw)[0, len(ids) :].tolist()
        want_pen = peft.generate(x, logits_processor=LogitsProcessorList([OpenAIPenalties(len(ids))]), **kw)
        want_plain = peft.generate(x, **kw)[0, len(ids) :].tolist()

    def text(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    def decode(t: list[int]) -> str:
        return str(tokenizer.decode(t, skip_special_tokens=True))

    assert text(rep) == decode(want_rep)
    assert text(pen) == decode(want_pen[0, len(ids) :].tolist())
    assert text(plain) == decode(want_plain)
    assert decode(want_rep) != decode(want_plain)
    assert len(rep.json()["choices"][0]["logprobs"]["content"]) == 24


# --------------------------------------------------------------- structured output and tools


class City(BaseModel):
    city: Literal["Paris", "London", "Rome", "Madrid"]
    is_capital: bool
    population_millions: int = Field(ge=0, le=50)


def test_openai_parse_json_object_and_tool_calls(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "Which city is the capital of France? Answer in JSON."}
    ]
    parsed = client.chat.completions.parse(
        model=ADAPTER, messages=messages, response_format=City, temperature=0, max_tokens=60
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    obj = client.chat.completions.create(
        model=BASE_ID,
        messages=[{"role": "user", "content": 'Reply with a JSON object like {"colour": "red"}.'}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)

    weather: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    asked: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=ADAPTER,
        messages=asked,
        tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=40,
    )
    calls = first.choices[0].message.tool_calls
    call: Any = calls[0] if calls else None
    assert call is not None and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "London", "Rome") and args["unit"] in ("celsius", "fahrenheit")
    history: Any = [
        *asked,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    follow = client.chat.completions.create(
        model=ADAPTER,
        messages=history,
        tools=[weather],
        temperature=0,
        max_tokens=24,
    )
    assert follow.choices[0].message.content


def test_langchain_invoke_stream_and_structured_output(server: ServerProc) -> None:
    from langchain_openai import ChatOpenAI

    settings: dict[str, Any] = {"base_url": f"{server.url}/v1", "api_key": "none", "max_tokens": 16}
    llm = ChatOpenAI(model=ADAPTER, temperature=0, max_retries=0, **settings)
    whole = llm.invoke("Name three colours.")
    streamed = "".join(str(c.content) for c in llm.stream("Name three colours."))
    assert whole.content == streamed and streamed
    roomy = ChatOpenAI(model=ADAPTER, temperature=0, max_retries=0, **{**settings, "max_tokens": 60})
    structured = roomy.with_structured_output(City).invoke("Which city is the capital of Italy?")
    assert isinstance(structured, City)


def test_chat_logprobs_and_continue(server: ServerProc) -> None:
    got = chat(server, "Say hello.", logprobs=True, top_logprobs=3, max_tokens=6)["choices"][0]
    content = got["logprobs"]["content"]
    assert len(content) == 6 and all(len(e["top_logprobs"]) == 3 for e in content)
    assert all(e["logprob"] <= 0 and e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6 for e in content)
    assert "".join(e["token"] for e in content).startswith(got["message"]["content"][:3])
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    ids = tokenize_chat(server, messages, continue_final_message=True, add_generation_prompt=False)
    cont = post(
        server,
        "/v1/chat/completions",
        {
            "model": ADAPTER,
            "messages": messages,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    same = post(
        server, "/v1/completions", {"model": ADAPTER, "prompt": ids, "max_tokens": 8, "temperature": 0}
    )
    assert cont.json()["choices"][0]["message"]["content"] == same.json()["choices"][0]["text"]
    dev = tokenize_chat(server, [{"role": "developer", "content": "Be brief."}, messages[0]])
    sys_ = tokenize_chat(server, [{"role": "system", "content": "Be brief."}, messages[0]])
    assert dev == sys_


def test_streamed_tool_call_logprobs_and_vllm_guided_fields(client: openai.OpenAI) -> None:
    tool: Any = {
        "type": "function",
        "function": {
            "name": "pick",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
                "required": ["colour"],
                "additionalProperties": False,
            },
        },
    }
    stream = client.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "Pick a colour."}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=40,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    reasons, content = [], ""
    for chunk in stream:
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += (d.function.name or "") if d.function else ""
                entry["arguments"] += (d.function.arguments or "") if d.function else ""
    assert list(calls) == [0], (content, reasons)  # parallel_tool_calls=False: one call
    assert calls[0]["name"] == "pick"
    assert json.loads(calls[0]["arguments"])["colour"] in ("red", "green", "blue")
    assert reasons[-1] == "tool_calls"

    streamed = client.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "Say hi."}],
        logprobs=True,
        top_logprobs=2,
        temperature=0,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    entries, usage = [], None
    for chunk in streamed:
        usage = chunk.usage or usage
        for c in chunk.choices:
            entries += c.logprobs.content or [] if c.logprobs else []
    assert usage is not None and len(entries) == usage.completion_tokens == 6

    choice = client.chat.completions.create(
        model=ADAPTER,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        extra_body={"guided_choice": ["yes", "no"]},
        temperature=0,
        max_tokens=5,
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model=ADAPTER,
        prompt="The year is",
        extra_body={"structured_outputs": {"regex": " [0-9]{4}"}},
        temperature=0,
        max_tokens=8,
    )
    assert regex.choices[0].text[1:].isdigit() and len(regex.choices[0].text) == 5
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=ADAPTER,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"},
            extra_body={"guided_regex": "a+"},
        )
    assert refused.value.status_code == 400
    bad_schema = {"type": "array", "contains": {"type": "integer"}, "minContains": 2}
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(
            model=ADAPTER,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": bad_schema}},
        )
    assert "minContains" in str(unsupported.value) and "response_format" in str(unsupported.value)


def test_models_retrieve_and_continuous_usage(server: ServerProc, client: openai.OpenAI) -> None:
    assert client.models.retrieve(ADAPTER).model_dump()["parent"] == BASE_ID
    assert client.models.retrieve(BASE_ID).id == BASE_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    body = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    completions = [e["usage"]["completion_tokens"] for e in events]
    assert completions == sorted(completions) and completions[-1] == 4
    assert all(e["usage"]["prompt_tokens"] > 0 for e in events)

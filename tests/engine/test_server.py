"""The HTTP server, end to end: a real uvicorn server on loopback, the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from gyre import Engine  # noqa: E402
from gyre.engine.server import build_app  # noqa: E402
from gyre.engine.server.background import serve_in_thread  # noqa: E402
from gyre.testing import tiny_model  # noqa: E402

MODEL = "tiny-qwen3"
ADMIN_KEY = "test-admin-key-0123"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@dataclass
class Server:
    url: str
    engine: Engine
    app: object

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kw)

    def admin(self, path: str, key: str | None = ADMIN_KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.post("/admin/" + path, headers=headers, **kw)

    def idle(self, timeout: float = 20.0) -> dict:
        """Wait until nothing is running or waiting; returns the engine's stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.call(self.engine.stats, timeout=10)
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                return stats
            assert time.monotonic() < deadline, f"the engine did not drain: {stats}"
            time.sleep(0.05)


def _serve(engine: Engine, **kw):
    app = build_app(engine, model_name=MODEL, **kw)
    with serve_in_thread(app) as url:
        yield Server(url, engine, app)
    unexpected = [e for e in app.state.gyre.server_errors if e[2] != 503]  # 503: paused, loading (by design)
    assert not unexpected, f"the server answered with a 5xx: {unexpected}"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny_model("qwen3", tmp_path_factory.mktemp("model") / "qwen3")


@pytest.fixture(scope="module")
def engine(model_path):
    e = Engine(model_path, max_num_tokens=32768)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("weight_roots")


@pytest.fixture(scope="module")
def server(engine, roots):
    yield from _serve(engine, admin_key=ADMIN_KEY, allowed_weight_roots=[roots])


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# -- a model that calls a tool ------------------------------------------------------------------------
def tool_calling_model(path: Path) -> Path:
    """A tiny qwen3 whose greedy reply to any chat is `<tool_call>CALL_JSON</tool_call><|im_end|>`.

    Its layers add nothing to the residual (o_proj = down_proj = 0), so the last position's hidden state
    is its token's embedding, and lm_head maps each token of the chain "\\n" -> <tool_call> -> CALL_JSON
    -> </tool_call> -> <|im_end|> to the next. CALL_JSON is one added token of the tokenizer.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tiny_model("qwen3", path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([AddedToken(CALL_JSON, special=False, normalized=False)])
    tok.save_pretrained(path, save_jinja_files=False)
    chain = tok.convert_tokens_to_ids(["Ċ", "<tool_call>", CALL_JSON, "</tool_call>", "<|im_end|>"])
    w = load_file(path / "model.safetensors")
    for name in w:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w[name] = torch.zeros_like(w[name])
    emb, norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
    head = torch.zeros_like(w["lm_head.weight"])
    for t, nxt in zip(chain, chain[1:]):
        h = emb[t] * torch.rsqrt(emb[t].pow(2).mean() + 1e-6) * norm  # the final norm's output for t
        head[nxt] = 30 * h / h.norm()
    w["lm_head.weight"] = head
    save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    e = Engine(tool_calling_model(tmp_path_factory.mktemp("toolmodel") / "m"), max_num_tokens=8192)
    yield from _serve(e)
    e.shutdown()


# -- basics -------------------------------------------------------------------------------------------
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.get(f"/v1/models/{MODEL}").json()["max_model_len"] == server.engine.max_model_len
    assert server.get("/v1/models/other").status_code == 404
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=4)
    text = server.get("/metrics").text
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")
    }
    for name in (
        "gyre_num_running",
        "gyre_num_waiting",
        "gyre_cache_hit_rate",
        "gyre_weight_version",
        "gyre_generation_tokens_per_second",
        "gyre_num_generated_tokens_total",
    ):
        assert name in values, name
    assert values["gyre_num_generated_tokens_total"] >= 4
    assert "# TYPE gyre_num_generated_tokens_total counter" in text


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0.7, seed=1)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0
    again = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0.7, seed=1)
    assert again.choices[0].message.content == choice.message.content  # seeded: reproducible
    developer = client.chat.completions.create(
        model=MODEL,
        max_completion_tokens=3,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    assert developer.usage.completion_tokens <= 3


def test_chat_n_logprobs_match_native(server, client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=8,
        n=3,
        seed=7,
        logprobs=True,
        top_logprobs=3,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    prompt_ids = r.model_extra["prompt_token_ids"]
    # the same prompt tokens and sampling through the native endpoint give the same tokens and logprobs
    native = server.post(
        "/generate",
        json={
            "input_ids": prompt_ids,
            "sampling_params": {
                "max_new_tokens": 8,
                "n": 3,
                "seed": 7,
                "top_logprobs": 3,
                "ignore_eos": True,
            },
        },
    ).json()
    assert r.usage.completion_tokens == 24
    for choice, out in zip(r.choices, native["completions"]):
        content = choice.logprobs.content
        assert len(content) == 8 and choice.model_extra["token_ids"] == out["output_ids"]
        assert [e.logprob for e in content] == pytest.approx(out["output_logprobs"], abs=1e-5)
        for e in content:
            tops = [t.logprob for t in e.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6
            assert isinstance(e.bytes, list)
    assert len({tuple(c.model_extra["token_ids"]) for c in r.choices}) > 1  # n samples differ


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=24, seed=3, extra_body={"return_token_ids": True})
    full = client.chat.completions.create(**kw, logprobs=True)
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, logprobs=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra.get("token_ids", [])]
    lps = [
        e.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert text == full.choices[0].message.content
    assert ids == full.choices[0].model_extra["token_ids"]
    assert lps == pytest.approx([e.logprob for e in full.choices[0].logprobs.content])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ids) and not chunks[-1].choices


def test_streaming_n_and_stop(server, client):
    base = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=30, seed=11, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].message.content
    stop = text[8:11]  # a stop string the seeded reply is known to contain
    assert stop.strip()
    streamed = {0: "", 1: ""}
    for c in client.chat.completions.create(
        model=MODEL,
        messages=USER,
        max_tokens=30,
        seed=11,
        n=2,
        extra_body={"ignore_eos": True},
        stop=[stop],
        stream=True,
    ):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    cut = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=30, seed=11, n=2, extra_body={"ignore_eos": True}, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    for ch in cut.choices:
        assert streamed[ch.index] == ch.message.content and stop not in streamed[ch.index]


def test_completions(client):
    r = client.completions.create(
        model=MODEL, prompt="The weather today is", max_tokens=5, logprobs=2, seed=0
    )
    (choice,) = r.choices
    assert len(choice.logprobs.tokens) == r.usage.completion_tokens <= 5
    assert all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0
    batch = client.completions.create(model=MODEL, prompt=[[10, 11, 12], [13, 14]], max_tokens=3, n=2)
    assert len(batch.choices) == 4 and batch.usage.prompt_tokens == 5
    echo = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, echo=True)
    assert echo.choices[0].text.startswith("Hello")
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, seed=5)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == client.completions.create(**kw).choices[0].text


def test_generate_native(server):
    r = server.post(
        "/generate",
        json={
            "input_ids": [[5, 6, 7, 8], [9, 10]],
            "sampling_params": {"max_new_tokens": 5, "temperature": 0.0, "n": 2},
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert body["weight_version"] == server.engine.weight_version
    outs = body["completions"]
    assert [(o["prompt_index"], o["index"]) for o in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for o in outs:
        assert len(o["output_ids"]) == len(o["output_logprobs"]) == len(o["output_weight_versions"]) <= 5
        assert set(o["output_weight_versions"]) <= {body["weight_version"]}
    assert outs[0]["output_ids"] == outs[1]["output_ids"]  # greedy


# -- tools --------------------------------------------------------------------------------------------
def test_tools_reach_the_template(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], max_tokens=4, extra_body={"return_token_ids": True}
    )
    from gyre.testing import tiny_tokenizer

    prompt = tiny_tokenizer().decode(r.model_extra["prompt_token_ids"])
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert r.choices[0].message.role == "assistant"


def test_tool_calls(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    deltas = list(
        client.chat.completions.create(
            model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, stream=True
        )
    )
    content = "".join(d.choices[0].delta.content or "" for d in deltas if d.choices)
    calls = [tc for d in deltas if d.choices for tc in d.choices[0].delta.tool_calls or []]
    assert content.strip() == "" and "<tool_call>" not in content
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert deltas[-1].choices[0].finish_reason == "tool_calls"

    raw = client.chat.completions.create(
        model=MODEL, messages=USER, tools=[WEATHER_TOOL], temperature=0, tool_choice="none"
    )
    assert raw.choices[0].message.tool_calls is None and "<tool_call>" in raw.choices[0].message.content
    # the reply goes back into the conversation as OpenAI clients send it
    follow = client.chat.completions.create(
        model=MODEL,
        tools=[WEATHER_TOOL],
        temperature=0,
        messages=[
            *USER,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
    )
    assert follow.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_constrained_outputs(tool_server):
    """response_format and forced tool calls constrain decoding (xgrammar); the reply parses them."""
    pytest.importorskip("xgrammar")
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0)
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["city", "ok"],
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "ok": {"type": "boolean"}},
    }
    r = client.chat.completions.create(
        model=MODEL,
        messages=USER,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
    )
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"city", "ok"} and obj["city"] in ("Paris", "Oslo") and isinstance(obj["ok"], bool)
    any_object = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=60, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)

    tool = {"type": "function", "function": {"name": "check", "parameters": schema}}
    named = {"type": "function", "function": {"name": "check"}}
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=60, tools=[tool], tool_choice=named
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "check" and set(json.loads(call.function.arguments)) == {"city", "ok"}
    deltas = [
        d.choices[0].delta
        for d in client.chat.completions.create(
            model=MODEL,
            messages=USER,
            temperature=0,
            max_tokens=60,
            tools=[tool],
            tool_choice=named,
            stream=True,
        )
    ]
    assert not "".join(d.content or "" for d in deltas)  # nothing streams as content
    (streamed,) = [tc for d in deltas for tc in d.tool_calls or []]
    assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)
    # "required": an array of calls; this model never closes it, so check the constraint held
    r = client.chat.completions.create(
        model=MODEL, messages=USER, temperature=0, max_tokens=30, tools=[tool], tool_choice="required"
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.replace(" ", "").startswith('[{"name":"check","parameters":')


def test_forced_tool_call_parsing():
    from gyre.engine.server.replies import forced_tool_calls

    (named,) = forced_tool_calls('{"city": "Oslo"}', "get_weather")
    assert named["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    calls = forced_tool_calls(
        '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]', None
    )
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    for bad in ('[{"name": "a", "parameters": {', "[]", "[1]", '{"name": "a"}'):
        assert forced_tool_calls(bad, None) is None
    assert forced_tool_calls("[1]", "f") is None


# -- invalid input: 4xx in OpenAI's error shape, never a 5xx ------------------------------------------
def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": USER, **kw}


INVALID = [
    ("negative max_tokens", "/v1/chat/completions", _chat(max_tokens=-1), 400),
    ("zero max_completion_tokens", "/v1/chat/completions", _chat(max_completion_tokens=0), 400),
    ("negative temperature", "/v1/chat/completions", _chat(temperature=-0.5), 400),
    ("top_p 0", "/v1/chat/completions", _chat(top_p=0), 400),
    ("n 0", "/v1/chat/completions", _chat(n=0), 400),
    ("huge n", "/v1/chat/completions", _chat(n=100000), 400),
    ("top_logprobs 21", "/v1/chat/completions", _chat(logprobs=True, top_logprobs=21), 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", _chat(top_logprobs=2), 400),
    ("seed beyond int64", "/v1/chat/completions", _chat(seed=2**64), 400),
    ("empty stop", "/v1/chat/completions", _chat(stop=[""]), 400),
    (
        "over-long prompt",
        "/v1/chat/completions",
        _chat(messages=[{"role": "user", "content": "hello " * 3000}]),
        400,
    ),
    ("max_tokens past the context", "/v1/chat/completions", _chat(max_tokens=10**9), 400),
    ("unknown model", "/v1/chat/completions", _chat(model="gpt-5"), 404),
    ("no messages", "/v1/chat/completions", _chat(messages=[]), 400),
    ("unknown role", "/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("user without content", "/v1/chat/completions", _chat(messages=[{"role": "user"}]), 400),
    (
        "image content",
        "/v1/chat/completions",
        _chat(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
        ),
        400,
    ),
    ("tool without name", "/v1/chat/completions", _chat(tools=[{"type": "function", "function": {}}]), 400),
    (
        "tool name with spaces",
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        400,
    ),
    (
        "tool parameters not an object schema",
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
        400,
    ),
    (
        "tool parameters not a dict",
        "/v1/chat/completions",
        _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}]),
        400,
    ),
    ("tool_choice required without tools", "/v1/chat/completions", _chat(tool_choice="required"), 400),
    (
        "tool_choice names an unknown function",
        "/v1/chat/completions",
        _chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
        400,
    ),
    (
        "response_format json_schema without a schema",
        "/v1/chat/completions",
        _chat(response_format={"type": "json_schema"}),
        400,
    ),
    (
        "response_format with an invalid schema",
        "/v1/chat/completions",
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
        400,
    ),
    ("response_format yaml", "/v1/chat/completions", _chat(response_format={"type": "yaml"}), 400),
    ("logit_bias", "/v1/chat/completions", _chat(logit_bias={"5": 10}), 400),
    (
        "lone surrogate",
        "/v1/chat/completions",
        '{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "a\\ud800"}]}',
        400,
    ),
    ("stream with bad input", "/v1/chat/completions", _chat(stream=True, temperature=-1), 400),
    ("completions: empty prompt list", "/v1/completions", {"model": MODEL, "prompt": []}, 400),
    ("completions: empty token prompt", "/v1/completions", {"model": MODEL, "prompt": [[]]}, 400),
    ("completions: suffix", "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400),
    ("completions: token id out of vocab", "/v1/completions", {"model": MODEL, "prompt": [10**6]}, 400),
    ("generate: empty", "/generate", {"input_ids": []}, 400),
    ("generate: negative token id", "/generate", {"input_ids": [-1]}, 400),
    ("generate: token id out of vocab", "/generate", {"input_ids": [999999]}, 400),
    ("generate: unknown sampling field", "/generate", {"input_ids": [1], "sampling_params": {"foo": 1}}, 400),
    ("generate: invalid regex", "/generate", {"input_ids": [1], "sampling_params": {"regex": "(a"}}, 400),
    (
        "generate: json_schema not JSON",
        "/generate",
        {"input_ids": [1], "sampling_params": {"json_schema": "{"}},
        400,
    ),
    (
        "generate: NaN temperature",
        "/generate",
        '{"input_ids": [1], "sampling_params": {"temperature": NaN}}',
        400,
    ),
    ("malformed JSON", "/v1/chat/completions", '{"model": "tiny-qwen3", "messages": [', 400),
    ("not JSON at all", "/v1/chat/completions", "hello", 400),
    ("JSON array body", "/v1/completions", "[1, 2]", 400),
    ("unknown session", "/v1/sessions/sess-nope/append", {"token_ids": [1]}, 404),
]


@pytest.mark.parametrize("path,body,status", [x[1:] for x in INVALID], ids=[x[0] for x in INVALID])
def test_invalid_input(server, path, body, status):
    if isinstance(body, str):
        r = server.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    else:
        r = server.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and set(err) == {"message", "type", "param", "code"}


def test_invalid_input_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL,
            messages=USER,
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": "oops"}},
                }
            ],
        )


def test_body_limits_and_host_header(server, engine):
    assert server.get("/health", headers={"Host": "evil.example:80"}).status_code == 400  # DNS rebinding
    small = build_app(engine, model_name=MODEL, max_body_bytes=1000)
    with serve_in_thread(small) as url:
        r = httpx.post(url + "/generate", json={"input_ids": list(range(1000))})
        assert r.status_code == 413 and r.json()["error"]["message"]

        def chunks():
            yield b'{"input_ids": ['
            for _ in range(500):
                yield b"1, "
            yield b"1]}"

        chunked = httpx.post(
            url + "/generate", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert 400 <= chunked.status_code < 500


# -- admin --------------------------------------------------------------------------------------------
def test_admin_needs_the_key(server, engine):
    for path in ("pause", "resume", "flush_cache", "abort", "update_weights_from_disk", "release_memory",
                 "load_draft"):
        assert server.admin(path, key=None).status_code == 401
        assert server.admin(path, key="wrong-key-123456").status_code == 401
    assert server.admin("pause", key=None, content=b"{not json").status_code == 401  # before the body
    off = build_app(engine, model_name=MODEL)  # no key configured: the admin endpoints do not exist
    with serve_in_thread(off) as url:
        for path in ("pause", "update_weights_from_disk"):
            r = httpx.post(f"{url}/admin/{path}", headers={"Authorization": "Bearer anything"})
            assert r.status_code == 404


def test_admin_disk_update_roots_and_symlinks(server, model_path, roots, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(model_path, outside)
    inside = roots / "step1"
    shutil.copytree(model_path, inside)
    (roots / "link").symlink_to(outside, target_is_directory=True)
    mixed = roots / "mixed"  # a real directory inside the root whose shard is a symlink to outside
    mixed.mkdir()
    (mixed / "model.safetensors").symlink_to(outside / "model.safetensors")
    cases = {
        str(outside): 403,
        str(roots / "link"): 403,
        str(inside / ".." / ".." / "outside"): 403,
        str(mixed): 403,
        "/etc": 403,
        str(roots / "missing"): 400,
    }
    for path, status in cases.items():
        r = server.admin("update_weights_from_disk", json={"path": path})
        assert r.status_code == status, (path, r.text)
    before = server.engine.weight_version
    r = server.admin("update_weights_from_disk", json={"path": str(inside)})
    assert r.status_code == 200 and r.json()["weight_version"] == before + 1
    out = server.post(
        "/generate", json={"input_ids": [3, 4], "sampling_params": {"max_new_tokens": 2}}
    ).json()
    assert out["completions"][0]["output_weight_versions"] == [before + 1] * 2
    r = server.admin("update_weights_from_disk", json={"path": str(inside), "version": 100})
    assert r.json()["weight_version"] == 100
    r = server.admin("load_draft", json={"path": str(inside)})  # this engine has no drafter
    assert r.status_code == 400 and "spec_method" in r.json()["error"]["message"]


def test_admin_control(server, client):
    r = server.admin("pause", json={"mode": "in_place"})
    try:
        assert r.status_code == 200
        health = server.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "paused"
    finally:
        assert server.admin("resume").status_code == 200
    assert server.get("/health").status_code == 200
    assert server.admin("flush_cache").json()["pages_freed"] >= 0
    assert server.admin("release_memory", json={"tags": ["kv_cache"]}).status_code == 200
    try:
        assert server.get("/health").json()["status"] == "memory_released"
    finally:
        assert server.admin("resume_memory", json={"tags": ["kv_cache"]}).json()["released"] == []
    assert server.get("/health").status_code == 200
    assert server.admin("pause", json={"mode": "sideways"}).status_code == 400
    assert server.admin(
        "update_weights_from_group", json={"names": ["x"], "dtypes": ["float32"], "shapes": [[1]]}
    ).status_code in (400, 409)
    # abort a running request by the id of its reply
    result: dict = {}

    def long_request() -> None:
        result["r"] = client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=900, extra_body={"ignore_eos": True}
        )

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 20
    while not server.app.state.gyre.live and time.monotonic() < deadline:
        time.sleep(0.01)
    (reply_id,) = list(server.app.state.gyre.live)
    time.sleep(0.2)
    assert server.admin("abort", json={"request_id": reply_id}).status_code == 200
    t.join(30)
    assert result["r"].id == reply_id and result["r"].choices[0].finish_reason == "abort"
    assert result["r"].usage.completion_tokens < 900


def test_health_wedged(server, engine):
    app = build_app(engine, model_name=MODEL, health_timeout_s=0.5)
    with serve_in_thread(app) as url:
        release = threading.Event()
        blocker = threading.Thread(target=engine.call, args=(lambda: release.wait(10),))
        blocker.start()  # the engine thread is stuck in a call: nothing is generated
        try:
            r = httpx.get(url + "/health", timeout=30)
            assert r.status_code == 503 and r.json()["status"] == "wedged"
        finally:
            release.set()
            blocker.join()
        assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_health_while_loading(model_path):
    gate = threading.Event()

    def load() -> Engine:
        gate.wait(30)
        return Engine(model_path, max_num_tokens=4096)

    app = build_app(load, model_name=MODEL)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/health").json()["status"] == "loading"
        r = httpx.post(url + "/v1/chat/completions", json=_chat())
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        gate.set()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=2)).status_code == 200
    assert app.state.gyre.engine._stopped  # the app owned the engine and shut it down


# -- disconnects --------------------------------------------------------------------------------------
def test_disconnects_abort_and_the_queue_drains(server):
    server.idle()
    before = server.engine.call(server.engine.stats, timeout=10)["num_generated_tokens"]
    body = _chat(max_tokens=800, ignore_eos=True, stream=True)

    async def client_that_leaves(http: httpx.AsyncClient) -> None:
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content"' in line and '"role"' not in line:
                    break  # the first token arrived: hang up

    async def many() -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as http:
            await asyncio.gather(*(client_that_leaves(http) for _ in range(50)))
            try:  # and one non-streaming client that gives up after a moment
                await http.post(
                    server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5
                )
            except httpx.TimeoutException:
                pass

    asyncio.run(many())
    stats = server.idle(timeout=20)
    generated = stats["num_generated_tokens"] - before
    assert generated < 51 * 800 // 4, f"{generated} tokens: the requests were not aborted"
    assert not server.app.state.gyre.live
    assert stats["kv_free_pages"] + stats["kv_cached_pages"] == stats["kv_total_pages"]  # nothing leaked
    r = server.post("/v1/chat/completions", json=_chat(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_engine_package_does_not_import_the_server():
    """gyre.engine stays importable without fastapi: only the server package imports it, and no module
    of the engine imports the server package."""
    import ast

    engine_dir = Path(__file__).parents[2] / "gyre" / "engine"
    for f in engine_dir.rglob("*.py"):
        if "server" in f.relative_to(engine_dir).parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert not name.startswith(("fastapi", "starlette", "uvicorn", "gyre.engine.server")), (
                    f,
                    name,
                )

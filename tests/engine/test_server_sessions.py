"""Session endpoints: tool-using agent loops over HTTP whose trajectories are exactly the tokens the engine
generated plus those appended; nothing is re-tokenised."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gyre import Engine  # noqa: E402
from gyre.testing import tiny_model, tiny_tokenizer  # noqa: E402
from tests.engine.test_server import MODEL, USER, WEATHER_TOOL, _serve, tool_calling_model  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    e = Engine(tiny_model("qwen3", tmp_path_factory.mktemp("model") / "qwen3"), max_num_tokens=32768)
    yield from _serve(e)
    e.shutdown()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    e = Engine(tool_calling_model(tmp_path_factory.mktemp("toolmodel") / "m"), max_num_tokens=8192)
    yield from _serve(e)
    e.shutdown()


def _open(server) -> str:
    r = server.post("/v1/sessions")
    assert r.status_code == 200
    return r.json()["id"]


def _check_trajectory(
    traj: dict, expected: list[int], generated: list[tuple[int, list[int], list[float]]]
) -> None:
    """expected: every token in order; generated: (start, token ids, logprobs) of each generated span."""
    assert traj["token_ids"] == expected
    mask = [0] * len(expected)
    for start, ids, lps in generated:
        mask[start : start + len(ids)] = [1] * len(ids)
        assert traj["token_ids"][start : start + len(ids)] == ids
        assert traj["logprobs"][start : start + len(ids)] == pytest.approx(lps, abs=1e-5)
        assert all(v is not None for v in traj["weight_versions"][start : start + len(ids)])
    assert traj["loss_mask"] == mask
    assert all((lp is None) == (m == 0) for lp, m in zip(traj["logprobs"], mask))


def test_agent_loop_with_the_openai_client(tool_server):
    """An unmodified OpenAI agent loop (whole conversation resent every turn) pointed at a session."""
    sid = _open(tool_server)
    agent = openai.OpenAI(base_url=f"{tool_server.url}/v1/sessions/{sid}", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "You answer weather questions."}, *USER]
    expected: list[int] = []
    generated = []
    for turn in range(3):
        r = agent.chat.completions.create(
            model=MODEL,
            messages=messages,
            tools=[WEATHER_TOOL],
            temperature=0,
            logprobs=True,
            extra_body={"return_token_ids": True},
        )
        (choice,) = r.choices
        out = choice.model_extra["token_ids"]
        expected += r.model_extra["appended_token_ids"]
        generated.append((len(expected), out, [e.logprob for e in choice.logprobs.content]))
        expected += out
        assert r.model_extra["session_id"] == sid and choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        args = json.loads(call.function.arguments)
        result = {"city": args["city"], "temperature": 20 + turn}
        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
        ]
    # the last tool result goes in through /append; the trajectory ends with it
    r = tool_server.post(f"/v1/sessions/{sid}/append", json={"messages": [messages[-1]]})
    expected += r.json()["token_ids"]
    traj = tool_server.get(f"/v1/sessions/{sid}/trajectory").json()
    _check_trajectory(traj, expected, generated)
    assert [t["kind"] for t in traj["turns"]] == ["append", "generate"] * 3 + ["append"]
    text = tiny_tokenizer().decode(traj["token_ids"])
    assert [text.count(f'"temperature": {t}') for t in (20, 21, 22)] == [1, 1, 1]  # each result once


def test_mixed_appends_streaming_and_exact_tokens(server):
    sid = _open(server)
    url = f"/v1/sessions/{sid}"
    expected: list[int] = []
    generated = []

    def chat(messages, **kw):
        r = server.post(
            url + "/chat/completions",
            json={
                "model": MODEL,
                "messages": messages,
                "max_tokens": 12,
                "logprobs": True,
                "return_token_ids": True,
                **kw,
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        (choice,) = body["choices"]
        expected.extend(body["appended_token_ids"])
        generated.append(
            (len(expected), choice["token_ids"], [e["logprob"] for e in choice["logprobs"]["content"]])
        )
        expected.extend(choice["token_ids"])
        return choice

    first = chat(USER, seed=1)
    env = server.post(url + "/append", json={"token_ids": [10, 11, 12]}).json()  # raw environment tokens
    assert env["token_ids"] == [10, 11, 12]
    expected += env["token_ids"]
    more = {"role": "user", "content": "And tomorrow?"}
    appended = server.post(url + "/append", json={"messages": [more]}).json()["token_ids"]
    expected += appended
    # the whole conversation again: the session recognises what it holds and only opens a reply
    second = chat([*USER, {"role": "assistant", "content": first["message"]["content"]}, more], seed=2)
    tok = tiny_tokenizer()
    assert (
        tok.decode(expected[len(expected) - len(second["token_ids"]) - 3 :][:3]) == "<|im_start|>assistant\n"
    )

    # a streamed turn with only the new message
    chunks = []
    with httpx.stream(
        "POST",
        server.url + url + "/chat/completions",
        timeout=60,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Thanks!"}],
            "max_tokens": 12,
            "seed": 3,
            "stream": True,
            "logprobs": True,
            "return_token_ids": True,
        },
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    expected += chunks[-1]["appended_token_ids"]
    ids = [t for c in choices for t in c.get("token_ids", [])]
    lps = [e["logprob"] for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
    generated.append((len(expected), ids, lps))
    expected += ids

    traj = server.get(url + "/trajectory").json()
    _check_trajectory(traj, expected, generated)
    # re-tokenising the text would NOT give these tokens back: only exact bookkeeping does
    assert any(
        tok.encode(tok.decode(ids, skip_special_tokens=False), add_special_tokens=False) != ids
        for _, ids, _ in generated
    )


def test_session_errors_and_close(server):
    sid = _open(server)
    url = f"/v1/sessions/{sid}"
    assert (
        server.post(url + "/chat/completions", json={"model": MODEL, "messages": USER, "n": 2}).status_code
        == 400
    )
    assert server.post(url + "/chat/completions", json={"model": "x", "messages": USER}).status_code == 404
    assert server.post(url + "/append", json={"token_ids": [1], "messages": USER}).status_code == 400
    assert server.post(url + "/append", json={"token_ids": [10**7]}).status_code == 400
    assert server.post(url + "/append", json={"messages": [{"role": "user"}]}).status_code == 400
    over = server.post(url + "/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 5000})
    assert over.status_code == 400 and "context" in over.json()["error"]["message"]
    assert server.get(url + "/trajectory").json()["token_ids"] == []  # the failed turn left nothing
    assert (
        server.post(
            url + "/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 2}
        ).status_code
        == 200
    )
    r = httpx.delete(server.url + url)
    assert r.status_code == 200 and r.json()["deleted"]
    for method, path, body in [
        ("POST", "/chat/completions", {"model": MODEL, "messages": USER}),
        ("POST", "/append", {"token_ids": [1]}),
        ("GET", "/trajectory", None),
        ("DELETE", "", None),
    ]:
        r = httpx.request(method, server.url + url + path, json=body)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "session_not_found"
    assert server.get("/v1/sessions/sess-unknown/trajectory").status_code == 404


def test_busy_session_and_disconnect_mid_turn(server):
    sid = _open(server)
    url = f"/v1/sessions/{sid}"
    body = {"model": MODEL, "messages": USER, "max_tokens": 300, "ignore_eos": True}
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.setdefault("r", server.post(url + "/chat/completions", json=body))
    )
    t.start()
    deadline = time.monotonic() + 20
    while server.engine.call(server.engine.stats, timeout=10)["num_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    busy = server.post(url + "/chat/completions", json={**body, "max_tokens": 2})
    assert busy.status_code == 409
    assert server.post(url + "/append", json={"token_ids": [5]}).status_code == 409
    t.join(60)
    assert result["r"].status_code == 200

    # a client that hangs up mid-stream aborts its turn; the session records the partial turn and goes on
    async def leave() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream(
                "POST",
                server.url + url + "/chat/completions",
                json={
                    **body,
                    "messages": [{"role": "user", "content": "go on"}],
                    "max_tokens": 600,
                    "stream": True,
                },
            ) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if '"content"' in line and '"role"' not in line:
                        break

    before = len(server.get(url + "/trajectory").json()["token_ids"])
    asyncio.run(leave())
    server.idle()
    deadline = time.monotonic() + 10
    while True:
        r = server.post(
            url + "/chat/completions",
            json={**body, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # the aborted turn is being recorded
    assert r.status_code == 200
    traj = server.get(url + "/trajectory").json()
    partial = [t for t in traj["turns"] if t["kind"] == "generate"][-2]
    assert 0 < partial["end"] - partial["start"] < 600 and partial["start"] > before

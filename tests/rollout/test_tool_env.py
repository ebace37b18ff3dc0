"""Tool-using multi-turn episodes: exact trajectories, loss masks, malformed calls, tool failures, limits.

The tiny random model never writes a tool call, so a ScriptedPolicy plays the tool-calling turns;
the other turns, and every token the environment appends, go through the real engine session.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gyre import Engine, SamplingParams
from gyre.rollout import Action, Agent, LocalPool, Tool, ToolEnv, math_reward, run_episode

from .helpers import ScriptedPolicy


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    if set(expression) - set("0123456789+-*/(). "):
        raise ValueError(f"not arithmetic: {expression!r}")
    return str(eval(expression, {"__builtins__": {}}))  # noqa: S307 - digits and operators only


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture(scope="module")
def engine(qwen3_dir):
    with Engine(qwen3_dir, page_size=4) as eng:
        yield eng


def _run(env, task, engine, policy, sampling):
    return asyncio.run(run_episode(env, task, LocalPool(engine), sampling, {"policy": Agent(policy=policy)}))


class RecordingToolEnv(ToolEnv):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results = []

    async def step(self, agent, action):
        r = await super().step(agent, action)
        self.results.append(r)
        return r


def test_tool_episode_trajectory_is_exact(engine):
    tok = engine.tokenizer
    env = RecordingToolEnv([calculator], math_reward, system_prompt="Use the calculator.", max_turns=4)
    policy = ScriptedPolicy([_call("calculator", expression="17*3"), '<tool_call>\n{"name": "calc', None])
    task = {"prompt": "What is 17 times 3?", "answer": "51"}
    ep = _run(env, task, engine, policy, SamplingParams(max_new_tokens=12))
    (s,) = ep.samples
    # the random model may itself open a (broken) tool call: then it gets an error and another turn
    kinds = [k for k, _ in policy.turns]
    assert kinds[:3] == ["scripted", "scripted", "generate"] and set(kinds[3:]) <= {"generate"}
    assert s.metadata["num_turns"] == len(policy.turns)
    obs = [r.observation.content for r in env.results if not r.done]
    assert obs[0] == [{"role": "tool", "content": "51"}]
    assert len(obs[1]) == 1 and obs[1][0]["content"].startswith("Error: malformed tool call")

    # the agent's turns, in order, are exactly its trained spans: scripted ids or the engine's tokens
    trained = [(a, b) for a, b, _ in s.turns if s.loss_mask[a] == 1]
    assert len(trained) == len(policy.turns)
    mask = [0] * len(s.response_ids)
    for (a, b), (kind, x) in zip(trained, policy.turns):
        ids = x.output_ids if kind == "generate" else x
        assert s.response_ids[a:b] == ids
        mask[a:b] = [1] * (b - a)
        if kind == "generate":
            assert s.logprobs[a:b] == x.output_logprobs and s.weight_versions[a:b] == [0] * (b - a)
    assert s.loss_mask == mask  # everything the environment appended has loss mask 0
    assert all(lp is None and v is None for lp, v, m in zip(s.logprobs, s.weight_versions, mask) if not m)
    assert trained[0][0] == 0 and trained[-1][1] == len(s.response_ids)

    # what the environment appended is exactly the chat template's rendering of the conversation
    messages = [
        {"role": "system", "content": "Use the calculator."},
        {"role": "user", "content": task["prompt"]},
    ]
    for (kind, x), o in zip(policy.turns[:-1], obs):
        text = x.text if kind == "generate" else tok.decode(x, skip_special_tokens=True).removesuffix("\n")
        messages += [{"role": "assistant", "content": text}, *o]
    rendered = tok.apply_chat_template(
        messages, tools=[env.tools["calculator"].schema], tokenize=False, add_generation_prompt=True
    )
    last = len(s.prompt_ids) + trained[-1][0]
    assert tok.decode(s.token_ids[:last], skip_special_tokens=False) == rendered
    assert ep.info["num_tool_calls"] == 1 and ep.info["num_tool_errors"] == len(policy.turns) - 2
    if not ep.truncated:
        assert s.reward == ep.rewards["policy"] == math_reward(policy.turns[-1][1].text, task)
    assert engine.stats()["num_sessions"] == 0  # the episode closed its session


def test_tool_failures_come_back_as_messages():
    async def slow_async(x: int) -> int:
        await asyncio.sleep(5)
        return x

    def slow_sync(x: int) -> int:
        time.sleep(1.0)
        return x

    def listing(n: int) -> list:
        return list(range(n))

    env = ToolEnv(
        [calculator, Tool.from_function(slow_async, name="slow"), slow_sync, listing],
        lambda text, task: 1.0,
        tool_timeout_s=0.2,
    )

    async def go():
        obs = await env.reset({"prompt": "hi"})
        assert [t["function"]["name"] for t in obs.tools] == ["calculator", "slow", "slow_sync", "listing"]
        assert obs.tools[3]["function"]["parameters"] == {
            "type": "object",
            "properties": {"n": {"type": "integer"}},
            "required": ["n"],
        }
        text = "".join(
            [
                _call("calculator", expression="2+2"),
                _call("nope"),
                _call("calculator", expr="1"),
                _call("calculator", expression="import os"),
                _call("slow", x=1),
                _call("slow_sync", x=1),
                _call("listing", n=3),
                "<tool_call>not json</tool_call>",
            ]
        )
        t0 = time.monotonic()
        r = await env.step("policy", Action(text, [], "stop"))
        assert time.monotonic() - t0 < 1.0  # timeouts ran concurrently
        final = await env.step("policy", Action("The answer is 4.", [], "stop"))
        return r, final

    r, final = asyncio.run(go())
    contents = [m["content"] for m in r.observation.content]
    assert all(m["role"] == "tool" for m in r.observation.content)
    assert contents[0] == "4"
    assert contents[1].startswith("Error: unknown tool 'nope'")
    assert contents[2].startswith("Error: bad arguments for tool 'calculator'")
    assert contents[3].startswith("Error: tool 'calculator' raised ValueError")
    assert "timed out" in contents[4] and "timed out" in contents[5]
    assert contents[6] == "[0, 1, 2]"
    assert contents[7].startswith("Error: malformed tool call 'not json'")
    assert r.info == {"num_tool_calls": 7, "num_tool_errors": 6} and r.reward == 0.0
    assert final.done and final.reward == 1.0


def test_max_turns_and_max_tokens(engine):
    sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
    call = _call("calculator", expression="1+1")
    # max_turns: the episode stops before a third turn; the last tool result is not appended
    env = ToolEnv([calculator], math_reward, max_turns=2)
    policy = ScriptedPolicy([call, call, call])
    ep = _run(env, {"prompt": "Add.", "answer": "2"}, engine, policy, sampling)
    (s,) = ep.samples
    assert (
        ep.truncated and s.metadata["truncated"] and s.metadata["num_turns"] == 2 and len(policy.turns) == 2
    )
    assert s.response_ids[-len(policy.turns[-1][1]) :] == policy.turns[-1][1]  # ends with the agent's turn
    assert s.reward == 0.0

    # max_tokens: the generated turn is capped so that the response fits exactly
    first = ScriptedPolicy([call])
    _run(ToolEnv([calculator], math_reward), {"prompt": "Add.", "answer": "2"}, engine, first, sampling)
    probe = ScriptedPolicy([call, None])
    ep = _run(
        ToolEnv([calculator], math_reward, max_tokens=10_000),
        {"prompt": "Add.", "answer": "2"},
        engine,
        probe,
        SamplingParams(max_new_tokens=1, ignore_eos=True),
    )
    before_gen = len(ep.samples[0].response_ids) - 1
    budget = before_gen + 5
    capped = ScriptedPolicy([call, None])
    ep = _run(
        ToolEnv([calculator], math_reward, max_tokens=budget),
        {"prompt": "Add.", "answer": "2"},
        engine,
        capped,
        sampling,
    )
    assert len(ep.samples[0].response_ids) == budget and len(capped.turns[1][1].output_ids) == 5
    # no room for the next observation: the trajectory ends at the agent's last turn
    tight = ScriptedPolicy([call, call])
    ep = _run(
        ToolEnv([calculator], math_reward, max_tokens=len(policy.turns[0][1]) + 3),
        {"prompt": "Add.", "answer": "2"},
        engine,
        tight,
        sampling,
    )
    (s,) = ep.samples
    assert ep.truncated and len(tight.turns) == 1 and s.response_ids == tight.turns[0][1]

"""The environment interface (Gym-like, async) and the single-turn environment.

An episode (episode.py drives it):

    obs = await env.reset(task)                  # Observation: which agent acts, what it is shown
    while obs is not None:
        action = <obs.agent's session: append obs.content, generate one turn>
        result = await env.step(obs.agent, action)   # StepResult: rewards, the next observation
        obs = result.observation

An environment never touches tokens: it sees each turn's text and answers with chat messages (or
token ids), which the episode appends to the acting agent's session with loss mask 0. One env object
serves one episode (the manager builds one per episode from a factory), so it may keep state.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[[str, dict[str, Any]], float | Awaitable[float]]


@dataclass
class Observation:
    agent: str  # who acts next
    content: list[dict] | list[int]  # chat messages (or token ids) appended to that agent's session
    tools: list[dict] | None = None  # tool schemas for the chat template (an agent's first turn)


@dataclass
class Action:
    """One turn of an agent, as the environment sees it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" (| "scripted" for a turn a Policy appended itself)


@dataclass
class StepResult:
    observation: Observation | None = None  # None: the episode is over
    reward: float | dict[str, float] = 0.0  # a float goes to the acting agent; a dict by agent name
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.observation is None


class Env:
    """Base class. `max_turns` (generated turns per agent) and `max_tokens` (tokens after an agent's
    prompt: its generations and what the environment appended) bound every trajectory; the episode
    stops, truncated, before a turn that would exceed them."""

    max_turns: int | None = None
    max_tokens: int | None = None

    async def reset(self, task: dict[str, Any]) -> Observation:
        raise NotImplementedError

    async def step(self, agent: str, action: Action) -> StepResult:
        raise NotImplementedError


class SingleTurnEnv(Env):
    """One prompt, one answer, one reward: `task["prompt"]` (text, chat messages or token ids) is
    answered once and scored by `reward_fn(text, task)` (e.g. rewards.math_reward)."""

    def __init__(self, reward_fn: RewardFn, system_prompt: str | None = None, agent: str = "policy") -> None:
        self.reward_fn = reward_fn
        self.system_prompt = system_prompt
        self.agent = agent
        self.task: dict[str, Any] = {}

    async def reset(self, task: dict[str, Any]) -> Observation:
        self.task = task
        return Observation(self.agent, chat_prompt(task["prompt"], self.system_prompt))

    async def step(self, agent: str, action: Action) -> StepResult:
        return StepResult(None, await call_reward(self.reward_fn, action.text, self.task))


def chat_prompt(prompt: str | list, system_prompt: str | None = None) -> list[dict] | list[int]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if (
        system_prompt is not None
        and prompt
        and isinstance(prompt[0], dict)
        and prompt[0].get("role") != "system"
    ):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return list(prompt)


async def call_reward(fn: RewardFn, text: str, task: dict[str, Any]) -> float:
    r = fn(text, task)
    if inspect.isawaitable(r):
        r = await r
    return float(r)

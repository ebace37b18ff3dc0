"""One episode: an environment, one session per agent, turns until the environment is done.

Per turn of agent A: its observation is appended to A's session (loss mask 0; A's first observation
opens the session and carries the tool schemas), the chat template's assistant header is appended, and
A's Policy takes the turn (by default: the engine generates). The environment sees the turn's text.
At the end each trainable agent's session trajectory becomes one Sample, so agents' trajectories are
disjoint: an agent's loss mask covers only its own turns; others' turns reach it as appended text.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from gyre.engine.request import SamplingParams
from gyre.rollout.data import Sample
from gyre.rollout.env import Action, Env, Observation
from gyre.rollout.pool import EnginePool, RolloutSession, capped

log = logging.getLogger("gyre.rollout")


class Policy:
    """How an agent takes a turn on its session. The default generates with the engine; a subclass may
    script turns instead (demonstrations, forced tool calls), e.g. with session.append(..., trainable=True).

    `new` is what opens the turn: the agent's first observation (chat messages or token ids; `tools`
    go with it), or the assistant header after an observation already appended, or None.
    """

    async def act(
        self, session: RolloutSession, new: Any, sampling: SamplingParams, tools: list | None = None
    ) -> Action:
        c = await session.generate(new, sampling, tools)
        return Action(c.text or "", c.output_ids, c.finish_reason)


@dataclass
class Agent:
    """How one agent of an environment is served. Unset fields fall back to the manager's."""

    pool: EnginePool | None = None  # e.g. a different model for a judge
    sampling: SamplingParams | None = None
    policy: Policy | None = None
    trainable: bool = True  # False: its trajectory is not returned as a sample


@dataclass
class Episode:
    samples: list[Sample]
    rewards: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False


async def run_episode(
    env: Env,
    task: dict[str, Any],
    pool: EnginePool,
    sampling: SamplingParams,
    agents: dict[str, Agent] | None = None,
) -> Episode:
    agents = agents or {}
    sessions: dict[str, RolloutSession] = {}
    turns: dict[str, int] = {}
    rewards: dict[str, float] = {}
    info: dict[str, Any] = {}
    truncated = False
    obs: Observation | None = await env.reset(task)
    try:
        while obs is not None:
            name = obs.agent
            agent = agents.get(name, Agent())
            agent_pool = agent.pool or pool
            sp = agent.sampling or sampling
            session = sessions.get(name)
            if session is None:
                session = sessions[name] = await agent_pool.open_session()
                turns[name] = 0
                new, tools = obs.content, obs.tools
            else:
                if env.max_turns is not None and turns[name] >= env.max_turns:
                    truncated = True
                    break
                await session.append(obs.content)
                is_chat = bool(obs.content) and isinstance(obs.content[0], dict)
                new, tools = (agent_pool.generation_prompt_ids if is_chat else None), None
            budget = sp.max_new_tokens
            if env.max_tokens is not None:  # the first observation is the prompt, outside the budget
                header = len(new) if turns[name] and new else 0
                budget = env.max_tokens - session.num_response_tokens - header
                if budget <= 0:  # the observation does not fit: the trajectory ends at the last turn
                    await session.rewind(1)
                    truncated = True
                    break
            action = await (agent.policy or _DEFAULT).act(session, new, capped(sp, budget), tools)
            turns[name] += 1
            result = await env.step(name, action)
            for who, r in _rewards_of(result.reward, name).items():
                rewards[who] = rewards.get(who, 0.0) + r
            for k, v in result.info.items():  # integers (counts) add up over turns; other values: the last
                info[k] = info.get(k, 0) + v if isinstance(v, int) and not isinstance(v, bool) else v
            obs = result.observation
        samples = []
        for name, session in sessions.items():
            if not agents.get(name, Agent()).trainable:
                continue
            traj = await session.trajectory()
            meta = {"task": task, "num_turns": turns[name], "truncated": truncated, **info}
            samples.append(Sample.from_trajectory(traj, rewards.get(name, 0.0), agent=name, metadata=meta))
        return Episode(samples, rewards, info, truncated)
    finally:
        await _close_all(list(sessions.values()))


_DEFAULT = Policy()


async def _close_all(sessions: list[RolloutSession]) -> None:
    """Close every session, also when the episode is being cancelled or its engine died."""
    cancelled: asyncio.CancelledError | None = None
    for session in sessions:
        try:
            await asyncio.shield(session.close())
        except asyncio.CancelledError as e:
            cancelled = e
        except Exception:  # noqa: BLE001 - a dead engine: nothing left to close
            log.warning("closing a session failed", exc_info=True)
    if cancelled is not None:
        raise cancelled


def _rewards_of(reward: float | dict[str, float], agent: str) -> dict[str, float]:
    return {k: float(v) for k, v in reward.items()} if isinstance(reward, dict) else {agent: float(reward)}
